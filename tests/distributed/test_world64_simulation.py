"""Rank 13 of a 64-rank world with EP 8, in this one process: the process groups on torch's `fake` backend
(FakeStore: no peers, collectives complete without moving data) and the collectives through a
`CommBackend` double that claims NCCL on cuda:0 (as in test_simulated_nccl.py) and fills each receive
buffer as the peers would under one assumption: every rank holds the same tokens and routes them the
same way. Then the rows rank p sends to this rank are this rank's own rows for its own experts, which
the double can copy.

FakeTensorMode is not used: the dispatcher reads split sizes on the host (the agreed capacity, the routed
counts, the dropless count exchange: the syncs docs/parallel.md lists), which a fake tensor cannot
answer. Real, tiny CPU tensors instead, and a fixed routing (token t, choice k -> expert (t + k*E/K) mod E)
that gives every expert the same number of rows, so the mirrored sizes agree on both ways of the
exchange. The values that come home are therefore not those of a real 64-rank run; what is checked is
the plumbing at that scale: the groups, every split and buffer size, forward and backward through both
all-to-alls, the bytes each collective moves, and that every tensor handed to a collective was placed
on the CUDA device.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from msmoe_dist.config.schema import ModelConfig, MoEConfig, MomentumConfig
from msmoe_dist.models import MoELanguageModel
from msmoe_dist.moe import MoELayer, is_expert_param
from msmoe_dist.parallel import CommStats, ParallelLayout, apply_expert_parallel, build_process_groups
from msmoe_dist.parallel.all_to_all import CAPACITY, COUNTS, TOKENS_BACKWARD, TOKENS_FORWARD
from msmoe_dist.parallel.comm import CommBackend, using_backend

WORLD, EP, RANK = 64, 8, 13
E, K, D, B, S, V, LAYERS = 16, 2, 16, 2, 8, 40, 2
CUDA = torch.device("cuda", 0)


class SimulatedCuda(torch.Tensor):
    """A host tensor that the simulation treats as living on the CUDA device (comm placed it there)."""


class DeviceTensor(torch.Tensor):
    """A host tensor that stands for one on the compute device: everything computed from it is one too,
    and every read of its values on the host (tolist, item, bool/int/float, cpu, numpy) is recorded as a
    device-to-host sync, with the line that did it."""

    reads: list[str] = []
    READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in cls.READS:
            caller = sys._getframe(1)
            cls.reads.append(f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} {func.__name__}")
            with torch._C.DisableTorchFunctionSubclass():
                got = func(*args, **(kwargs or {}))
            return got.as_subclass(torch.Tensor) if isinstance(got, torch.Tensor) else got  # now on the host
        return super().__torch_function__(func, types, args, kwargs)


class FixedRouter(nn.Module):
    """The real router's scores and losses, with a fixed, balanced choice of experts (see the docstring)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def set_step(self, step: int) -> None:
        self.inner.set_step(step)

    def forward(self, x_TD, token_T=None):
        r = self.inner(x_TD, token_T)
        T = x_TD.shape[0]
        experts_TK = (torch.arange(T)[:, None] + torch.arange(K)[None, :] * (E // K)) % E
        experts_TK = experts_TK.as_subclass(type(x_TD))  # computed where the tokens are, as a router's would be
        w_TK = r.probs_TE.gather(1, experts_TK)
        return dataclasses.replace(r, experts_TK=experts_TK, weights_TK=w_TK / w_TK.sum(-1, keepdim=True))


class MirrorNCCL(CommBackend):
    """NCCL on cuda:0 for the package; the fake group underneath; receive buffers filled by symmetry."""

    def __init__(self, result_cls: type = torch.Tensor) -> None:
        self.devices: list[tuple[str, str]] = []
        self.result_cls = result_cls  # what the caller gets back: DeviceTensor to count reads of results

    def device(self, group=None):
        return CUDA

    def to_comm(self, t, device):
        return t.as_subclass(SimulatedCuda)

    def from_comm(self, t, device):
        return t.as_subclass(self.result_cls)

    def _seen(self, op, *ts):
        self.devices += [(op, str(CUDA) if isinstance(t, SimulatedCuda) else str(t.device)) for t in ts]

    def all_reduce(self, t, op, group):
        self._seen("all_reduce", t)
        super().all_reduce(t.as_subclass(torch.Tensor), op, group)
        if op == dist.ReduceOp.SUM:  # every rank holds the same value
            t.mul_(dist.get_world_size(group))

    def all_to_all_single(self, out, inp, out_splits, in_splits, group):
        self._seen("all_to_all_single", out, inp)
        out, inp = out.as_subclass(torch.Tensor), inp.as_subclass(torch.Tensor)
        in_splits = None if in_splits is None else list(in_splits)
        super().all_to_all_single(out, inp, out_splits, in_splits, group)
        P, me = dist.get_world_size(group), dist.get_rank(group)
        ins = list(in_splits) if in_splits is not None else [inp.shape[0] // P] * P
        outs = list(out_splits) if out_splits is not None else [out.shape[0] // P] * P
        assert sum(ins) == inp.shape[0] and sum(outs) == out.shape[0], (ins, outs, inp.shape, out.shape)
        mine = inp.split(ins)[me]  # what every peer sends this rank, by symmetry
        assert all(n == mine.shape[0] for n in outs), f"rank {me} expects {outs} rows, peers send {mine.shape[0]}"
        out.copy_(mine.repeat((P,) + (1,) * (mine.dim() - 1)))

    def barrier(self, group):
        super().barrier(group)


@pytest.fixture
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():  # an earlier test of this session left its group running
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=RANK, world_size=WORLD)
    try:
        yield build_process_groups(ParallelLayout(WORLD, EP), RANK)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("capacity_factor", [1.0, 0.0])
def test_lm_at_world_64_ep_8(fake_world, capacity_factor):
    pg = fake_world
    assert (pg.ep_rank, dist.get_world_size(pg.ep), dist.get_world_size(pg.edp)) == (RANK % EP, EP, WORLD // EP)
    mcfg = ModelConfig(num_layers=LAYERS, d_model=D, num_heads=2, max_seq_len=S)
    moe = MoEConfig(num_experts=E, top_k=K, expert_ffn_dim=24, capacity_factor=capacity_factor)
    torch.manual_seed(0)
    model = MoELanguageModel(mcfg, moe, MomentumConfig(kind="heavy_ball"), V)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(layers) == LAYERS
    for layer in layers:
        layer.router = FixedRouter(layer.router)
    stats, backend = CommStats(), MirrorNCCL()
    apply_expert_parallel(model, pg, stats)
    assert all(layer.num_local_experts == E // EP for layer in layers)
    toks = torch.randint(0, V, (B, S + 1), generator=torch.Generator().manual_seed(1))
    with using_backend(backend):
        out = model(toks[:, :-1], toks[:, 1:], collect_stats=True)
        (out.loss + out.aux_loss).backward()
    assert torch.isfinite(out.loss)
    experts = [p for p in model.parameters() if is_expert_param(p)]
    assert experts and all(p.grad is not None and p.grad.shape[0] == E // EP for p in experts)

    # every tensor a collective saw had been placed on the CUDA device
    assert backend.devices and {d for _, d in backend.devices} == {str(CUDA)}, backend.devices
    # bytes: T*K rows of D fp32 each way per layer (balanced: no padding even in capacity mode)
    rows = B * S * K
    assert stats[TOKENS_FORWARD].calls == 2 * LAYERS  # dispatch and combine
    assert stats[TOKENS_FORWARD].bytes == 2 * LAYERS * rows * D * 4
    assert stats[TOKENS_BACKWARD].bytes == 2 * LAYERS * rows * D * 4
    if capacity_factor > 0:
        assert stats[CAPACITY].calls == LAYERS and stats[COUNTS].calls == 0
    else:
        assert stats[COUNTS].calls == LAYERS and stats[CAPACITY].calls == 0
    for s in out.stats:
        assert s["moe"].routed_per_expert == [rows // E] * E and s["moe"].num_dropped == 0


def _model(pg, capacity_factor):
    mcfg = ModelConfig(num_layers=LAYERS, d_model=D, num_heads=2, max_seq_len=S)
    moe = MoEConfig(num_experts=E, top_k=K, expert_ffn_dim=24, capacity_factor=capacity_factor)
    torch.manual_seed(0)
    model = MoELanguageModel(mcfg, moe, MomentumConfig(kind="heavy_ball"), V)
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        layer.router = FixedRouter(layer.router)
    apply_expert_parallel(model, pg)
    return model


@pytest.mark.parametrize("capacity_factor,per_layer", [(0.0, 1), (1.0, 2)])
def test_host_syncs_per_training_step(fake_world, capacity_factor, per_layer):
    """docs/parallel.md's count: dropless, exactly one device-to-host sync per MoE layer (the counts);
    capacity mode, two (the agreed capacity, the routed counts); none in the backward, none for statistics
    until they are read."""
    model = _model(fake_world, capacity_factor)
    toks = torch.randint(0, V, (B, S + 1), generator=torch.Generator().manual_seed(1)).as_subclass(DeviceTensor)
    DeviceTensor.reads = []
    with using_backend(MirrorNCCL(result_cls=DeviceTensor)):
        out = model(toks[:, :-1], toks[:, 1:], collect_stats=True)
        forward = list(DeviceTensor.reads)
        (out.loss + out.aux_loss).backward()
    assert len(forward) == per_layer * LAYERS, forward
    assert DeviceTensor.reads == forward, DeviceTensor.reads[len(forward) :]  # the backward reads nothing
    where = {r.split(":")[0] for r in forward}
    assert where <= {"all_to_all.py", "dispatcher.py"}, forward
