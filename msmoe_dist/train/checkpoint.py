"""Checkpoints in the run directory.

Layout:  <run_dir>/checkpoints/step_00000100/state.pt   (+ config.yaml beside it)
         <run_dir>/checkpoints/latest                   (text: the name of the newest complete one)
A checkpoint is written into a temporary directory and renamed into place; the `latest` marker is
replaced atomically only afterwards, so a crash mid-write never leaves `latest` pointing at a
partial checkpoint and never damages the previous one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint path that cannot be used (one-line message)."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(ckpt_root: Path, step: int, state: dict, config_yaml: str, keep_last: int) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    if final.exists():  # re-saving the same step (e.g. after resume): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_root / LATEST, final.name + "\n")
    _prune(ckpt_root, keep_last, protect=final.name)
    return final


def _prune(ckpt_root: Path, keep_last: int, protect: str) -> None:
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    marker = ckpt_root / LATEST
    if not marker.is_file():
        return None
    path = ckpt_root / marker.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accepts a run dir, its checkpoints/ dir, or one step_* dir; returns the step dir."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist (expected a run directory or a step_* checkpoint)")
    if (p / "state.pt").is_file():
        return p
    for root in (p / "checkpoints", p):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(f"no complete checkpoint under {p} (expected {p}/checkpoints/latest or a step_* dir with state.pt)")


def load_state(step_dir: Path, map_location="cpu") -> dict:
    try:
        return torch.load(step_dir / "state.pt", map_location=map_location, weights_only=False)
    except Exception as exc:  # corrupt or truncated file: say which one
        raise CheckpointError(f"cannot read checkpoint {step_dir / 'state.pt'}: {type(exc).__name__}: {exc}") from exc
