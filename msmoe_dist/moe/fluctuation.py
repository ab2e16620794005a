"""Routing fluctuation (StableMoE, arXiv 2204.08396, section 2): how long do tokens keep changing expert?

Legend: C checks (snapshots), L MoE layers, N tracked tokens.

Every `every` steps the top-1 expert of a fixed set of validation tokens is recorded at each MoE
layer (a snapshot [L, N] at step s_c). A token's *last fluctuation step* is the step of the last
check whose expert differs from the token's final expert (the last snapshot's), or -1 if it never
differs. The curve is the fraction of tokens still changing after x% of training: the share of
tokens whose last fluctuation step is >= x% of the last check's step. A router that stops
fluctuating early (StableMoE after its switch step) drops to 0 there; a learned top-k router
usually keeps a tail to the end.

`routing_fluctuation` is the pure computation (testable on a scripted sequence); the recorder
below runs the forwards during training and writes metrics and `routing_fluctuation.png`.
"""

from __future__ import annotations

import json
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


def fixed_windows(stream: Tensor, num_tokens: int, seq_len: int) -> list[Tensor]:
    """The first min(num_tokens, len) tokens as [rows, seq_len] windows plus a [1, rest] remainder."""
    n = min(num_tokens, len(stream))
    head = torch.as_tensor(stream[:n]).long()  # a copy of just these tokens, whatever holds the stream
    full, rest = divmod(n, seq_len)
    windows = []
    if full:
        windows.append(head[: full * seq_len].reshape(full, seq_len))
    if rest:
        windows.append(head[full * seq_len:].reshape(1, rest))
    return windows


class FluctuationRecorder:
    """Records snapshots during training (every rank runs the forwards: expert parallelism needs every
    rank in every all-to-all; only the main rank keeps them) and reports at the end.

    Snapshots are appended to run_dir/routing_snapshots.jsonl as they are taken, so a resumed run
    continues the record: lines past the resume step are dropped, as in metrics.jsonl.
    """

    def __init__(self, every: int, num_tokens: int, stream: Tensor, seq_len: int, batch_size: int, max_steps: int,
                 run_dir: Path, is_main: bool, bf16_autocast: bool = False, resume_step: int | None = None):
        self.every, self.is_main, self.batch_size, self.max_steps = every, is_main, batch_size, max_steps
        self.bf16_autocast = bf16_autocast
        self.path = Path(run_dir) / SNAPSHOT_FILE
        self.windows = fixed_windows(stream, num_tokens, seq_len) if every else []
        self.num_tokens = sum(w.numel() for w in self.windows)
        self.steps: list[int] = []
        self.snapshots: list[Tensor] = []
        if every and is_main:
            self._load(resume_step)

    @classmethod
    def from_config(cls, cfg, stream: Tensor, run_dir: Path, is_main: bool, resume_step: int | None):
        return cls(cfg.logging.fluct_every, cfg.logging.fluct_tokens, stream, cfg.data.seq_len, cfg.data.batch_size,
                   cfg.train.max_steps, run_dir, is_main, cfg.train.dtype == "bf16", resume_step)

    def _load(self, resume_step: int | None) -> None:
        if resume_step is None or not self.path.exists():
            self.path.unlink(missing_ok=True)
            return
        keep = []
        for line in self.path.read_text().splitlines():
            row = json.loads(line) if line.strip() else None
            # Another token count (logging.fluct_tokens changed) cannot be compared: start the record anew.
            if row and row["step"] <= resume_step and len(row["experts"][0]) == self.num_tokens:
                keep.append(row)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self.steps = [r["step"] for r in keep]
        self.snapshots = [torch.tensor(r["experts"]) for r in keep]

    @torch.no_grad()
    def assignments(self, model: torch.nn.Module) -> Tensor:
        """[L, N]: the top-1 expert of every tracked token at every MoE layer, as an evaluation forward routes."""
        from msmoe_dist.moe.layer import MoELayer

        routers = [m.router for m in model.modules() if isinstance(m, MoELayer)]
        seen: list[list[Tensor]] = [[] for _ in routers]
        # The hooks copy each batch's assignments to the host: a device-to-host sync per router call.
        hooks = [r.register_forward_hook(lambda _m, _i, out, i=i: seen[i].append(out.experts_TK[:, 0].cpu()))
                 for i, r in enumerate(routers)]
        param = next(model.parameters())
        was_training = model.training
        model.eval()
        try:
            for window in self.windows:
                for rows in window.split(self.batch_size):
                    with torch.autocast(param.device.type, dtype=torch.bfloat16,
                                        enabled=self.bf16_autocast and param.dtype == torch.float32):
                        model(rows.to(param.device))
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
        return torch.stack([torch.cat(s) for s in seen])

    def maybe_record(self, step: int, model: torch.nn.Module) -> None:
        """After `step` completed optimiser steps: record every `every` steps and after the last one.

        The decision depends on the step alone, never on rank-local state, so all ranks agree on it."""
        if not self.every or not (step % self.every == 0 or step == self.max_steps):
            return
        a_LN = self.assignments(model)  # every rank: the forwards contain all-to-alls
        if not self.is_main:
            return
        self.steps.append(step)
        self.snapshots.append(a_LN)
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, "experts": a_LN.tolist()}) + "\n")

    def finish(self, logger, title: str = "routing fluctuation") -> Fluctuation | None:
        """Logs the metric at the last check's step and writes the plot next to the snapshots (main rank)."""
        if not self.every or not self.is_main or not self.steps:
            return None
        result = routing_fluctuation(self.steps, self.snapshots)
        if logger is not None:
            logger.log(result.total, result.scalars())
        xs, ys = result.curve()
        plot_curves({f"MoE layer {i}": (xs, y) for i, y in enumerate(ys)}, self.path.parent / PLOT_FILE,
                    f"{title}\n({self.num_tokens} tokens, {len(self.steps)} checks)")
        return result


__all__ = ["Fluctuation", "FluctuationRecorder", "routing_fluctuation", "plot_curves", "fixed_windows",
           "SNAPSHOT_FILE", "PLOT_FILE"]
