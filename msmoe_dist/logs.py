"""One logging setup for every msmoe_dist process: timestamped, rank-prefixed lines on stderr.

    2026-12-01T20:45:03Z [rank 1] msmoe-train: rank 1: skipped unreadable image ...
    2026-12-01T20:45:04Z msmoe-train: resuming from step 200 (runs/x/checkpoints/step_00000200)

Each command calls `setup_logging()` first (the rank comes from the launcher's RANK/WORLD_SIZE) and
the process-group start-up calls it again with the rank torch.distributed assigned. The `[rank N]`
prefix appears only when several processes run. Python warnings go through the same handler
(`logging.captureWarnings`), so a warning from any rank says when and whose it is. Status lines use
`info()`; the one-line error a command exits with stays a plain `msmoe-train: ...` line (a
contract scripts rely on), and the progress bar on a terminal stays tqdm's.
Times are UTC (ISO 8601, `Z`), so logs of nodes in different zones line up.
"""

from __future__ import annotations

import logging
import os
import sys
import time

LOGGER = logging.getLogger("msmoe_dist")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class _StderrHandler(logging.Handler):
    """Writes to the current sys.stderr (tests and wrappers replace it after start-up)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never take the run down
            self.handleError(record)


class _Formatter(logging.Formatter):
    def __init__(self, prefix: str):
        super().__init__(f"%(asctime)s{prefix} %(message)s", _TIME_FORMAT)
        self.converter = time.gmtime  # UTC

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).rstrip("\n")


def _rank_from_env() -> tuple[int, int]:
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def setup_logging(rank: int | None = None, world_size: int | None = None) -> None:
    """Install the handler on the package's logger and on Python warnings (idempotent; the last call's
    rank wins)."""
    env_rank, env_world = _rank_from_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    handler = next((h for h in LOGGER.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        LOGGER.addHandler(handler)
        logging.getLogger("py.warnings").addHandler(handler)
    handler.setFormatter(_Formatter(f" [rank {rank}]" if world_size > 1 else ""))
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    logging.getLogger("py.warnings").propagate = False
    logging.captureWarnings(False)  # re-install: someone (a test harness) may have replaced showwarning since
    logging.captureWarnings(True)


def info(message: str) -> None:
    """A status line on stderr, timestamped (and rank-prefixed when several processes run)."""
    if not any(isinstance(h, _StderrHandler) for h in LOGGER.handlers):  # others' (pytest's capture) do not count
        setup_logging()
    LOGGER.info(message)
