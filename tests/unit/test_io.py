"""msmoe_dist.io: atomic writes leave the old file or the new one, and no temporary files."""

from __future__ import annotations

import multiprocessing
import os
import stat

import pytest

import msmoe_dist.io as mio
from msmoe_dist.io import TMP_PREFIX, atomic_output, atomic_write, temp_path_for


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_writes_bytes_and_str_and_overwrites(tmp_path):
    target = tmp_path / "a.json"
    atomic_write(target, b"\x00\x01bytes")
    assert target.read_bytes() == b"\x00\x01bytes"
    atomic_write(str(target), "Zürich\n")  # str paths too; str data is UTF-8
    assert target.read_bytes() == "Zürich\n".encode()
    assert os.listdir(tmp_path) == ["a.json"]


def test_failure_keeps_the_old_file_and_removes_the_temp_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []
    with pytest.raises(TypeError):
        atomic_write(target, 123)  # type: ignore[arg-type]
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_streamed_output(tmp_path):
    with atomic_output(tmp_path / "s.bin", fsync=False) as f:
        for i in range(3):
            f.write(bytes([i]))
        assert not (tmp_path / "s.bin").exists()  # nothing visible before the block ends
    assert (tmp_path / "s.bin").read_bytes() == b"\x00\x01\x02"


def test_fsync_flag(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(mio.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    atomic_write(tmp_path / "x", b"1", fsync=False)
    assert synced == []
    atomic_write(tmp_path / "x", b"2")
    assert len(synced) == 2  # the file before the rename, its directory after it
    assert (tmp_path / "x").read_bytes() == b"2"


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "p", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o644


def test_temp_names_are_unique_and_beside_the_target(tmp_path):
    names = {temp_path_for(tmp_path / "t.txt") for _ in range(100)}
    assert len(names) == 100
    for name in names:
        assert name.parent == tmp_path and name.name.startswith(f"{TMP_PREFIX}t.txt.{os.getpid()}.")


def _write_many(path: str, payload: bytes) -> None:
    for _ in range(50):
        atomic_write(path, payload, fsync=False)


def test_concurrent_writers_never_leave_a_mixed_file(tmp_path):
    target = tmp_path / "shared.bin"
    payloads = [bytes([i]) * 65536 for i in range(4)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(str(target), p)) for p in payloads]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert target.read_bytes() in payloads
    assert _leftovers(tmp_path) == []
