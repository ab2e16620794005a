"""Saving and finding checkpoints: the write protocol, `latest`, pruning, resolving user paths.

Protocol of a save: rank 0 makes `.step_N.partial/`; a barrier; every part writes its files into it
(every rank); a barrier; rank 0 writes config.yaml and then the metadata (complete.json, atomically),
renames the directory to `step_N/` and only then replaces `latest` atomically. A crash at any point
leaves `latest` on the previous complete checkpoint, and a partial directory is never read.

Before the metadata, rank 0 records the size and checksum of every file in the partial directory
(every rank's and DeepSpeed's files: all are written by then), so a reader can tell a bit-flipped or
truncated file (integrity.py). A sealed checkpoint (one with complete.json) is never replaced: a save
of a step that already has one is refused on every rank before anything is written.

Readers take the newest *sealed* `step_*` directory (`latest_checkpoint`), not whatever `latest`
names: a crash between the rename and the marker, or a marker left pointing at a directory that
lost its metadata, must not make a run look empty (a fresh start would then overwrite it).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from msmoe_dist.checkpoint.integrity import file_digests
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
        if is_complete(final):  # every rank sees the same directory: all refuse together, nobody waits
            raise CheckpointError(
                f"refusing to replace the sealed checkpoint {final} (a run never overwrites its own "
                "checkpoints; expected train.resume=true to continue from the newest one)"
            )
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
            tmp.mkdir()
        self.barrier()
        files.save_files(tmp)
        self.barrier()  # every rank has finished writing
        if self.is_main:
            atomic_write(tmp / CONFIG, config_yaml)
            # hashed after every writer closed its file (they write through torch.save/DeepSpeed)
            meta = dataclasses.replace(meta, files=file_digests(tmp))
            atomic_write(tmp / META, meta.to_json())
            if final.exists():  # an unsealed leftover of this step (sealed ones were refused above)
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write(self.root / LATEST, final.name + "\n")
            self._prune(protect=final.name)
        self.barrier()
        return final

    def _prune(self, protect: str) -> None:
        # Only sealed checkpoints count and go; an unsealed leftover is replaced by the next save of its
        # step, and a set-aside step_N.corrupt is never touched.
        steps = sealed_checkpoints(self.root)[::-1]  # oldest first
        for old in steps[: -self.keep_last]:
            if old.name != protect:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)


_STEP_DIR = re.compile(r"step_\d{8}")  # step_dir_name's form; set-aside copies (step_N.corrupt) do not match


def is_complete(step_dir: Path) -> bool:
    return (step_dir / META).is_file()


def sealed_checkpoints(ckpt_root: Path) -> list[Path]:
    """Every sealed checkpoint under ``ckpt_root`` (a step_* dir with its metadata), newest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if _STEP_DIR.fullmatch(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest sealed checkpoint (``latest`` names it after every complete save; this also holds
    when a crash fell between the rename and the marker, or the marker names an unsealed directory)."""
    found = sealed_checkpoints(ckpt_root)
    return found[0] if found else None


def set_aside(step_dir: Path, why: str) -> Path:
    """Renames a checkpoint out of the way (never deletes it): step_N -> step_N.<why>[.k]."""
    target = step_dir.with_name(f"{step_dir.name}.{why}")
    k = 1
    while target.exists():
        target, k = step_dir.with_name(f"{step_dir.name}.{why}.{k}"), k + 1
    os.replace(step_dir, target)
    return target


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
