"""apply_expert_parallel on a model built on one device keeps exactly the one-process weights, sliced.

4 gloo ranks, ep_size 2 (two EP groups, so every expert slice also lives on an EDP replica). Per rank:
every dense tensor equals the one-process model's, every expert tensor is the layout's slice of it,
exactly the expert parameters carry the tag, every MoE layer moves tokens by all-to-all and reports
to the one CommStats, and no random number is drawn. Forward and backward then equal the one-process
run: the loss on this rank's tokens, dense gradients from those tokens alone, expert gradients summed
over the EP group. ep_size 1 leaves the model untouched.
"""

import pytest
import torch

from msmoe_dist.config.loader import load_config
from msmoe_dist.config.schema import ModelConfig, MoEConfig, MomentumConfig
from msmoe_dist.models import MoELanguageModel, VisionMoE
from msmoe_dist.moe import LocalDispatcher, is_expert_param
from msmoe_dist.parallel import (
    AllToAllDispatcher,
    CommStats,
    ParallelLayout,
    apply_expert_parallel,
    build_process_groups,
    is_expert_key,
)
from msmoe_dist.parallel.all_to_all import TOKENS_BACKWARD, TOKENS_FORWARD

E, D, V = 4, 16, 40
TOL = dict(rtol=1e-5, atol=1e-6)
VIT = [
    "model.kind=vit",
    "data.kind=synthetic_images",
    "vision.image_size=16",
    "vision.patch_size=4",
    "vision.num_classes=7",
    "vision.synthetic_classes=7",
    "model.num_layers=2",
    "model.d_model=16",
    "model.num_heads=2",
    f"moe.num_experts={E}",
    "moe.expert_ffn_dim=24",
    "vision.moe_every=1",
]


def _lm():
    mcfg = ModelConfig(num_layers=2, d_model=D, num_heads=2, max_seq_len=8)
    moe = MoEConfig(num_experts=E, top_k=2, expert_ffn_dim=24, z_loss_coef=0.001)
    torch.manual_seed(0)
    return MoELanguageModel(mcfg, moe, MomentumConfig(kind="heavy_ball"), V)


def _check_sliced(model, ref, local, label):
    want = ref.state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys(), label
    for name, t in got.items():
        expect = want[name][local.start : local.stop] if is_expert_key(name) else want[name]
        assert torch.equal(t, expect), f"{label} {name}"
    tagged = {n for n, p in model.named_parameters() if is_expert_param(p)}
    assert tagged == {n for n, _ in ref.named_parameters() if is_expert_key(n)} and tagged, label


def _worker(rank, world):
    pg = build_process_groups(ParallelLayout(world, 2), rank)
    local = pg.layout.local_experts(rank, E)
    assert local == range(2 * pg.ep_rank, 2 * pg.ep_rank + 2)

    # The language model: weights, tags, dispatchers, RNG.
    ref, model = _lm(), _lm()
    comm = CommStats()
    rng = torch.get_rng_state()
    apply_expert_parallel(model, pg, comm)
    assert torch.equal(torch.get_rng_state(), rng), "apply_expert_parallel drew random numbers"
    _check_sliced(model, ref, local, "lm")
    layers = model.moe_layers()
    assert len(layers) == 2
    for layer in layers:
        assert isinstance(layer.dispatcher, AllToAllDispatcher) and layer.dispatcher.comm is comm
        assert layer.num_local_experts == layer.dispatcher.num_local_experts == 2
    with pytest.raises(RuntimeError, match="already sharded"):
        apply_expert_parallel(model, pg)

    # Forward and backward against the one-process model.
    seqs = [torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(50 + s)) for s in range(world)]
    out = model(seqs[rank][:, :-1], seqs[rank][:, 1:])
    (out.loss + out.aux_loss).backward()
    assert comm[TOKENS_FORWARD].calls == 2 * 2 and comm[TOKENS_BACKWARD].calls == 2 * 2
    group = {}
    for s in pg.layout.ep_group_of(rank):
        ref.zero_grad(set_to_none=True)
        r = ref(seqs[s][:, :-1], seqs[s][:, 1:])
        (r.loss + r.aux_loss).backward()
        grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
        for n, g in grads.items():
            group[n] = group.get(n, 0) + g
        if s == rank:
            mine, ref_loss, ref_aux = grads, r.loss.detach(), r.aux_loss.detach()
    torch.testing.assert_close(out.loss.detach(), ref_loss, **TOL)
    torch.testing.assert_close(out.aux_loss.detach(), ref_aux, **TOL)
    for n, p in model.named_parameters():
        want = group[n][local.start : local.stop] if is_expert_param(p) else mine[n]
        torch.testing.assert_close(p.grad, want, **TOL, msg=lambda m: f"lm {n}: {m}")

    # V-MoE: the same slicing; its logits on this rank's images equal the one-process model's.
    cfg = load_config(None, VIT)
    parts = (cfg.model, cfg.moe, cfg.momentum, cfg.vision)
    torch.manual_seed(0)
    vref = VisionMoE(*parts)
    torch.manual_seed(0)
    vit = VisionMoE(*parts)
    apply_expert_parallel(vit, pg)
    _check_sliced(vit, vref, local, "vit")
    images = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(70 + s)) for s in range(world)]
    with torch.no_grad():
        torch.testing.assert_close(vit(images[rank]).logits, vref(images[rank]).logits, **TOL)

    # ep_size 1: nothing to shard, the same Parameter objects and the local dispatcher.
    pg1 = build_process_groups(ParallelLayout(world, 1), rank)
    one = _lm()
    before = dict(one.named_parameters())
    apply_expert_parallel(one, pg1, CommStats())
    assert dict(one.named_parameters()) == before
    assert all(type(layer.dispatcher) is LocalDispatcher for layer in one.moe_layers())
    return rank


def test_apply_expert_parallel_slices_the_one_process_model(run_distributed):
    assert run_distributed(_worker, 4, timeout_s=300) == [0, 1, 2, 3]
