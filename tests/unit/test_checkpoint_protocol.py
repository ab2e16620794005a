"""The checkpoint protocol: `latest` moves only after a complete write; partial saves are never read;
the metadata round-trips in the on-disk format older checkpoints have; one check names every difference."""

import dataclasses
import json
from pathlib import Path

import pytest

from msmoe_dist.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointMeta,
    latest_checkpoint,
    read_meta,
    resolve_checkpoint,
)
from msmoe_dist.config import load_config
from msmoe_dist.config.loader import config_to_dict
from msmoe_dist.config.model_spec import ModelSpec

LAYOUT = {"engine": "native", "world_size": 1, "ep_size": 1, "zero_stage": None, "dtype": "fp32"}


class Files:
    def __init__(self, payload, die=False):
        self.payload, self.die = payload, die

    def save_files(self, step_dir):
        (step_dir / "state.pt").write_text(self.payload)
        if self.die:
            raise KeyboardInterrupt("killed mid-write")

    def load_files(self, step_dir, meta):
        raise AssertionError("not used")


def meta(step):
    return CheckpointMeta(step, LAYOUT, {})


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path / "checkpoints", keep_last=3)
    ck.save(meta(2), Files("two"), "cfg: 1\n")
    with pytest.raises(KeyboardInterrupt):
        ck.save(meta(4), Files("half", die=True), "")
    root = tmp_path / "checkpoints"
    assert (root / ".step_00000004.partial").exists()
    assert latest_checkpoint(root).name == "step_00000002"
    assert resolve_checkpoint(tmp_path).name == "step_00000002"
    assert (root / "step_00000002" / "state.pt").read_text() == "two"
    assert (root / "step_00000002" / "config.yaml").read_text() == "cfg: 1\n"
    # the next save of that step clears the leftovers and completes
    ck.save(meta(4), Files("four"), "")
    assert not (root / ".step_00000004.partial").exists()
    assert read_meta(latest_checkpoint(root)).step == 4


def test_unsealed_directory_is_not_a_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000009").mkdir(parents=True)
    (root / "latest").write_text("step_00000009\n")  # a marker pointing at a directory without metadata is ignored
    assert latest_checkpoint(root) is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)


def test_keep_last_prunes_oldest(tmp_path):
    ck = Checkpointer(tmp_path / "checkpoints", keep_last=2)
    for step in (1, 2, 3, 4):
        ck.save(meta(step), Files(str(step)), "")
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]


def test_metadata_keeps_the_flat_on_disk_format(tmp_path):
    m = CheckpointMeta(
        7, LAYOUT, {"model": {"d_model": 8}}, {"vocab_size": 10, "vocab_sha256": "ab"}, {"metrics": {"bytes": 12}}
    )
    Checkpointer(tmp_path, keep_last=1).save(m, Files("x"), "")
    on_disk = json.loads((tmp_path / "step_00000007" / "complete.json").read_text())
    files = on_disk.pop("files")
    assert on_disk == {
        "step": 7,
        **LAYOUT,
        "config": {"model": {"d_model": 8}},
        "vocab_size": 10,
        "vocab_sha256": "ab",
        "parts": {"metrics": {"bytes": 12}},
    }
    assert sorted(files) == ["config.yaml", "state.pt"] and files["state.pt"]["bytes"] == 1
    assert read_meta(tmp_path / "step_00000007") == dataclasses.replace(m, files=files)
    # a checkpoint written before the metadata had a name (no parts) reads the same way
    old = {"step": 3, **LAYOUT, "config": {}, "num_classes": 10, "classes": ["a"]}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "complete.json").write_text(json.dumps(old))
    assert read_meta(tmp_path / "old") == CheckpointMeta(3, LAYOUT, {}, {"num_classes": 10, "classes": ["a"]})


