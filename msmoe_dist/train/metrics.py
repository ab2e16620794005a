"""metrics.jsonl (one JSON object per logged step) and TensorBoard scalars."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Lines past the checkpoint will be produced again by the resumed run: drop them so
            # the file reads as one uninterrupted trace.
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(k + "\n" for k in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._fh = self.path.open("a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        row = {"step": step, **{k: v for k, v in scalars.items()}}
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
