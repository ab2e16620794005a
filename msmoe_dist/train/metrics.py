"""metrics.jsonl (one JSON object per logged step), TensorBoard scalars (all numbers but a row's `time`, and
each MoE layer's per-expert load, `moe.layerN.tokens_per_expert`, as one scalar per expert) and, optionally,
the same rows in Weights & Biases (train/wandb_log.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from msmoe_dist.train.errors import TrainError


class MetricsLogger:
    """Appends rows to run_dir/metrics.jsonl and TensorBoard.

    `state_dict()` is the log's position, stored in each checkpoint's metadata; a run resumed from
    that checkpoint (`resume=` its state and step) cuts the log back to it, so rows logged after
    the checkpoint by the interrupted run are not repeated and the file reads as one uninterrupted
    trace. TensorBoard drops the events the interrupted run logged after the checkpoint's step
    (purge_step=step + 1): the rows of that step itself (its training row, its validation point)
    were logged before the checkpoint was saved, so both logs keep them.
    """

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool,
        resume_step: int | None = None,
        resume_state: dict | None = None,
        wandb=None,
    ):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            self._cut(resume_step, (resume_state or {}).get("bytes"))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._fh = self.path.open("a")
        self.wandb = wandb  # a train.wandb_log.WandbSink, or None
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def _cut(self, step: int, size: int | None) -> None:
        if size is not None and size <= self.path.stat().st_size:
            with self.path.open("r+b") as fh:
                fh.truncate(size)
            return
        # A checkpoint from before the position was recorded (or a log shorter than it): keep the rows up to its step.
        keep = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row_step = json.loads(line).get("step", 0)
            except (ValueError, AttributeError) as exc:
                raise TrainError(
                    f"{self.path} line {number} is not a JSON object ({exc}); expected one object per line: "
                    "repair or delete that line (or move the file away) and resume again"
                ) from None
            if row_step <= step:
                keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep))

    def state_dict(self) -> dict:
        self._fh.flush()
        return {"bytes": self.path.stat().st_size}

    def log(self, step: int, scalars: dict) -> None:
        row = {"step": step, **scalars}
        self._fh.write(json.dumps(row, allow_nan=True) + "\n")
        self._fh.flush()
        if self.wandb is not None:
            self.wandb.log(step, scalars)
        if self.tb is not None:
            for k, v in scalars.items():
                if k != "time" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k.replace(".", "/"), v, step)
                elif k.endswith(".tokens_per_expert") and isinstance(v, list):  # per-expert load: one tag each
                    for e, n in enumerate(v):
                        self.tb.add_scalar(f"{k.replace('.', '/')}/expert{e}", n, step)

    def close(self) -> None:
        self._fh.close()
        if self.wandb is not None:
            self.wandb.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
