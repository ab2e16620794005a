"""A bank of expert FFNs, y = act(x @ w1[e] + b1[e]) @ w2[e] + b2[e], run on expert-sorted rows.

Legend: R routed rows (sorted by expert, contiguous per expert), D model dim, F ffn dim,
E experts held by this module (the local experts of one rank under expert parallelism).
  x_RD / y_RD   rows in and out      h_RF   hidden pre-activation   a_RF   after activation

Expert parameters are a different kind of parameter everywhere (sharded over the expert-parallel
group, their gradients averaged over the expert-data-parallel group only, their own optimiser
groups), so they carry a tag from the moment they are created; `is_expert_param` reads it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

# The experts' and the dense FFN's activations (models/blocks.py uses these too).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # flax's nn.gelu (the V-MoE reference)
    "silu": F.silu,
}

_EXPERT_TAG = "is_expert"  # attribute set on every expert Parameter


def _expert_parameter(data: Tensor) -> nn.Parameter:
    p = nn.Parameter(data)
    setattr(p, _EXPERT_TAG, True)
    return p


def is_expert_param(p: Tensor) -> bool:
    """True for the parameters of an `Experts` module (tagged where they are created).

    The tag lives on the Parameter object: it survives `.to()` and `load_state_dict` (which keep the
    object), not `copy.deepcopy` (torch rebuilds the Parameter). For state-dict keys (tensors without
    the object, e.g. read from a checkpoint file) use `msmoe_dist.parallel.is_expert_key`.
    """
    return getattr(p, _EXPERT_TAG, False) is True


def _act_backward_(activation: str, grad_a: Tensor, saved: Tensor) -> Tensor:
    """Write act'(.) * grad_a into ``saved`` (its last use), avoiding a fresh [rows, F] buffer.

    relu saves its output, whose sign is its derivative; gelu/silu save the pre-activation.
    """
    if activation == "relu":
        return torch.ops.aten.threshold_backward.grad_input(grad_a, saved, 0, grad_input=saved)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward.grad_input(grad_a, saved, grad_input=saved)
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_backward.grad_input(grad_a, saved, approximate="tanh", grad_input=saved)
    return torch.ops.aten.silu_backward.grad_input(grad_a, saved, grad_input=saved)


def _bounds(counts: Sequence[int]):
    start = 0
    for e, n in enumerate(counts):
        yield e, start, start + n
        start += n


class _SplitFFN(torch.autograd.Function):
    """The whole FFN over expert-contiguous row chunks as one autograd node.

    Plain autograd over a Python loop would store per-chunk views, concatenate the chunk
    outputs and later scatter their gradients back into full tensors: two extra [R, F]
    and [R, D] copies each way.  Here every chunk GEMM writes straight into its slice of one
    preallocated buffer (bias fused through addmm), and the backward does the same.
    """

    @staticmethod
    def forward(ctx, x_RD, w1, b1, w2, b2, counts, activation):
        R, D = x_RD.shape
        F_ = w1.shape[2]
        x_RD = x_RD.contiguous()
        h_RF = x_RD.new_empty(R, F_)
        y_RD = x_RD.new_empty(R, D)
        for e, s, t in _bounds(counts):
            if t > s:
                torch.addmm(b1[e], x_RD[s:t], w1[e], out=h_RF[s:t])
        if activation == "relu":
            a_RF = h_RF.relu_()
            saved = a_RF
        else:
            a_RF = ACTIVATIONS[activation](h_RF)
            saved = h_RF
        for e, s, t in _bounds(counts):
            if t > s:
                torch.addmm(b2[e], a_RF[s:t], w2[e], out=y_RD[s:t])
        ctx.counts = counts
        ctx.activation = activation
        ctx.save_for_backward(x_RD, w1, w2, saved, a_RF)
        return y_RD

    @staticmethod
    def backward(ctx, grad_y_RD):
        # The saved activation is overwritten with the hidden gradient expert by expert: on
        # CPU a fresh [R, F] buffer costs more in page faults than its GEMM.  A second
        # backward through the same graph is caught by autograd's version-counter check.
        x_RD, w1, w2, saved, a_RF = ctx.saved_tensors
        counts, activation = ctx.counts, ctx.activation
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        grad_y_RD = grad_y_RD.contiguous()
        E, D, F_ = w1.shape
        # Experts that received no rows get exact zeros, like the reference loop's gradients.
        alloc = torch.zeros if 0 in counts else torch.empty
        gw1 = alloc(E, D, F_, dtype=w1.dtype, device=w1.device) if need_w1 else None
        gb1 = alloc(E, F_, dtype=w1.dtype, device=w1.device) if need_b1 else None
        gw2 = alloc(E, F_, D, dtype=w2.dtype, device=w2.device) if need_w2 else None
        gb2 = alloc(E, D, dtype=w2.dtype, device=w2.device) if need_b2 else None
        gx = torch.empty_like(x_RD) if need_x else None
        grad_a = a_RF.new_empty(max(counts, default=0), F_)
        for e, s, t in _bounds(counts):
            if t == s:
                continue
            g = grad_y_RD[s:t]
            if gw2 is not None:
                torch.mm(a_RF[s:t].t(), g, out=gw2[e])
            if gb2 is not None:
                torch.sum(g, dim=0, out=gb2[e])
            ga = torch.mm(g, w2[e].t(), out=grad_a[: t - s])
            gh = _act_backward_(activation, ga, saved[s:t])
            if gw1 is not None:
                torch.mm(x_RD[s:t].t(), gh, out=gw1[e])
            if gb1 is not None:
                torch.sum(gh, dim=0, out=gb1[e])
            if gx is not None:
                torch.mm(gh, w1[e].t(), out=gx[s:t])
        return gx, gw1, gb1, gw2, gb2, None, None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    torch._grouped_mm's backward rejects the stride-0 gradients that e.g. ``out.sum()``
    produces.
    """

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


