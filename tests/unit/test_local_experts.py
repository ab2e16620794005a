"""Local-only experts: a rank builds only the experts it holds, with the one-process initial values.

Per EP degree (1, 2, 4) and rank: the model built with `local_experts` holds exactly the layout's slice
of the one-process model (bit for bit), every dense tensor equals it, the global RNG stream after the
build is the same at every degree, and no tensor of the size of a full [E, D, F] expert bank is ever
allocated during the build (every allocation is recorded with a dispatch mode).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from msmoe_dist.config.loader import load_config
from msmoe_dist.models.build import build_model
from msmoe_dist.moe import MoELayer
from msmoe_dist.moe.experts import Experts, expert_seed
from msmoe_dist.parallel import ParallelLayout, is_expert_key

E, D, F = 8, 16, 64  # E*D*F = 8192: larger than any dense tensor of these models

LM = [
    "model.num_layers=2",
    f"model.d_model={D}",
    "model.num_heads=2",
    "model.ffn_dim=32",
    "model.max_seq_len=8",
    "data.seq_len=8",
]
VIT = [
    "model.kind=vit",
    "data.kind=synthetic_images",
    "vision.image_size=16",
    "vision.patch_size=4",
    "vision.num_classes=7",
    "vision.synthetic_classes=7",
    "model.num_layers=2",
    f"model.d_model={D}",
    "model.num_heads=2",
    "vision.moe_every=1",
]


def _cfg(kind, *more):
    extra = [f"moe.num_experts={E}", f"moe.expert_ffn_dim={F}", "momentum.kind=heavy_ball", *more]
    return load_config(None, (VIT if kind == "vit" else LM) + extra)


class _Allocations(TorchDispatchMode):
    """The largest tensor any op created (numel)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _build(cfg, local=None):
    torch.manual_seed(3)
    model = build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, 40, local)
    return model, torch.get_rng_state()


@pytest.mark.parametrize("kind", ["lm", "vit"])
def test_each_rank_builds_its_slice_of_the_one_process_model(kind):
    cfg = _cfg(kind)
    ref, ref_rng = _build(cfg)
    want = ref.state_dict()
    for ep in (1, 2, 4):
        for rank in range(ep):
            local = ParallelLayout(ep, ep).local_experts(rank, E)
            with _Allocations() as seen:
                model, rng = _build(cfg, local)
            assert torch.equal(rng, ref_rng), f"ep {ep}: the RNG stream after the build depends on the EP degree"
            got = model.state_dict()
            assert got.keys() == want.keys()
            for name, t in got.items():
                expect = want[name][local.start : local.stop] if is_expert_key(name) else want[name]
                assert torch.equal(t, expect), f"ep {ep} rank {rank} {name}"
            # A full bank is E*D*F elements; a rank at EP > 1 never holds one, not even for a moment.
            assert seen.largest == (E * D * F) // ep, (ep, seen.largest)
            for layer in model.moe_layers():
                assert layer.experts.expert_ids == local and layer.experts.w1.shape == (E // ep, D, F)


@pytest.mark.parametrize(
    "kind, init", [("lm", "model.init=torch_default"), ("lm", "model.init=fairseq"), ("vit", "model.init=vmoe")]
)
def test_reference_initialisers_are_independent_of_the_ep_degree(kind, init):
    """The reference-exact initialisers re-draw the experts, each from its own generator: a rank's slice and
    the RNG stream after the build are the one-process model's at every EP degree."""
    cfg = _cfg(kind, init)
    ref, ref_rng = _build(cfg)
    want = ref.state_dict()
    for ep in (2, 4):
        local = ParallelLayout(ep, ep).local_experts(ep - 1, E)
        model, rng = _build(cfg, local)
        assert torch.equal(rng, ref_rng), f"{init} ep {ep}: the RNG stream after the build depends on the EP degree"
        for name, t in model.state_dict().items():
            expect = want[name][local.start : local.stop] if is_expert_key(name) else want[name]
            assert torch.equal(t, expect), f"{init} ep {ep} {name}"


def test_expert_values_depend_on_seed_layer_and_index_only():
    a = Experts(4, 3, 5, "relu", init_seed=11, moe_layer=2)
    b = Experts(4, 3, 5, "relu", init_seed=11, moe_layer=2, expert_ids=range(1, 3))
    assert torch.equal(a.w1[1:3], b.w1) and torch.equal(a.w2[1:3], b.w2)
    assert not torch.equal(Experts(4, 3, 5, "relu", init_seed=11, moe_layer=3).w1, a.w1)
    assert not torch.equal(Experts(4, 3, 5, "relu", init_seed=12, moe_layer=2).w1, a.w1)
    assert not torch.equal(a.w1[0], a.w1[1])
    assert expert_seed(11, 2, 1) == expert_seed(11, 2, 1) != expert_seed(11, 2, 0)
    with pytest.raises(ValueError, match="cannot hold experts"):
        Experts(4, 3, 5, "relu", expert_ids=range(2, 6))


def test_a_local_layer_refuses_to_run_before_expert_parallelism_is_applied():
    cfg = _cfg("lm")
    layer = MoELayer(D, cfg.moe, expert_ids=range(2, 4))
    assert layer.experts.w1.shape == (2, D, F)
    with pytest.raises(RuntimeError, match="apply expert parallelism"):
        layer(torch.randn(3, D))