def test_one_check_names_every_difference():
    cfg = load_config(None, ["data.batch_size=4", "train.grad_accum_steps=2"])  # global batch 4 x 2 x 2 = 16
    ds = {**LAYOUT, "engine": "deepspeed", "world_size": 2, "ep_size": 2, "zero_stage": 1}
    saved = CheckpointMeta(4, ds, config_to_dict(cfg))
    now = load_config(None, ["moe.num_experts=4", "model.d_model=64"])
    batch = {"batch_size": 4, "grad_accum_steps": 2, "world_size": 4}  # global batch 16 -> 32
    with pytest.raises(CheckpointError) as err:
        saved.check_resume(
            Path("step_00000004"), {**ds, "world_size": 4, "ep_size": 3, "zero_stage": 2}, ModelSpec.of(now), batch
        )
    msg = str(err.value)
    for needle in (
        "cannot resume step_00000004",
        "moe.num_experts",
        "model.d_model",
        "parallel.ep_size=3 does not divide moe.num_experts=",
        "the global batch changes from 16 to 32 samples",
        "train.allow_batch_change=true",
    ):
        assert needle in msg, (needle, msg)
    assert "\n" not in msg
    # another layout with the same global batch (world 4, grad_accum 1 <- world 2, grad_accum 2) is allowed
    notes = saved.check_resume(
        Path("s"),
        {**ds, "world_size": 4, "ep_size": 4, "zero_stage": 2},
        ModelSpec.of(cfg),
        {"batch_size": 4, "grad_accum_steps": 1, "world_size": 4},
    )
    assert notes == [
        "the layout changes: world_size=4 (checkpoint: 2), ep_size=4 (checkpoint: 2), zero_stage=2 (checkpoint: 1); "
        "weights, optimiser state and schedule are re-partitioned"
    ]
    # another micro-batch size with the same global batch: refused (the data order is per micro-batch) ...
    other_micro = {"batch_size": 2, "grad_accum_steps": 4, "world_size": 2}
    with pytest.raises(CheckpointError, match="data.batch_size 4 -> 2"):
        saved.check_resume(Path("s"), ds, ModelSpec.of(cfg), other_micro)
    # ... unless allowed, and then said
    (note,) = saved.check_resume(Path("s"), ds, ModelSpec.of(cfg), other_micro, allow_batch_change=True)
    assert "continues at step 4 with the new batch" in note
    # the native engine keeps fp32 weights: its dtype may change; the weights-only check ignores the layout
    native = CheckpointMeta(4, LAYOUT, config_to_dict(cfg))
    assert native.check_resume(Path("s"), {**LAYOUT, "dtype": "bf16"}, ModelSpec.of(cfg)) == []
    saved.check_weights(Path("s"), ModelSpec.of(cfg))
    with pytest.raises(CheckpointError, match="moe.num_experts"):
        saved.check_weights(Path("s"), ModelSpec.of(now))


def test_newest_sealed_checkpoint_wins_over_the_marker(tmp_path):
    ck = Checkpointer(tmp_path / "checkpoints", keep_last=3)
    ck.save(meta(2), Files("two"), "")
    root = tmp_path / "checkpoints"
    (root / "step_00000004").mkdir()  # unsealed, and `latest` names it (say, its complete.json was lost)
    (root / "latest").write_text("step_00000004\n")
    assert latest_checkpoint(root).name == "step_00000002"
    (root / "latest").unlink()  # a crash between the rename and the marker
    ck2 = Checkpointer(root, keep_last=3)
    ck2.save(meta(6), Files("six"), "")
    (root / "latest").write_text("step_00000002\n")
    assert latest_checkpoint(root).name == "step_00000006"
    assert resolve_checkpoint(tmp_path).name == "step_00000006"


def test_a_sealed_checkpoint_is_never_replaced(tmp_path):
    ck = Checkpointer(tmp_path / "checkpoints", keep_last=3)
    ck.save(meta(2), Files("two"), "")
    with pytest.raises(CheckpointError, match="refusing to replace the sealed checkpoint"):
        ck.save(meta(2), Files("again"), "")
    assert (tmp_path / "checkpoints" / "step_00000002" / "state.pt").read_text() == "two"
    # an unsealed leftover of a step is not a checkpoint: a save of that step replaces it
    (tmp_path / "checkpoints" / "step_00000004").mkdir()
    ck.save(meta(4), Files("four"), "")
    assert (tmp_path / "checkpoints" / "step_00000004" / "state.pt").read_text() == "four"
