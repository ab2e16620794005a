"""The fast expert path against the per-expert loop and against a row-by-row computation."""

import pytest
import torch
import torch.nn.functional as F

from msmoe_dist.moe import Experts, MoELayer, grouped_mm_works, is_expert_param

ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def make_experts(E=4, D=8, Fd=16, act="relu", seed=0) -> Experts:
    torch.manual_seed(seed)
    ex = Experts(E, D, Fd, act, init_std=0.3)
    with torch.no_grad():  # non-zero biases so that their gradients and use are tested
        ex.b1.normal_()
        ex.b2.normal_()
    return ex


def grads_of(ex: Experts, x, counts, g, fn):
    for p in (x, *ex.parameters()):
        p.grad = None
    y = fn(x, counts)
    y.backward(g)
    return y.detach(), [t.grad.clone() for t in (x, ex.w1, ex.b1, ex.w2, ex.b2)]


@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 9, 0], [2, 2, 2, 2], [0, 0, 0, 0]])
def test_grouped_equals_loop_values_and_all_grads(act, counts):
    ex = make_experts(act=act)
    R = sum(counts)
    x = torch.randn(R, 8, requires_grad=True)
    g = torch.randn(R, 8)
    y_fast, grads_fast = grads_of(ex, x, counts, g, ex.forward)
    y_ref, grads_ref = grads_of(ex, x, counts, g, ex.forward_loop)
    assert y_fast.shape == (R, 8)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(["x", "w1", "b1", "w2", "b2"], grads_fast, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"grad {name}")
    for e, n in enumerate(counts):
        if n == 0:  # an expert without rows gets exact zeros, not garbage
            assert not grads_fast[1][e].any() and not grads_fast[3][e].any()
            assert not grads_fast[2][e].any() and not grads_fast[4][e].any()


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_loop_reference_row_by_row(act):
    ex = make_experts(act=act)
    counts = [2, 0, 3, 1]
    x = torch.randn(6, 8)
    expert_of_row = [0, 0, 2, 2, 2, 3]
    y = ex.forward_loop(x, counts)
    for r, e in enumerate(expert_of_row):
        row = ACT[act](x[r] @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]
        torch.testing.assert_close(y[r], row, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not grouped_mm_works(torch.device("cpu"), torch.float32, 8, 16), reason="no torch._grouped_mm")
def test_grouped_mm_path_equals_loop():
    # CPU picks the split path; this checks the torch._grouped_mm path the GPU takes.
    ex = make_experts(act="silu")
    counts = [3, 0, 5, 1]
    x = torch.randn(9, 8, requires_grad=True)
    g = torch.randn(9, 8)

    def gmm(x, counts):
        return ex._forward_grouped_mm(x, ex.w1, ex.b1, ex.w2, ex.b2, tuple(counts))

    y_a, grads_a = grads_of(ex, x, counts, g, gmm)
    y_b, grads_b = grads_of(ex, x, counts, g, ex.forward_loop)
    gmm(x, counts).sum().backward()  # a stride-0 gradient must be accepted too
    torch.testing.assert_close(y_a, y_b, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_matches_loop_and_keeps_fp32_weights():
    ex = make_experts()
    counts = [5, 0, 7, 4]
    x = torch.randn(16, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ex(x, counts)
        y_ref = ex.forward_loop(x, counts)
    assert y.dtype == torch.bfloat16 and ex.w1.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert ex.w1.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_second_backward_through_fast_path_is_refused():
    # The fast backward reuses its saved activation buffer; a retained-graph second pass
    # must fail loudly instead of returning wrong gradients.
    ex = make_experts()
    x = torch.randn(6, 8, requires_grad=True)
    y = ex(x, [2, 1, 3, 0])
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        y.sum().backward()


def test_init_and_bad_counts():
    torch.manual_seed(0)
    ex = Experts(8, 64, 256, "relu", init_std=0.02)
    assert ex.w1.shape == (8, 64, 256) and ex.b1.shape == (8, 256)
    assert ex.w2.shape == (8, 256, 64) and ex.b2.shape == (8, 64)
    assert not ex.b1.any() and not ex.b2.any()
    assert ex.w1.std().item() == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ValueError):
        ex(torch.randn(5, 64), [1, 1, 1, 1, 0, 0, 0, 0])  # sums to 4, not 5
    with pytest.raises(ValueError):
        ex(torch.randn(2, 64), [1, 1])  # wrong number of experts
    with pytest.raises(ValueError):
        Experts(2, 4, 8, "tanh")


def test_expert_parameters_are_tagged_where_they_are_created():
    from msmoe_dist.config.schema import MoEConfig

    layer = MoELayer(8, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16))
    tagged = {n for n, p in layer.named_parameters() if is_expert_param(p)}
    assert tagged == {"experts.w1", "experts.b1", "experts.w2", "experts.b2"}
    layer.to(torch.float64)  # .to() keeps the Parameter objects, so the tag
    assert {n for n, p in layer.named_parameters() if is_expert_param(p)} == tagged
    assert not is_expert_param(torch.zeros(2)) and not is_expert_param(layer.router.weight)


def test_keep_experts_slices_every_tensor_and_keeps_the_tag():
    ex = make_experts(E=4)
    full = [t.detach().clone() for t in (ex.w1, ex.b1, ex.w2, ex.b2)]
    ex.keep_experts(range(1, 3))
    assert ex.num_experts == 2
    for t, f in zip((ex.w1, ex.b1, ex.w2, ex.b2), full):
        assert torch.equal(t, f[1:3]) and is_expert_param(t) and t.requires_grad
    y = ex(torch.randn(3, 8), [1, 2])  # runs with the two experts it kept
    assert y.shape == (3, 8)
    for bad in (range(0, 3), range(2, 2), range(0, 2, 2)):
        with pytest.raises(ValueError):
            ex.keep_experts(bad)


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [2, 2, 2, 2]])
def test_dropout_chain_equals_loop_and_writes_each_weight_grad_once(counts):
    """The per-expert chain with dropout (moe.expert_dropout) against the loop at p = 0, and its
    backward must not build one full [E, D, F] gradient buffer per expert (select's backward per
    expert and E - 1 adds: E^2 D F bytes a step, once 36 % of this path's time)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from msmoe_dist.moe.expert_dropout import experts_with_hidden_dropout

    class FullWeightOutputs(TorchDispatchMode):
        def __init__(self, shapes):
            super().__init__()
            self.shapes, self.count = shapes, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view and isinstance(out, torch.Tensor) and tuple(out.shape) in self.shapes:
                self.count += 1
            return out

    ex = make_experts()
    R = sum(counts)
    x = torch.randn(R, 8, requires_grad=True)
    g = torch.randn(R, 8)
    y_ref, grads_ref = grads_of(ex, x, counts, g, ex.forward_loop)
    y = experts_with_hidden_dropout(ex, x, counts, 0.0)
    for p in (x, *ex.parameters()):
        p.grad = None
    watch = FullWeightOutputs({tuple(ex.w1.shape), tuple(ex.w2.shape)})
    with watch:
        y.backward(g)
    torch.testing.assert_close(y.detach(), y_ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(["x", "w1", "b1", "w2", "b2"], [t.grad for t in (x, ex.w1, ex.b1, ex.w2, ex.b2)], grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    assert watch.count <= 2, f"{watch.count} full-size weight-gradient tensors built (one per weight expected)"
