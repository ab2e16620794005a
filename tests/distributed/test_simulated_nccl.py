"""NCCL accepts only CUDA tensors; on a CPU machine the compute device is the host, so no ordinary test
can see a collective handed a host tensor. Here every collective runs against a communication backend
that says the group is NCCL on cuda:0 (`msmoe_dist.parallel.comm.using_backend`): a tensor counts as
being on the CUDA device only once comm has placed it there (it becomes a `SimulatedCuda` view), and
the double records the device of every tensor it is handed, then runs the collective on gloo. A
collective that bypasses comm (torch.distributed called from a msmoe_dist module) is recorded too, with
its tensors' real device: the host.

One training step (statistics on), one evaluation batch and one checkpoint save of the DeepSpeed engine
at EP 2, ZeRO 0 and 2, dropless and capacity mode, and of the native engine (which runs no collective).

Mutation check (run by hand when this file changes): put the old `all_sum` back in
msmoe_dist/train/ds_engine.py, `t = torch.tensor(values, dtype=torch.float64); dist.all_reduce(t)`, and
this test fails naming "all_reduce called directly from msmoe_dist.train.ds_engine" on cpu.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from msmoe_dist.checkpoint import Checkpointer, CheckpointMeta
from msmoe_dist.config import load_config
from msmoe_dist.data import train_batch
from msmoe_dist.eval.lm import evaluate_tokens
from msmoe_dist.models.build import build_model
from msmoe_dist.parallel.comm import CommBackend, using_backend
from msmoe_dist.parallel.runtime import Runtime
from msmoe_dist.train.trainer import build_engine

V, B, S = 60, 2, 8
CUDA = torch.device("cuda", 0)
STREAM = torch.randint(0, V, (5000,), generator=torch.Generator().manual_seed(0))
DIRECT = ("all_reduce", "all_to_all_single", "all_gather", "broadcast", "barrier", "reduce_scatter", "gather")


class SimulatedCuda(torch.Tensor):
    """A host tensor that the simulation treats as living on the CUDA device (comm placed it there)."""


def where(t: torch.Tensor) -> str:
    return str(CUDA) if isinstance(t, SimulatedCuda) else str(t.device)


class RecordingNCCL(CommBackend):
    """The group is NCCL on cuda:0; records (collective, device of each tensor), then runs it on gloo."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def device(self, group=None) -> torch.device:
        return CUDA

    def to_comm(self, t, device):
        assert device == CUDA, device
        return t.as_subclass(SimulatedCuda)  # "copied to the device"; the data stays where it is

    def from_comm(self, t, device):
        return t.as_subclass(torch.Tensor)  # back on the caller's device (the host, in this simulation)

    def all_reduce(self, t, op, group):
        self.calls.append(("all_reduce", [where(t)]))
        super().all_reduce(t.as_subclass(torch.Tensor), op, group)

    def all_to_all_single(self, out, inp, out_splits, in_splits, group):
        self.calls.append(("all_to_all_single", [where(out), where(inp)]))
        super().all_to_all_single(
            out.as_subclass(torch.Tensor), inp.as_subclass(torch.Tensor), out_splits, in_splits, group
        )

    def all_gather(self, outs, t, group):
        self.calls.append(("all_gather", [where(o) for o in outs] + [where(t)]))
        super().all_gather([o.as_subclass(torch.Tensor) for o in outs], t.as_subclass(torch.Tensor), group)

    def broadcast(self, t, src, group):
        self.calls.append(("broadcast", [where(t)]))
        super().broadcast(t.as_subclass(torch.Tensor), src, group)

    def barrier(self, group):
        self.calls.append(("barrier", []))
        super().barrier(group)


def _guard_direct_calls(rec: RecordingNCCL) -> None:
    """torch.distributed's collectives, wrapped: a call from a msmoe_dist module other than comm is recorded
    with the real devices of its tensors (DeepSpeed's and torch's own calls pass through unrecorded)."""
    for name in DIRECT:
        real = getattr(dist, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("msmoe_dist.") and caller != "msmoe_dist.parallel.comm":
                flat = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                flat += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
                rec.calls.append((f"{_name} called directly from {caller}", [where(t) for t in flat] or ["none"]))
            return _real(*args, **kwargs)

        setattr(dist, name, wrapper)


def _cfg(*extra):
    return load_config(
        None,
        [
            "model.num_layers=2",
            "model.d_model=16",
            "model.num_heads=2",
            "model.max_seq_len=8",
            "data.seq_len=8",
            f"data.batch_size={B}",
            "moe.num_experts=4",
            "moe.expert_ffn_dim=16",
            "momentum.kind=heavy_ball",
            "optim.name=adamw",
            "optim.grad_clip=0.05",
            "train.max_steps=10",
            *extra,
        ],
    )


def _exercise(eng, root: Path, rank: int, world: int) -> dict:
    """One training step with statistics, one evaluation batch per rank, one checkpoint save."""
    res = eng.train_step([train_batch(STREAM, 0, B, S, 0, rank, world)], collect_stats=True)
    assert all(isinstance(v, float) for v in (res.loss, res.aux_loss, res.grad_norm)), res
    for p in eng.model.parameters():  # results came back on the caller's device, not as device views
        assert p.grad is None or not isinstance(p.grad, SimulatedCuda)
    ev = evaluate_tokens(eng, STREAM[: B * S * world + 1], B, S, max_batches=world)
    meta = CheckpointMeta(1, eng.layout_meta(), {}, {"vocab_size": V})
    Checkpointer(root, 1, eng.is_main, eng.barrier).save(meta, eng, "")
    return {"loss": res.loss, "eval": ev["loss"]}


def _worker(rank, world, root):
    rec = RecordingNCCL()
    _guard_direct_calls(rec)
    seen = {}
    runtime = Runtime(rank, world, rank, torch.device("cpu"))
    for stage in (0, 2):
        for factor in (0.0, 1.5):
            cfg = _cfg(
                "parallel.engine=deepspeed",
                "parallel.ep_size=2",
                f"parallel.zero_stage={stage}",
                f"moe.capacity_factor={factor}",
            )
            runtime.start_distributed(cfg.parallel)
            torch.manual_seed(cfg.train.seed)
            model = build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, V)
            with using_backend(rec):
                eng = build_engine(cfg, "deepspeed", runtime, model)
                start = len(rec.calls)
                _exercise(eng, Path(root) / f"ds_z{stage}_c{factor}", rank, world)
                seen[f"zero{stage} capacity_factor={factor}"] = rec.calls[start:]
    return seen


def test_every_collective_gets_device_tensors_under_simulated_nccl(tmp_path, run_distributed):
    per_rank = run_distributed(_worker, 2, str(tmp_path), timeout_s=400)
    for rank, seen in enumerate(per_rank):
        for case, calls in seen.items():
            names = {n for n, _ in calls}
            # the step, the evaluation and the save each ran their collectives through the double
            assert {"all_to_all_single", "all_reduce", "barrier"} <= names, (rank, case, names)
            wrong = [(n, devs) for n, devs in calls if " directly " in n or any(d != str(CUDA) for d in devs)]
            assert not wrong, f"rank {rank}, {case}: NCCL would reject these (not on {CUDA}): {wrong}"


def test_native_engine_runs_no_collective(tmp_path):
    rec = RecordingNCCL()
    cfg = _cfg("parallel.engine=native")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, V)
    with using_backend(rec):
        eng = build_engine(cfg, "native", Runtime(0, 1, 0, torch.device("cpu")), model)
        _exercise(eng, tmp_path, 0, 1)
    assert rec.calls == []
