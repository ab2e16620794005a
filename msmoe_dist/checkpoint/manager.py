"""Saving and finding checkpoints: the write protocol, `latest`, pruning, resolving user paths.

Protocol of a save: rank 0 makes `.step_N.partial/`; a barrier; every part writes its files into it
(every rank); a barrier; rank 0 writes config.yaml and then the metadata (complete.json, atomically),
renames the directory to `step_N/` and only then replaces `latest` atomically. A crash at any point
leaves `latest` on the previous complete checkpoint, and a partial directory is never read.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from msmoe_dist.checkpoint.layout import CONFIG, LATEST, META, partial_dir_name, step_dir_name
from msmoe_dist.checkpoint.meta import CheckpointError, CheckpointMeta
from msmoe_dist.io import atomic_write


class CheckpointFiles(Protocol):
    """A part whose state is files in the checkpoint directory (the engine: weights, optimiser, RNG)."""

    def save_files(self, step_dir: Path) -> None: ...  # every rank, into the partial directory

    def load_files(self, step_dir: Path, meta: CheckpointMeta) -> None: ...


class Checkpointer:
    """Saves checkpoints under `root` (run_dir/checkpoints) and keeps the newest `keep_last`."""

    def __init__(self, root: Path, keep_last: int, is_main: bool = True, barrier: Callable[[], None] = lambda: None):
        self.root, self.keep_last, self.is_main, self.barrier = Path(root), keep_last, is_main, barrier

    def save(self, meta: CheckpointMeta, files: CheckpointFiles, config_yaml: str) -> Path:
        final = self.root / step_dir_name(meta.step)
        tmp = self.root / partial_dir_name(meta.step)
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
            tmp.mkdir()
        self.barrier()
        files.save_files(tmp)
        self.barrier()  # every rank has finished writing
        if self.is_main:
            atomic_write(tmp / CONFIG, config_yaml)
            atomic_write(tmp / META, meta.to_json())
            if final.exists():  # only a partial or superseded copy of this step can be here
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write(self.root / LATEST, final.name + "\n")
            self._prune(protect=final.name)
        self.barrier()
        return final

    def _prune(self, protect: str) -> None:
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in steps[: -self.keep_last]:
            if old.name != protect:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)


def is_complete(step_dir: Path) -> bool:
    return (step_dir / META).is_file()


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    marker = ckpt_root / LATEST
    if not marker.is_file():
        return None
    path = ckpt_root / marker.read_text().strip()
    return path if is_complete(path) else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accepts a run dir, its checkpoints/ dir, or one step_* dir; returns the complete step dir."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist (expected a run directory or a step_* checkpoint)")
    if is_complete(p):
        return p
    for root in (p / "checkpoints", p):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(
        f"no complete checkpoint under {p} (expected {p}/checkpoints/latest or a step_* dir with {META})"
    )


def torch_load(path: Path, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # corrupt or truncated file: say which one
        raise CheckpointError(f"cannot read checkpoint file {path}: {type(exc).__name__}: {exc}") from exc
