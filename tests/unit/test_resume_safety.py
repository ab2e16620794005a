"""Nothing lost, nothing silent, on resume: corrupt checkpoints are named and skipped (never deleted),
an unsealed newest checkpoint does not restart the run, changed settings are listed or refused, and
bad run directories or metrics logs stop with one line. Each runs the real trainer in-process on a
tiny model (a few seconds)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import tiny_lm_config

from msmoe_dist.checkpoint import CheckpointCorrupt, CheckpointError, load_full_weights, resolve_checkpoint
from msmoe_dist.errors import UserError
from msmoe_dist.train import trainer


def tiny_cfg(tmp_path, *extra):
    return tiny_lm_config(tmp_path, "train.max_steps=4", "checkpoint.keep_last=5", "logging.tensorboard=false", *extra)


def ckpt(tmp_path, step):
    return tmp_path / "run" / "checkpoints" / f"step_{step:08d}"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def steps_logged(tmp_path):
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def flip_64_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    path.write_bytes(bytes(data))


@pytest.fixture
def two_checkpoints(tmp_path):
    """A run of 4 steps with sealed checkpoints at steps 2 and 4."""
    trainer.run(tiny_cfg(tmp_path))
    assert ckpt(tmp_path, 2).is_dir() and ckpt(tmp_path, 4).is_dir()
    return tmp_path


@pytest.mark.parametrize("damage", ["bit_flip", "truncate"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(two_checkpoints, capsys, damage):
    tmp_path = two_checkpoints
    state = ckpt(tmp_path, 4) / "state.pt"
    if damage == "bit_flip":
        flip_64_bytes(state)  # torch.load still succeeds on these bytes: only the checksum can tell
    else:
        state.write_bytes(state.read_bytes()[:1000])
    damaged = state.read_bytes()
    capsys.readouterr()
    trainer.run(tiny_cfg(tmp_path, "train.max_steps=6", "train.resume=true"))
    err = capsys.readouterr().err
    assert "step_00000004" in err and "state.pt" in err and "resuming from step_00000002" in err, err
    kept = ckpt(tmp_path, 4).with_name("step_00000004.corrupt")
    assert (kept / "state.pt").read_bytes() == damaged  # the bad one is kept, untouched
    assert steps_logged(tmp_path) == [1, 2, 3, 4, 5, 6]  # continued from step 2: rows 3, 4 logged anew
    assert resolve_checkpoint(tmp_path / "run").name == "step_00000006"


def test_on_corrupt_fail_names_the_file_and_changes_nothing(two_checkpoints):
    tmp_path = two_checkpoints
    flip_64_bytes(ckpt(tmp_path, 4) / "state.pt")
    with pytest.raises(CheckpointCorrupt, match=r"step_00000004.*state\.pt.*checksum"):
        trainer.run(tiny_cfg(tmp_path, "train.max_steps=6", "train.resume=true", "checkpoint.on_corrupt=fail"))
    assert ckpt(tmp_path, 4).is_dir() and not ckpt(tmp_path, 4).with_name("step_00000004.corrupt").exists()


def test_init_from_and_eval_refuse_a_corrupt_checkpoint(two_checkpoints):
    tmp_path = two_checkpoints
    flip_64_bytes(ckpt(tmp_path, 4) / "state.pt")
    with pytest.raises(CheckpointCorrupt, match=r"state\.pt"):
        load_full_weights(resolve_checkpoint(tmp_path / "run"))  # what msmoe-eval reads
    with pytest.raises(CheckpointCorrupt, match=r"state\.pt"):
        trainer.run(
            tiny_cfg(tmp_path, f"train.run_dir={tmp_path / 'other'}", f"checkpoint.init_from={tmp_path / 'run'}")
        )


def test_auto_resume_with_an_unsealed_newest_checkpoint_resumes_from_the_sealed_one(two_checkpoints):
    tmp_path = two_checkpoints
    (ckpt(tmp_path, 4) / "complete.json").unlink()  # step 4 unsealed; `latest` still names it
    sealed = digest(ckpt(tmp_path, 2) / "state.pt")
    sealed_meta = (ckpt(tmp_path, 2) / "complete.json").read_text()
    trainer.run(tiny_cfg(tmp_path, "train.max_steps=6", "train.auto_resume=true"))
    assert steps_logged(tmp_path) == [1, 2, 3, 4, 5, 6]  # not a restart from step 0
    assert digest(ckpt(tmp_path, 2) / "state.pt") == sealed  # the sealed checkpoint was not replaced
    assert (ckpt(tmp_path, 2) / "complete.json").read_text() == sealed_meta
    assert resolve_checkpoint(tmp_path / "run").name == "step_00000006"


def test_changed_settings_on_resume_are_listed_or_refused(two_checkpoints, capsys):
    tmp_path = two_checkpoints
    for bad, key in [("optim.lr=1e30", "optim.lr"), ("optim.name=sgd", "optim.name"), ("data.batch_size=2", "data")]:
        with pytest.raises(CheckpointError) as info:
            trainer.run(tiny_cfg(tmp_path, "train.max_steps=6", "train.resume=true", bad))
        msg = str(info.value)
        assert key in msg and "checkpoint.init_from=" in msg and "\n" not in msg, msg
    assert steps_logged(tmp_path) == [1, 2, 3, 4]  # nothing was trained by the refused runs
    capsys.readouterr()
    trainer.run(tiny_cfg(tmp_path, "train.max_steps=6", "train.resume=true", "logging.log_every=2"))
    err = [ln for ln in capsys.readouterr().err.splitlines() if "changed settings" in ln]
    assert len(err) == 1 and "train.max_steps=6 (checkpoint: 4)" in err[0] and "logging.log_every=2" in err[0], err


def test_a_run_dir_that_is_a_file_or_unwritable_is_one_line(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(UserError, match="is a file"):
        trainer.run(tiny_cfg(tmp_path))
    # /proc takes no new directories, even for root (a chmod would not stop root)
    with pytest.raises(UserError, match="cannot write to train.run_dir"):
        trainer.run(tiny_cfg(tmp_path, "train.run_dir=/proc/msmoe_no_such_dir/run"))
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(UserError, match="cannot write to train.run_dir"):
            trainer.run(tiny_cfg(tmp_path, f"train.run_dir={ro}"))


def test_a_corrupt_metrics_line_on_resume_is_one_line(two_checkpoints):
    tmp_path = two_checkpoints
    meta_path = ckpt(tmp_path, 4) / "complete.json"
    meta = json.loads(meta_path.read_text())
    del meta["parts"]  # as a checkpoint saved before the log position was recorded: the log is cut by step
    meta_path.write_text(json.dumps(meta))
    log = tmp_path / "run" / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 5, "loss": 1.\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl line \d+ is not a JSON object"):
        trainer.run(tiny_cfg(tmp_path, "train.max_steps=6", "train.resume=true"))


def test_no_shipped_config_sets_overwrite():
    import yaml

    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert files
    for path in files:
        train = (yaml.safe_load(path.read_text()) or {}).get("train") or {}
        assert "overwrite" not in train, f"{path} sets train.overwrite: re-running it would delete the previous run"
