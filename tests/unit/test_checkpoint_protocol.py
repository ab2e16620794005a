"""The checkpoint protocol: `latest` moves only after a complete write; partial saves are never read."""

import pytest

from msmoe_dist.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    read_seal,
    resolve_checkpoint,
    save_checkpoint,
)


def writer(payload):
    def write(d):
        (d / "state.pt").write_text(payload)
    return write


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 2, writer("two"), {"engine": "native"}, "cfg: 1\n", keep_last=3)

    def dies(d):
        (d / "state.pt").write_text("half")
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, 4, dies, {"engine": "native"}, "", keep_last=3)
    assert (root / ".step_00000004.partial").exists()
    assert latest_checkpoint(root).name == "step_00000002"
    assert resolve_checkpoint(tmp_path).name == "step_00000002"
    assert (root / "step_00000002" / "state.pt").read_text() == "two"
    # the next save of that step clears the leftovers and completes
    save_checkpoint(root, 4, writer("four"), {"engine": "native"}, "", keep_last=3)
    assert not (root / ".step_00000004.partial").exists()
    assert read_seal(latest_checkpoint(root)) == {"step": 4, "engine": "native"}


def test_unsealed_directory_is_not_a_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000009").mkdir(parents=True)
    (root / "latest").write_text("step_00000009\n")  # a marker pointing at an unsealed dir is ignored
    assert latest_checkpoint(root) is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)


def test_keep_last_prunes_oldest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save_checkpoint(root, step, writer(str(step)), {"engine": "native"}, "", keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000003", "step_00000004"]