_GROUPED_MM_OK: dict[tuple, bool] = {}


def grouped_mm_works(device: torch.device, dtype: torch.dtype, d_model: int, ffn_dim: int) -> bool:
    """Probe torch._grouped_mm once per (device type, dtype, shape) against a plain matmul.

    Its support varies by torch version, device, dtype and alignment; a failing probe just
    means the split path is used.
    """
    key = (device.type, dtype, d_model, ffn_dim)
    if key not in _GROUPED_MM_OK:  # a small forward/backward and a device-to-host sync, once per key
        ok = False
        if hasattr(torch, "_grouped_mm"):
            try:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(24, d_model, generator=g).to(device, dtype).requires_grad_()
                w = torch.randn(3, d_model, ffn_dim, generator=g).to(device, dtype).requires_grad_()
                offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)  # middle group empty
                y = torch._grouped_mm(x, w, offs=offs)
                y.backward(torch.ones_like(y))
                ref = torch.cat([x[:8] @ w[0], x[8:] @ w[2]])
                tol = 1e-2 * math.sqrt(d_model) if dtype != torch.float32 else 1e-3
                ok = (
                    torch.allclose(y.float(), ref.float(), atol=tol, rtol=1e-2)
                    and w.grad is not None
                    and bool((w.grad[1] == 0).all())
                )
            except Exception:  # noqa: BLE001 - any failure means "not usable here"
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


def _prefer_grouped_mm(device: torch.device) -> bool:
    # On CPU, torch._grouped_mm loops over the groups itself and its autograd adds a
    # separate bias pass, so the fused split path was faster there (see bench/layer.py);
    # on CUDA the single grouped kernel wins.
    return device.type == "cuda"


