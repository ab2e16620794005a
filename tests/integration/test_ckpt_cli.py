"""msmoe-ckpt (inspect, verify, convert --to-full) on a native run, and the resume refusals of issue 17:
another model, a changed global batch without train.allow_batch_change (one line, exit 2, nothing
written), and what happens with the flag."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_lm_config

from msmoe_dist.checkpoint import CheckpointError
from msmoe_dist.ckpt_cli import main as ckpt
from msmoe_dist.train.trainer import run


@pytest.fixture(scope="module")
def native_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt_cli")
    run(tiny_lm_config(tmp, "train.max_steps=4", "logging.tensorboard=false"))
    return tmp


def _snapshot(run_dir):
    return {p.relative_to(run_dir).as_posix(): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


def test_verify_inspect_convert(native_run, tmp_path, capsys):
    run_dir = native_run / "run"
    assert ckpt(["verify", str(run_dir)]) == 0
    assert "files match their recorded digests" in capsys.readouterr().out
    assert ckpt(["inspect", str(run_dir), "train.max_steps=9", "parallel.engine=deepspeed"]) == 0
    out = capsys.readouterr().out
    assert "step: 4" in out and "engine=native" in out and "resumable at another layout: yes" in out
    assert "train.max_steps: 4 -> 9" in out and "config differences (2)" in out and "is allowed" in out
    assert ckpt(["inspect", str(run_dir), "--world-size", "2"]) == 0  # 2 ranks x 4 samples: another global batch
    assert "refused: cannot resume step_00000004: the global batch changes from 4 to 8" in capsys.readouterr().out
    assert ckpt(["inspect", str(run_dir), "model.d_model=64"]) == 0
    assert "a resume with this config is refused: " in capsys.readouterr().out

    out_file = tmp_path / "full.pt"
    assert ckpt(["convert", str(run_dir), "--to-full", str(out_file)]) == 0
    full = torch.load(out_file, weights_only=True)  # plain torch, no pickled objects
    state = torch.load(run_dir / "checkpoints" / "step_00000004" / "state.pt", weights_only=False)
    assert full["step"] == 4 and full["scheduler"]["last_epoch"] == 4 and "rng" not in full
    assert full["model"].keys() == state["model"].keys()
    experts = [k for k in full["model"] if k.endswith("experts.w1")]
    assert experts and all(full["model"][k].shape[0] == 4 for k in experts)  # every expert
    for i, name in enumerate(state["param_names"]):  # the optimiser state, now keyed by name
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(full["optimizer"][name][key], state["optimizer"]["state"][i][key]), (name, key)

    # a changed byte: verify names the file, exit 2, one line; convert writes nothing
    bad = tmp_path / "bad"
    shutil.copytree(run_dir / "checkpoints" / "step_00000004", bad)
    raw = bytearray((bad / "state.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (bad / "state.pt").write_bytes(raw)
    assert ckpt(["verify", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "state.pt does not match its blake2b checksum" in err and err.count("\n") == 1
    assert ckpt(["convert", str(bad), "--to-full", str(tmp_path / "no.pt")]) == 2
    assert not (tmp_path / "no.pt").exists()


def test_resume_refusals_and_batch_change(native_run, tmp_path, cli, capfd):
    run_dir = native_run / "run"
    before = _snapshot(run_dir)
    base = [f"{k}={v}" for k, v in {"train.run_dir": run_dir, "data.path": native_run / "data"}.items()]
    tiny = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.max_seq_len=16", "data.seq_len=16"]
    common = [*base, *tiny, "moe.num_experts=4", "moe.expert_ffn_dim=32", "data.synthetic_lines=400"]
    common += ["train.progress=false", "train.max_steps=6", "train.resume=true", "checkpoint.every_steps=2"]
    res = cli("train", *common, "data.batch_size=8")  # global batch 4 -> 8
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert "the global batch changes from 4 to 8 samples" in line and "train.allow_batch_change=true" in line
    with pytest.raises(CheckpointError, match="the network differs: model.d_model=64"):
        run(tiny_lm_config(native_run, "model.d_model=64", "train.max_steps=6", "train.resume=true"))
    with pytest.raises(
        CheckpointError, match="the micro-batch changes while the global batch stays 4 samples"
    ):  # same global batch, other micro-batch
        run(
            tiny_lm_config(
                native_run, "data.batch_size=2", "train.grad_accum_steps=2", "train.max_steps=6", "train.resume=true"
            )
        )
    assert _snapshot(run_dir) == before  # nothing written by any refusal

    # with the flag: continues at step 4 with the new batch, and says so
    forked = tmp_path / "run"
    shutil.copytree(run_dir, forked)
    capfd.readouterr()
    run(
        tiny_lm_config(
            tmp_path,
            f"data.path={native_run / 'data'}",
            "data.batch_size=8",
            "train.max_steps=5",
            "train.resume=true",
            "train.allow_batch_change=true",
            "logging.tensorboard=false",
        )
    )
    err = capfd.readouterr().err
    assert "the global batch changes from 4 to 8 samples" in err and "continues at step 4 with the new batch" in err
    rows = [json.loads(r) for r in (forked / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-1] == 5
