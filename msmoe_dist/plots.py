"""msmoe-plot: PNGs of one or several runs' metrics.jsonl.

For the runs given (their directories), in ``--out`` (default: ``RUN_DIR/plots`` for one run, ``plots``
for several):

- ``loss.png``: training loss against step, one curve per run (compare runs on one plot);
- ``val_<metric>.png``: each validation metric the runs logged (``val.ppl`` for language models,
  ``val.top1`` ... for V-MoE), one curve per run;
- ``expert_load_<run>.png``: per MoE layer, a heatmap of each expert's share of the routed tokens at
  each logged step, relative to a uniform share (1.0 = balanced; from ``moe.layer<i>.tokens_per_expert``,
  logged with logging.moe_stats=true).

Only reads the runs; PNGs of the same names in ``--out`` are replaced.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from msmoe_dist.errors import UserError

_LOAD_KEY = re.compile(r"^moe\.layer(\d+)\.tokens_per_expert$")


class PlotError(UserError):
    """A run directory that cannot be plotted (one line, exit 2)."""


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir} has no metrics.jsonl; expected a msmoe-train run directory")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise PlotError(f"{path} line {number} is not JSON ({exc}); expected one object per line") from None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    if not rows:
        raise PlotError(f"{path} holds no logged step yet; expected at least one row")
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one numeric key; a later row of the same step wins (e.g. after a resume)."""
    by_step = {r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))}
    steps = sorted(by_step)
    return steps, [float(by_step[s]) for s in steps]


def load_shares(rows: list[dict]) -> dict[int, tuple[list[int], list[list[float]]]]:
    """{layer: (steps, [per step: each expert's token share / uniform share])}."""
    out: dict[int, tuple[list[int], list[list[float]]]] = {}
    for row in rows:
        for key, counts in row.items():
            m = _LOAD_KEY.match(key)
            if m and isinstance(counts, list) and counts and sum(counts) > 0:
                total = float(sum(counts))
                steps, shares = out.setdefault(int(m.group(1)), ([], []))
                steps.append(row["step"])
                shares.append([c * len(counts) / total for c in counts])
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(run_dirs: list[Path], out: Path) -> list[Path]:
    """Writes the PNGs; returns their paths. Every run is read (and checked) before anything is written."""
    runs = {_label(d, run_dirs): read_rows(d) for d in run_dirs}
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    keys = ["loss"] + sorted({k for rows in runs.values() for r in rows for k in r if k.startswith("val.")})
    for key in keys:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, rows in runs.items():
            steps, values = series(rows, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        if key.endswith("ppl"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / ("loss.png" if key == "loss" else f"{key.replace('.', '_')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    for label, rows in runs.items():
        layers = load_shares(rows)
        if not layers:
            continue
        fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.2 + 1.6 * len(layers)), squeeze=False)
        for ax, (layer, (steps, shares)) in zip(axes[:, 0], sorted(layers.items())):
            grid = list(map(list, zip(*shares)))  # experts x steps
            im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
            ticks = list(range(0, len(steps), max(1, len(steps) // 8)))
            ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=7)
            ax.set_ylabel(f"layer {layer}\nexpert", fontsize=8)
            fig.colorbar(im, ax=ax, label="share / uniform")
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(f"{label}: expert load per layer")
        fig.tight_layout()
        path = out / f"expert_load_{re.sub(r'[^A-Za-z0-9_.-]', '_', label)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _label(run_dir: Path, all_dirs: list[Path]) -> str:
    """The run's name on the plots: its directory name, or its path when two runs share a name."""
    names = [d.resolve().name for d in all_dirs]
    name = run_dir.resolve().name
    return name if names.count(name) == 1 else str(run_dir)
