"""The training-time recorder of routing fluctuation (StableMoE, arXiv 2204.08396): every
`logging.fluct_every` steps it routes a fixed set of validation tokens through the model, keeps the
snapshots in run_dir/routing_snapshots.jsonl and, at the end, logs the metric and plots its curve
(the computation itself is msmoe_dist.moe.fluctuation.routing_fluctuation).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from msmoe_dist.models.base import MoEModel
from msmoe_dist.moe.fluctuation import PLOT_FILE, SNAPSHOT_FILE, Fluctuation, plot_curves, routing_fluctuation


def fixed_windows(stream: Tensor, num_tokens: int, seq_len: int) -> list[Tensor]:
    """The first min(num_tokens, len) tokens as [rows, seq_len] windows plus a [1, rest] remainder."""
    n = min(num_tokens, len(stream))
    head = torch.as_tensor(stream[:n]).long()  # a copy of just these tokens, whatever holds the stream
    full, rest = divmod(n, seq_len)
    windows = []
    if full:
        windows.append(head[: full * seq_len].reshape(full, seq_len))
    if rest:
        windows.append(head[full * seq_len :].reshape(1, rest))
    return windows


class FluctuationRecorder:
    """Records snapshots during training (every rank runs the forwards: expert parallelism needs every
    rank in every all-to-all; only the main rank keeps them) and reports at the end.

    Snapshots are appended to run_dir/routing_snapshots.jsonl as they are taken, so a resumed run
    continues the record: lines past the resume step are dropped, as in metrics.jsonl.
    """

    def __init__(
        self,
        every: int,
        num_tokens: int,
        stream: Tensor | None,
        seq_len: int,
        batch_size: int,
        max_steps: int,
        run_dir: Path,
        is_main: bool,
        bf16_autocast: bool = False,
        resume_step: int | None = None,
    ):
        self.every, self.is_main, self.batch_size, self.max_steps = every, is_main, batch_size, max_steps
        self.bf16_autocast = bf16_autocast
        self.path = Path(run_dir) / SNAPSHOT_FILE
        if every and stream is None:
            raise ValueError("routing fluctuation needs a token stream (language models only)")
        self.windows = fixed_windows(stream, num_tokens, seq_len) if every and stream is not None else []
        self.num_tokens = sum(w.numel() for w in self.windows)
        self.steps: list[int] = []
        self.snapshots: list[Tensor] = []
        if every and is_main:
            self._load(resume_step)

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
    def assignments(self, model: MoEModel) -> Tensor:
        """[L, N]: the top-1 expert of every tracked token at every MoE layer, as an evaluation forward routes."""
        routers = [layer.router for layer in model.moe_layers()]
        seen: list[list[Tensor]] = [[] for _ in routers]
        # The hooks copy each batch's assignments to the host: a device-to-host sync per router call.
        hooks = [
            r.register_forward_hook(lambda _m, _i, out, i=i: seen[i].append(out.experts_TK[:, 0].cpu()))
            for i, r in enumerate(routers)
        ]
        param = next(model.parameters())
        was_training = model.training
        model.eval()
        try:
            for window in self.windows:
                for rows in window.split(self.batch_size):
                    with torch.autocast(
                        param.device.type,
                        dtype=torch.bfloat16,
                        enabled=self.bf16_autocast and param.dtype == torch.float32,
                    ):
                        model(rows.to(param.device))
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
        return torch.stack([torch.cat(s) for s in seen])

    def maybe_record(self, step: int, model: MoEModel) -> None:
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
        plot_curves(
            {f"MoE layer {i}": (xs, y) for i, y in enumerate(ys)},
            self.path.parent / PLOT_FILE,
            f"{title}\n({self.num_tokens} tokens, {len(self.steps)} checks)",
        )
        return result


__all__ = ["FluctuationRecorder", "fixed_windows"]
