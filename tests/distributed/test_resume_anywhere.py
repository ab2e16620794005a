"""train.resume=true across layouts (gloo, spawned ranks, a tiny language model, 6 steps, checkpoint at 3).

Layouts here (chosen for a 2-core CI; docs/resume.md lists them):
  DS(2,2,2)  DeepSpeed, world 2, EP 2, ZeRO 2, grad_accum 1   -- the saving run, uninterrupted to step 6
  N(1)       native, world 1, grad_accum 2                    -- the same global batch, forward by forward
  DS(2,1,1)  DeepSpeed, world 2, EP 1, ZeRO 1
Resumes: DS(2,2,2) step 3 -> N(1) and -> DS(2,1,1); N(1) step 3 -> DS(2,2,2). Each resumed loss trace
(steps 4-6) equals the uninterrupted one to 1e-5 relative (a layout changes only the order of
floating-point sums; the data order is the saving run's, data.batches.data_slot). The optimiser moments,
master weights and schedule of every parameter, read back from the new layout's engine, equal the
saved ones exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from msmoe_dist.checkpoint import CheckpointMeta, read_meta
from msmoe_dist.checkpoint.full_state import assemble_full_state

STEP = 3


def _args(root: Path, run: str, *extra: str) -> list[str]:
    return [
        f"train.run_dir={root / run}",
        f"data.path={root / 'data'}",
        "data.synthetic_lines=400",
        "data.batch_size=2",
        "data.seq_len=16",
        "model.num_layers=2",
        "model.d_model=32",
        "model.num_heads=2",
        "model.max_seq_len=16",
        "model.dropout=0.0",
        "moe.num_experts=4",
        "moe.expert_ffn_dim=32",
        "optim.lr=0.01",
        "optim.warmup_steps=2",
        "parallel.timeout_s=120",
        "train.max_steps=6",
        "train.progress=false",
        "train.eval_batches=1",
        "logging.log_every=1",
        "logging.tensorboard=false",
        "checkpoint.every_steps=3",
        *extra,
    ]


DS222 = ("parallel.engine=deepspeed", "parallel.ep_size=2", "parallel.zero_stage=2")
DS211 = ("parallel.engine=deepspeed", "parallel.ep_size=1", "parallel.zero_stage=1")
NATIVE = ("parallel.engine=native", "train.grad_accum_steps=2")


def _fork_at_step(root: Path, src: str, dst: str) -> None:
    """dst: a copy of run src as it stood right after its step-3 checkpoint (later checkpoints removed)."""
    shutil.copytree(root / src, root / dst)
    for later in (root / dst / "checkpoints").glob("step_*"):
        if later.name != f"step_{STEP:08d}":
            shutil.rmtree(later)


def _trace(run_dir: Path) -> dict[int, float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _reassembled(engine, step_dir: Path, out: Path, rank: int) -> None:
    """Writes what the engine now holds (after a cross-layout restore) as a checkpoint under `out`."""
    if rank == 0:
        out.mkdir(parents=True)
    engine.barrier()
    engine.save_files(out)
    engine.barrier()
    if rank == 0:
        meta = read_meta(step_dir)
        (out / "complete.json").write_text(CheckpointMeta(meta.step, engine.layout_meta(), meta.config).to_json())


def _ranks(rank: int, world: int, root: str) -> None:
    from msmoe_dist.config import load_config
    from msmoe_dist.train.tasks import make_task
    from msmoe_dist.train.trainer import build_engine, build_initial_model, restore, run

    root = Path(root)
    run(load_config(None, _args(root, "ds222", *DS222)))
    if rank == 0:
        _fork_at_step(root, "ds222", "ds222_to_ds211")
        _fork_at_step(root, "native", "native_to_ds222")
    dist.barrier()  # the copies exist before any rank looks for them
    run(load_config(None, _args(root, "ds222_to_ds211", *DS211, "train.resume=true")))
    run(load_config(None, _args(root, "native_to_ds222", *DS222, "train.resume=true")))
    # the moments as the DS(2,1,1) engine holds them right after restoring DS(2,2,2)'s step 3
    cfg = load_config(None, _args(root, "probe", *DS211))
    from msmoe_dist.parallel.runtime import Runtime

    runtime = Runtime(rank, world, rank, torch.device("cpu"))
    runtime.start_distributed(cfg.parallel)
    task = make_task(cfg)
    task.load_data()
    engine = build_engine(cfg, "deepspeed", runtime, build_initial_model(cfg, task))
    step_dir = root / "ds222" / "checkpoints" / f"step_{STEP:08d}"
    restore(engine, step_dir, cfg, world)
    _reassembled(engine, step_dir, root / "probe_ds211", rank)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == STEP
    assert sorted(a["model"]) == sorted(b["model"]) and sorted(a["optimizer"]) == sorted(b["optimizer"])
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    for name, st in a["optimizer"].items():
        assert sorted(st) == sorted(b["optimizer"][name]) == ["exp_avg", "exp_avg_sq", "step"], name
        for key, t in st.items():
            assert torch.equal(torch.as_tensor(t).float(), torch.as_tensor(b["optimizer"][name][key]).float()), (
                name,
                key,
            )
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == STEP
    assert a["scheduler"]["_last_lr"] == b["scheduler"]["_last_lr"]


def _close(got: dict[int, float], want: dict[int, float], steps) -> None:
    for s in steps:
        assert abs(got[s] - want[s]) <= 1e-5 * abs(want[s]), (s, got[s], want[s])


def test_resume_across_world_size_ep_zero_and_engine(tmp_path, run_distributed, capfd):
    from msmoe_dist.config import load_config
    from msmoe_dist.parallel.runtime import Runtime
    from msmoe_dist.train.tasks import make_task
    from msmoe_dist.train.trainer import build_engine, build_initial_model, restore, run

    run(load_config(None, _args(tmp_path, "native", *NATIVE)))
    run_distributed(_ranks, 2, str(tmp_path), timeout_s=420, collective_timeout_s=120)
    _fork_at_step(tmp_path, "ds222", "ds222_to_native")
    run(load_config(None, _args(tmp_path, "ds222_to_native", *NATIVE, "train.resume=true")))
    assert "the layout changes: engine=native (checkpoint: deepspeed)" in capfd.readouterr().err

    ds, native = _trace(tmp_path / "ds222"), _trace(tmp_path / "native")
    assert sorted(ds) == sorted(native) == list(range(1, 7))
    assert ds != native  # runs started at different world sizes read different orders (their data worlds)
    later = range(STEP + 1, 7)
    _close(_trace(tmp_path / "ds222_to_native"), ds, later)
    _close(_trace(tmp_path / "ds222_to_ds211"), ds, later)
    _close(_trace(tmp_path / "native_to_ds222"), native, later)

    # exact reassembly: what the new layout's engine holds equals what was saved, parameter by parameter
    saved_dir = tmp_path / "ds222" / "checkpoints" / f"step_{STEP:08d}"
    saved = assemble_full_state(saved_dir, read_meta(saved_dir))
    _assert_same_state(assemble_full_state(tmp_path / "probe_ds211", read_meta(tmp_path / "probe_ds211")), saved)
    cfg = load_config(None, _args(tmp_path, "probe_n", *NATIVE))
    task = make_task(cfg)
    task.load_data()
    engine = build_engine(cfg, "native", Runtime(0, 1, 0, torch.device("cpu")), build_initial_model(cfg, task))
    restore(engine, saved_dir, cfg)
    out = tmp_path / "probe_native"
    out.mkdir()
    engine.save_files(out)
    (out / "complete.json").write_text(CheckpointMeta(STEP, engine.layout_meta(), {}).to_json())
    _assert_same_state(assemble_full_state(out, read_meta(out)), saved)
