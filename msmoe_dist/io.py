"""Atomic file writes: a reader sees the old file or the new one, never half of either.

The bytes go to a temporary file in the target's own directory (``os.replace`` is atomic only
within one file system), which then replaces the target.  With ``fsync=True`` the data is
flushed to disk before the rename and the directory after it, so the new file also survives a
power cut; pass ``fsync=False`` for files that are cheap to rebuild (caches).

Temporary names are ``.tmp-<name>.<pid>.<random hex>``: processes (say, every rank writing the
same file) never share one, and the file is created exclusively, so even an unlikely clash
fails loudly instead of mixing writes.  Code that owns a directory may treat leftovers with the
``.tmp-`` prefix (from a crash) as its own.  The new file gets the usual permissions
(0o666 minus the umask), as a plain ``open(path, "w")`` would give it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TMP_PREFIX = ".tmp-"

# Directory fsync is not supported everywhere (some network and FUSE file systems refuse it);
# the rename has happened by then, so the write itself succeeded.
_NO_DIR_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES}


def temp_path_for(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path`` (same directory), unique to this process and call."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}")


def _fsync_directory(folder: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags)
    except OSError as exc:
        if exc.errno in _NO_DIR_FSYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into, for content streamed in pieces.

    The target is replaced when the block ends without an exception; on an exception the
    temporary file is removed and the target is left as it was.  The directory must exist.
    """
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "xb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_directory(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, fsync: bool = True) -> None:
    """Replace the file at ``path`` with ``data`` (``str`` is written as UTF-8) atomically."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_output(path, fsync=fsync) as f:
        f.write(data)
