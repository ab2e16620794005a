"""Optional Weights & Biases logging (`logging.wandb=true`): every metrics.jsonl row also goes to W&B.

Offline by default (`logging.wandb_mode=offline`): nothing leaves the machine, the run is written
under `run_dir/wandb/`, and `wandb sync run_dir/wandb/offline-run-*` uploads it later (from a login
node, say); `online` streams it (needs `wandb login` or WANDB_API_KEY). One W&B run per training
run: its id is kept in `run_dir/wandb_run_id`, so a resumed run continues the same W&B run
(`resume="allow"`). metrics.jsonl stays the exact record: after a resume W&B keeps the rows the
interrupted run sent after the checkpoint (it cannot delete them, unlike TensorBoard's purge), and
ignores re-sent steps it already has. Rank 0 alone logs. The numbers are the metrics.jsonl row's
(the wall-clock `time` column excluded: W&B keeps its own).
"""

from __future__ import annotations

import importlib.util
import secrets
from pathlib import Path

from msmoe_dist.train.errors import TrainError

ID_FILE = "wandb_run_id"


def require_wandb(enabled: bool) -> None:
    """Refuses `logging.wandb=true` without the package, before the run writes anything."""
    if enabled and importlib.util.find_spec("wandb") is None:
        raise TrainError(
            "logging.wandb=true needs the wandb package, which is not installed; expected "
            '`pip install wandb` (or the project\'s extra: pip install -e ".[wandb]"), or logging.wandb=false'
        )


class WandbSink:
    """One W&B run under run_dir/wandb; `log(step, scalars)` per metrics row, `close()` at the end."""

    def __init__(self, run_dir: Path, project: str, mode: str, config: dict):
        import wandb

        id_file = run_dir / ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        if not id_file.is_file():
            id_file.write_text(run_id + "\n")
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            name=run_dir.resolve().name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode="online" if mode == "online" else "offline",
            config=config,
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, step: int, scalars: dict) -> None:
        row = {k: v for k, v in scalars.items() if k != "time" and isinstance(v, (int, float))}
        self.run.log(row, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # waits until W&B's service has written everything (finish() alone may return earlier)
