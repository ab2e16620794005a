"""PNGs of `msmoe-bench compare` (matplotlib; importing this module fails without it, and the report
then says so and writes its tables alone).

- valid-perplexity curves: one colour per row (variant / sweep point), thin lines per seed, a thick line
  for the mean over the seeds that logged that step;
- the norm-ordered expert-selection histogram (the MomentumSMoE paper's Fig. 5; see compare_report):
  one panel per MoE layer, one bar group per row.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

from msmoe_dist.bench.compare_stats import selection_fractions

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _rows(cells: list, per_cell: dict) -> dict[str, list]:
    rows: dict[str, list] = {}
    for cell in cells:
        if per_cell.get(cell.name) is not None:
            rows.setdefault(cell.label, []).append(per_cell[cell.name])
    return rows


def plot_curves(path: Path, cells: list, per_cell: dict) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(_rows(cells, per_cell).items()):
        colour = colours[i % len(colours)]
        by_step: dict[float, list[float]] = {}
        for run in runs:
            steps = [s for s, _ in run["curve"]]
            ppl = [p for _, p in run["curve"]]
            if len(runs) > 1:
                ax.plot(steps, ppl, color=colour, alpha=0.3, linewidth=0.8)
            for s, p in run["curve"]:
                by_step.setdefault(s, []).append(p)
        steps = sorted(by_step)
        ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], color=colour, linewidth=2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("validation perplexity (thin: seeds, thick: mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_selection(path: Path, cells: list, per_cell: dict) -> Path | None:
    fractions = selection_fractions(cells, per_cell)
    layers = sorted({int(layer) for rows in fractions.values() for layer in rows})
    if not layers:
        return None
    cols = min(3, len(layers))
    nrows = -(-len(layers) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    labels = list(fractions)
    width = 0.8 / max(len(labels), 1)
    for idx, layer in enumerate(layers):
        ax = axes[idx // cols][idx % cols]
        for j, label in enumerate(labels):
            frac = fractions[label].get(str(layer))
            if frac is None:
                continue
            xs = [r + (j - (len(labels) - 1) / 2) * width for r in range(len(frac))]
            ax.bar(xs, frac, width=width, label=label)
        ax.set_title(f"MoE layer {layer}", fontsize=9)
        ax.set_xlabel("expert rank by output norm (0 = largest)", fontsize=8)
        ax.set_ylabel("fraction of assignments", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    for idx in range(len(layers), nrows * cols):
        axes[idx // cols][idx % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("expert selection ordered by expert output norm (last quarter of training)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
