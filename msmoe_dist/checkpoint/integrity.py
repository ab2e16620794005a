"""Checksums of a checkpoint's files: recorded in its metadata at save, verified before they are read.

``file_digests(step_dir)`` gives ``{relative path: {"bytes": size, "blake2b": hex}}`` for every file
of a checkpoint except the metadata itself (which holds the table and is written after it).
BLAKE2b is in the standard library, runs at several hundred MB/s per core and, unlike a CRC, any
change of any byte changes it; saving stays I/O-bound. The files are hashed after their writers
closed them, not while writing: the engines write them through torch.save and DeepSpeed's own
checkpoint code, which take a path, and the bytes are read back from the page cache right after.

``verify_files`` checks the size first (a truncated file is named without reading it), then the
digest; ``CheckpointCorrupt`` names every file that differs. A checkpoint saved before checksums were
recorded has no table: it cannot be verified, and callers say so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from msmoe_dist.checkpoint.layout import META
from msmoe_dist.checkpoint.meta import CheckpointError, CheckpointMeta
from msmoe_dist.io import TMP_PREFIX

ALGORITHM = "blake2b"
_CHUNK = 1 << 22  # 4 MiB reads: hashlib releases the GIL on buffers this large


class CheckpointCorrupt(CheckpointError):
    """A checkpoint whose files differ from the checksums recorded when it was saved."""


def digest_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=32)
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digests(step_dir: Path) -> dict[str, dict]:
    """Size and digest of every file under ``step_dir`` (recursively), except the metadata and temp files."""
    out: dict[str, dict] = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(step_dir).as_posix()
        if rel == META or path.name.startswith(TMP_PREFIX):
            continue
        out[rel] = {"bytes": path.stat().st_size, ALGORITHM: digest_file(path)}
    return out


def verify_files(step_dir: Path, meta: CheckpointMeta, only: Callable[[str], bool] | None = None) -> bool:
    """Checks the recorded files (those ``only`` accepts) against their sizes and digests.

    Returns False when the checkpoint records no checksums (saved before they existed: not
    verifiable), True when every checked file matches; raises CheckpointCorrupt naming each file
    that is missing, has another size, or another digest.
    """
    if not meta.files:
        return False
    problems = []
    for rel, want in meta.files.items():
        if only is not None and not only(rel):
            continue
        path = step_dir / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = path.stat().st_size
        if size != want.get("bytes"):
            problems.append(f"{rel} has {size} bytes, {want.get('bytes')} when saved (truncated or overwritten)")
        elif digest_file(path) != want.get(ALGORITHM):
            problems.append(f"{rel} does not match its {ALGORITHM} checksum (bytes changed since it was saved)")
    if problems:
        raise CheckpointCorrupt(f"checkpoint {step_dir} is corrupt: {'; '.join(problems)}")
    return True
