"""Checkpoints in the run directory, for both engines.

Layout:  <run_dir>/checkpoints/step_00000100/   one complete checkpoint:
             complete.json      written last: step, engine, world size, ep_size, ... (the seal)
             config.yaml        the resolved configuration
             state.pt           native engine: model, optimiser, schedule, RNG, step
             <DeepSpeed files>  deepspeed engine: DeepSpeed's model/optimiser files, plus
             experts_ep000.pt   ... one file of expert weights per expert-parallel rank, and
             rank00000.pt       ... one file of RNG state per rank
         <run_dir>/checkpoints/latest   the name of the newest complete checkpoint

Protocol: every rank writes into `.step_N.partial/`; a barrier; rank 0 seals it (complete.json),
renames it to `step_N/`, and only then replaces `latest` atomically. A crash at any point leaves
`latest` on the previous complete checkpoint, and a partial directory is never read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

LATEST = "latest"
SEAL = "complete.json"


class CheckpointError(ValueError):
    """A checkpoint path that cannot be used (one-line message)."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    write_rank_files: Callable[[Path], None],
    seal: dict,
    config_yaml: str,
    keep_last: int,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Runs the protocol above; `write_rank_files(dir)` writes this rank's files into `dir`."""
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".{final.name}.partial"
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        tmp.mkdir()
    barrier()
    write_rank_files(tmp)
    barrier()  # every rank has finished writing
    if is_main:
        (tmp / "config.yaml").write_text(config_yaml)
        atomic_write_text(tmp / SEAL, json.dumps({"step": step, **seal}, indent=1) + "\n")
        if final.exists():  # only a partial or superseded copy of this step can be here
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(ckpt_root / LATEST, final.name + "\n")
        _prune(ckpt_root, keep_last, protect=final.name)
    barrier()
    return final


def _prune(ckpt_root: Path, keep_last: int, protect: str) -> None:
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def is_complete(step_dir: Path) -> bool:
    return (step_dir / SEAL).is_file()


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    marker = ckpt_root / LATEST
    if not marker.is_file():
        return None
    path = ckpt_root / marker.read_text().strip()
    return path if is_complete(path) else None


def read_seal(step_dir: Path) -> dict:
    try:
        return json.loads((step_dir / SEAL).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {step_dir / SEAL}: {exc}") from exc


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
        f"no complete checkpoint under {p} (expected {p}/checkpoints/latest or a step_* dir with {SEAL})"
    )


def torch_load(path: Path, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # corrupt or truncated file: say which one
        raise CheckpointError(f"cannot read checkpoint file {path}: {type(exc).__name__}: {exc}") from exc
