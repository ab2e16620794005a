"""Routing fluctuation (StableMoE, arXiv 2204.08396, section 2): how long do tokens keep changing expert?

Legend: C checks (snapshots), L MoE layers, N tracked tokens.

Every `every` steps the top-1 expert of a fixed set of validation tokens is recorded at each MoE
layer (a snapshot [L, N] at step s_c). A token's *last fluctuation step* is the step of the last
check whose expert differs from the token's final expert (the last snapshot's), or -1 if it never
differs. The curve is the fraction of tokens still changing after x% of training: the share of
tokens whose last fluctuation step is >= x% of the last check's step. A router that stops
fluctuating early (StableMoE after its switch step) drops to 0 there; a learned top-k router
usually keeps a tail to the end.

`routing_fluctuation` is the pure computation (testable on a scripted sequence); the recorder that runs
the forwards during training and writes metrics and `routing_fluctuation.png` is
msmoe_dist.train.routing_fluctuation.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

SUMMARY_PERCENTS = (10, 25, 50, 75, 90)
SNAPSHOT_FILE = "routing_snapshots.jsonl"
PLOT_FILE = "routing_fluctuation.png"


@dataclass(frozen=True)
class Fluctuation:
    steps: list[int]  # the check steps, ascending
    last_step_LN: Tensor  # int64: each token's last fluctuation step, -1 if it never differs from its final expert
    changed_LC: Tensor  # float: fraction of tokens whose expert differs from the previous check (check 0: 0)

    @property
    def total(self) -> int:
        return self.steps[-1]

    def still_changing(self, percent: float) -> list[float]:
        """Per layer: fraction of tokens whose last fluctuation step is >= percent% of training."""
        threshold = percent / 100.0 * self.total
        return (self.last_step_LN >= threshold).double().mean(dim=1).tolist()

    def curve(self) -> tuple[list[float], list[list[float]]]:
        """(x in % of training at 0 and at every check, per layer the fraction still changing there)."""
        xs = [0.0] + [100.0 * s / self.total if self.total else 100.0 for s in self.steps]
        ys = [[row[i] for row in [self.still_changing(x) for x in xs]] for i in range(self.last_step_LN.shape[0])]
        return xs, ys

    def scalars(self, prefix: str = "fluct") -> dict:
        """Headline numbers per layer for metrics.jsonl / TensorBoard, plus the curve as lists."""
        out: dict = {}
        xs, ys = self.curve()
        mean_last = self.last_step_LN.clamp(min=0).double().mean(dim=1).tolist()
        for layer in range(self.last_step_LN.shape[0]):
            head = f"{prefix}.layer{layer}."
            for p in SUMMARY_PERCENTS:
                out[f"{head}changing_after_{p}pct"] = self.still_changing(p)[layer]
            out[f"{head}mean_last_step"] = mean_last[layer]
            out[f"{head}changed_last_check"] = float(self.changed_LC[layer, -1])
            out[f"{head}curve_pct"] = xs
            out[f"{head}curve_changing"] = ys[layer]
        out[f"{prefix}.checks"] = len(self.steps)
        out[f"{prefix}.tokens"] = int(self.last_step_LN.shape[1])
        return out


def routing_fluctuation(steps: Sequence[int], snapshots: Sequence[Tensor]) -> Fluctuation:
    """The fluctuation metric of a sequence of snapshots: ``snapshots[c]`` is [L, N] (or [N]) at ``steps[c]``."""
    if not snapshots or len(steps) != len(snapshots):
        raise ValueError(f"need one snapshot per step, got {len(steps)} steps and {len(snapshots)} snapshots")
    if list(steps) != sorted(set(steps)):
        raise ValueError(f"steps must be strictly increasing, got {list(steps)}")
    stacked = [torch.as_tensor(s).long() for s in snapshots]
    stacked = [s[None] if s.dim() == 1 else s for s in stacked]
    if len({tuple(s.shape) for s in stacked}) != 1:
        raise ValueError(f"snapshots differ in shape: {sorted({tuple(s.shape) for s in stacked})}")
    a_CLN = torch.stack(stacked)
    C = a_CLN.shape[0]
    steps_C = torch.tensor(list(steps), dtype=torch.long)
    differs_CLN = a_CLN != a_CLN[-1]
    # Last check that differs: the largest step among the differing checks, -1 if none.
    last_LN = torch.where(differs_CLN, steps_C[:, None, None], torch.full_like(a_CLN, -1)).amax(dim=0)
    changed_LC = torch.zeros(a_CLN.shape[1], C, dtype=torch.float64)
    if C > 1:
        changed_LC[:, 1:] = (a_CLN[1:] != a_CLN[:-1]).double().mean(dim=2).t()
    return Fluctuation(steps=[int(s) for s in steps], last_step_LN=last_LN, changed_LC=changed_LC)


def plot_curves(curves: dict[str, tuple[list[float], list[float]]], path: Path, title: str) -> Path | None:
    """Writes the curves {label: (x %, fraction still changing)} as a PNG; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a missing plot must not fail a finished run; the numbers are logged anyway
        print(f"warning: matplotlib is not installed; {path} not written", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in curves.items():
        # y[j] = share of tokens whose last fluctuation step is >= x[j]; between two checks no token's
        # last step can lie, so y[j] holds on the whole interval (x[j-1], x[j]]: a "pre" step.
        ax.step(xs, ys, where="pre", label=label)
    ax.set_xlabel("training progress (%)")
    ax.set_ylabel("fraction of tokens still changing expert")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["Fluctuation", "routing_fluctuation", "plot_curves", "SNAPSHOT_FILE", "PLOT_FILE"]
