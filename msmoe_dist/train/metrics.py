"""metrics.jsonl (one JSON object per logged step) and TensorBoard scalars."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    """Appends rows to run_dir/metrics.jsonl and TensorBoard.

    `state_dict()` is the log's position, stored in each checkpoint's metadata; a run resumed from
    that checkpoint (`resume=` its state and step) cuts the log back to it, so rows logged after
    the checkpoint by the interrupted run are not repeated and the file reads as one uninterrupted
    trace. TensorBoard drops its events past the step (purge_step).
    """

    def __init__(
        self, run_dir: Path, tensorboard: bool, resume_step: int | None = None, resume_state: dict | None = None
    ):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            self._cut(resume_step, (resume_state or {}).get("bytes"))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._fh = self.path.open("a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)

    def _cut(self, step: int, size: int | None) -> None:
        if size is not None and size <= self.path.stat().st_size:
            with self.path.open("r+b") as fh:
                fh.truncate(size)
            return
        # A checkpoint from before the position was recorded: keep the rows up to its step.
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(k + "\n" for k in keep))

    def state_dict(self) -> dict:
        self._fh.flush()
        return {"bytes": self.path.stat().st_size}

    def log(self, step: int, scalars: dict) -> None:
        row = {"step": step, **scalars}
        self._fh.write(json.dumps(row, allow_nan=True) + "\n")
        self._fh.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k.replace(".", "/"), v, step)

    def close(self) -> None:
        self._fh.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