def expert_seed(base_seed: int, moe_layer: int, expert: int) -> int:
    """The seed of one expert's initial values: a hash of (base seed, MoE layer, global expert index).

    Every rank derives the same number for the same expert, whatever the EP degree, so a rank can
    initialise exactly the experts it holds and EP 1, 2, 4 start from identical weights."""
    digest = hashlib.blake2b(f"msmoe-expert:{base_seed}:{moe_layer}:{expert}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def draw_base_seed() -> int:
    """One draw from the global torch generator: the base of a model's per-expert seeds. A model draws
    it at a fixed point of its build, so the stream after the build does not depend on the EP degree."""
    # A real draw even while the planner (msmoe_dist.plan) builds the model under FakeTensorMode, where a
    # tensor's value cannot be read; outside fake mode this is the plain draw.
    with unset_fake_temporarily():
        return int(torch.randint(0, 2**62, (1,)).item())


class Experts(nn.Module):
    """The experts `expert_ids` (global indices, contiguous; all `num_experts` by default) of one MoE layer.

    Only the held experts are allocated: under expert parallelism a rank builds its own slice and
    never a full [E, D, F] tensor. Expert e's weights are drawn from a generator seeded with
    `expert_seed(init_seed, moe_layer, e)` (init_seed None: one draw from the global generator), so
    they do not depend on which rank holds it or on how many experts that rank holds.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        ffn_dim: int,
        activation: str,
        init_std: float = 0.02,
        *,
        init_seed: int | None = None,
        moe_layer: int = 0,
        expert_ids: range | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {tuple(ACTIVATIONS)}")
        held = range(num_experts) if expert_ids is None else expert_ids
        if held.step != 1 or not 0 <= held.start < held.stop <= num_experts:
            raise ValueError(f"cannot hold experts {held} of {num_experts}")
        self.num_experts = len(held)
        self.expert_ids = held
        self.d_model = d_model
        self.ffn_dim = ffn_dim
        self.activation = activation
        self.init_seed = draw_base_seed() if init_seed is None else int(init_seed)
        self.moe_layer = moe_layer
        E = len(held)
        # Every tensor has the expert index as its leading dim: sharding is a slice along dim 0.
        self.w1 = _expert_parameter(torch.empty(E, d_model, ffn_dim))
        self.b1 = _expert_parameter(torch.empty(E, ffn_dim))
        self.w2 = _expert_parameter(torch.empty(E, ffn_dim, d_model))
        self.b2 = _expert_parameter(torch.empty(E, d_model))
        self.reset_parameters(init_std)

    @torch.no_grad()
    def keep_experts(self, experts: range) -> None:
        """Keep only `experts` (indices into this module's experts, step 1), as new tagged Parameters.

        For expert parallelism, before any optimiser holds the old tensors. The module object stays
        the same, so whoever holds it (or one of its bound methods) sees the slice.
        """
        if experts.step != 1 or not 0 <= experts.start < experts.stop <= self.num_experts:
            raise ValueError(f"cannot keep experts {experts} of {self.num_experts}")
        for name in ("w1", "b1", "w2", "b2"):
            old = getattr(self, name)
            new = _expert_parameter(old.detach()[experts.start : experts.stop].clone())
            new.requires_grad_(old.requires_grad)
            setattr(self, name, new)
        self.num_experts = len(experts)
        self.expert_ids = self.expert_ids[experts.start : experts.stop]

    def expert_generator(self, expert: int) -> torch.Generator:
        """A fresh generator of global expert ``expert``'s initial values (seeded by `expert_seed`): also for
        other initialisers (models/reference_init.py), which must not depend on the EP degree either."""
        return torch.Generator(device=self.w1.device).manual_seed(expert_seed(self.init_seed, self.moe_layer, expert))

    @torch.no_grad()
    def reset_parameters(self, init_std: float = 0.02) -> None:
        """w1, w2 ~ N(0, init_std) from each expert's own generator (w1 first, then w2); zero biases."""
        if self.w1.is_meta:  # nothing to fill (materialised later with to_empty + reset_parameters)
            return
        for i, e in enumerate(self.expert_ids):
            gen = self.expert_generator(e)
            self.w1[i].normal_(0.0, init_std, generator=gen)
            self.w2[i].normal_(0.0, init_std, generator=gen)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def _weights(self, x_RD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Input and weights in the compute dtype (autocast's, if active); casts stay on the tape.

        Must be called before autocast is switched off for the expert math.
        """
        dtype = x_RD.dtype
        if torch.is_autocast_enabled(x_RD.device.type):
            dtype = torch.get_autocast_dtype(x_RD.device.type)
        return x_RD.to(dtype), self.w1.to(dtype), self.b1.to(dtype), self.w2.to(dtype), self.b2.to(dtype)

    def _check(self, x_RD: Tensor, tokens_per_expert: Sequence[int]) -> tuple[int, ...]:
        counts = tuple(int(n) for n in tokens_per_expert)
        if len(counts) != self.num_experts or sum(counts) != x_RD.shape[0]:
            raise ValueError(
                f"tokens_per_expert {counts} does not describe {x_RD.shape[0]} rows over {self.num_experts} experts"
            )
        return counts

    def forward(self, x_RD: Tensor, tokens_per_expert: Sequence[int]) -> Tensor:
        counts = self._check(x_RD, tokens_per_expert)
        x, w1, b1, w2, b2 = self._weights(x_RD)
        with torch.autocast(device_type=x_RD.device.type, enabled=False):
            if _prefer_grouped_mm(x.device) and grouped_mm_works(x.device, x.dtype, self.d_model, self.ffn_dim):
                return self._forward_grouped_mm(x, w1, b1, w2, b2, counts)
            return _SplitFFN.apply(x, w1, b1, w2, b2, counts, self.activation)

    def _forward_grouped_mm(self, x, w1, b1, w2, b2, counts: tuple[int, ...]) -> Tensor:
        counts_E = torch.tensor(counts, device=x.device)
        offs = counts_E.cumsum(0).to(torch.int32)
        # Per-row biases: a gather of E bias rows, cheap next to the GEMMs. output_size: the row count
        # is known on the host, so repeat_interleave need not sync with the device to learn it.
        expert_R = torch.repeat_interleave(
            torch.arange(self.num_experts, device=x.device), counts_E, output_size=x.shape[0]
        )
        h = torch._grouped_mm(x, w1, offs=offs) + b1[expert_R]
        a = ACTIVATIONS[self.activation](h)
        return _ContiguousGrad.apply(torch._grouped_mm(a, w2, offs=offs)) + b2[expert_R]

    def forward_loop(self, x_RD: Tensor, tokens_per_expert: Sequence[int]) -> Tensor:
        """Obviously-correct reference: one plain matmul chain per expert, autograd does the rest."""
        counts = self._check(x_RD, tokens_per_expert)
        x, w1, b1, w2, b2 = self._weights(x_RD)
        act = ACTIVATIONS[self.activation]
        with torch.autocast(device_type=x_RD.device.type, enabled=False):
            # Empty chunks go through too: 0-row matmuls are valid and keep the graph whole.
            outs = [act(x[s:t] @ w1[e] + b1[e]) @ w2[e] + b2[e] for e, s, t in _bounds(counts)]
            return torch.cat(outs)
