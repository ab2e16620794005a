"""The census of one rank's model: parameter counts, FLOPs and saved activations, from the real model code.

The model is built by :func:`msmoe_dist.models.build.build_model` from the typed config under
``FakeTensorMode`` (fake CPU tensors: shapes and dtypes, no storage), so a 1,024-GPU plan costs what a
one-rank build costs, and the shapes are the code's own, not a second description of the architecture.

What is counted, on one forward + backward of one micro-batch of one rank:

- parameters: every unique parameter (tied weights once), split by :func:`msmoe_dist.moe.is_expert_param`
  into dense and expert parts; the expert part per rank is what ``ParallelLayout.local_experts`` of rank 0
  keeps (``Experts.keep_experts`` slices the leading expert dim, so it is total * local / E exactly);
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention), attributed by module
  (experts, attention, router, rest of the blocks, and the output layer = everything outside the blocks);
- activations: bytes saved for backward, seen through ``torch.autograd.graph.saved_tensors_hooks``,
  attributed to the block (its input, its MoE layer's routed rows, its router, the rest) or to the part
  outside the blocks (embeddings, output layer). Tensors sharing a storage are counted once; parameters
  (and views of them) are not activations and are skipped.

Routing is fixed for the census, and this changes what the real model would do: the router's
``bincount`` and the dispatcher's host-side counts are data-dependent and cannot run on fake tensors.
So each MoE layer's router computes its logits, softmax and top-k as usual (the same FLOPs and saved
tensors) but the assignment is replaced by a deterministic balanced one (assignment a goes to expert
a mod E), and the dispatcher is :class:`CensusDispatcher`, which gives every local expert the same
number of rows: T*K/E (dropless), or exactly C = ceil(capacity_factor*T*K/E) padded rows per expert
and source rank under expert parallelism with a capacity (what ``AllToAllDispatcher`` sends), or
min(T*K/E, C) on one rank. Imbalance is applied afterwards by the planner (msmoe_dist/plan/memory.py).
An adaptive softmax is counted with its real modules on a Zipf(1) split of the targets over its clusters.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from msmoe_dist.config.schema import Config
from msmoe_dist.moe import MoELayer, is_expert_param
from msmoe_dist.moe.dispatcher import (
    Combined,
    DispatchState,
    ExpertCompute,
    expert_capacity,
    permute,
    run_blocking,
    unpermute,
)
from msmoe_dist.moe.router import Routing
from msmoe_dist.parallel.layout import ParallelLayout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BlockSaved:
    """Bytes one block keeps for backward (one micro-batch, one rank)."""

    input_bytes: int  # what enters the block: the hidden state and the momentum state (kept by block checkpointing)
    moe_row_bytes: int  # saved inside the MoE layer per routed row (dispatch, experts, combine): grows with imbalance
    moe_token_bytes: int  # saved by the router (per token)
    rest_bytes: int  # attention, norms, dense FFN, momentum, residuals


@dataclass(frozen=True)
class Census:
    """One rank's model at one micro-batch (see the module docstring for how each figure is taken)."""

    micro_batch: int
    seq_len: int
    vocab: int
    dtype: str
    num_experts: int
    local_experts: int
    top_k: int
    d_model: int
    num_moe_layers: int
    dense_params: int  # unique, trainable
    expert_params_rank: int  # this rank's experts
    expert_params_total: int  # every expert of the model
    dense_tensors: int
    expert_tensors: int
    routed_rows: int  # rows each rank's experts process per MoE layer (balanced)
    flops: dict[str, int]  # forward + backward: expert, attention, router, block_other, output
    blocks: tuple[BlockSaved, ...]
    outside_saved_bytes: int  # embeddings, final norm, output layer
    act_bytes: int = field(default=0)  # element size of the activations (the compute dtype)
    capacity_rows: int | None = None  # capacity mode under EP: the padded E*C rows each all-to-all moves
    kind: str = "lm"  # model.kind: lm (seq_len tokens per sequence, vocab outputs per token) or vit (seq_len
    # patch tokens per image, vocab = classes, one prediction per image)
    ops: int = 0  # aten operator calls of forward + backward (each one a kernel launch or a CPU dispatch)
    expert_ops: int = 0  # of which in the experts (CPU path: a loop over the local experts)
    work: dict[str, int] = field(default_factory=dict)  # GEMM FLOPs by size class, RNG elements, bytes (_OpCounter)
    # the optimiser's parameter groups as training builds them (train/optim.param_groups): (experts?, the numel of
    # each of this rank's tensors, in order), which DeepSpeed's ZeRO flattens and partitions group by group
    param_groups: tuple[tuple[bool, tuple[int, ...]], ...] = ()

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    @property
    def saved_bytes(self) -> int:
        """Everything saved for backward without checkpointing (a block's input is among what its parts save)."""
        return self.outside_saved_bytes + sum(b.moe_row_bytes + b.moe_token_bytes + b.rest_bytes for b in self.blocks)


# --------------------------------------------------------------------------- routing fixed for the census


class CensusDispatcher:
    """A Dispatcher (moe/dispatcher.py) that runs on fake tensors: every expert gets `rows_per_expert` rows.

    Rows are gathered from the tokens in a fixed order (row r reads token r mod T), so the experts, the
    gather and the weighted scatter back run on real shapes; no count is read from a tensor.
    """

    def __init__(self, num_local_experts: int, rows_per_expert: list[int]):
        self.num_local_experts = num_local_experts
        self.rows_per_expert = rows_per_expert

    def capacity(self, factor: float, num_tokens: int, top_k: int, device: torch.device) -> int | None:
        return None  # the rows are decided by the planner; see census_dispatcher_rows

    def dispatch(self, x_TD: Tensor, routing: Routing, capacity: int | None):
        T = x_TD.shape[0]
        R = sum(self.rows_per_expert)
        # The same ops as LocalDispatcher.dispatch on a fixed sorted order: k-major assignment a -> token a mod T.
        assignment_A = torch.arange(R, device=x_TD.device) % max(routing.weights_TK.numel(), 1)
        token_R = assignment_A % T
        weight_R = routing.weights_TK.t().reshape(-1)[assignment_A]
        counts = tuple(self.rows_per_expert)
        state = DispatchState(token_R, weight_R, T, counts, counts, 0, None)
        return permute(x_TD, token_R), list(counts), state

    def combine(self, y_RD: Tensor, state: DispatchState) -> Combined:
        return Combined(unpermute(y_RD, state.token_R, state.weight_R, state.num_tokens), y_RD, state)

    def exchange_and_compute(
        self, x_TD: Tensor, routing: Routing, capacity: int | None, experts: ExpertCompute, overlap_chunks: int = 1
    ) -> Combined:
        """Blocking: the census counts what is saved and computed, not when (overlap changes neither)."""
        return run_blocking(self, x_TD, routing, capacity, experts)


def census_rows_per_expert(cfg: Config, tokens: int, layout: ParallelLayout) -> list[int]:
    """Rows each local expert of rank 0 processes per MoE layer under balanced routing (module docstring)."""
    E, K = cfg.moe.num_experts, cfg.moe.top_k
    local = len(layout.local_experts(0, E))
    cap = expert_capacity(cfg.moe.capacity_factor, tokens, K, E)
    if cap is not None and layout.ep_size > 1:
        return [cap * layout.ep_size] * local  # C rows from each of the P source ranks, padded
    # Balanced: the EP group's P ranks together send P*T*K rows to the E experts, the remainder to the
    # first experts; rank 0 holds the first E/P of them.
    total = tokens * K * layout.ep_size
    per = [total // E + (1 if e < total % E else 0) for e in range(E)]
    if cap is not None:
        per = [min(n, cap) for n in per]
    return per[:local]


def _balanced_router_forward(router: Any):
    """The router's forward with its assignment fixed to a balanced one (see the module docstring)."""
    real = router.forward

    def forward(x_TD: Tensor, token_T: Tensor | None = None) -> Routing:
        E, K = router.num_experts, router.top_k
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            weight = getattr(router, "weight", None)
            if weight is None:  # a router without a plain gate matrix: its real forward, assignment replaced
                routing = real(x_TD, token_T)
                logits = routing.logits_TE
            else:
                logits = F.linear(x_TD.float(), weight.float())
            probs = torch.softmax(logits, dim=-1)
            top_logits, _ = logits.topk(K, dim=-1)
            weights_TK = torch.softmax(top_logits, dim=-1)
            T = x_TD.shape[0]
            experts_TK = (torch.arange(T * K, device=x_TD.device).view(K, T).t() % E).contiguous()
            # The balance loss with f_e = 1/E (balanced counts): the same ops on P_e as switch_balance_loss.
            aux = E * probs.mean(dim=0).sum() / E * getattr(router, "balance_loss_coef", 0.0)
        zero = logits.new_zeros(())
        return Routing(experts_TK, weights_TK, logits, probs, zero, zero, aux + zero)

    return forward


# --------------------------------------------------------------------------- adaptive softmax on fixed targets


def zipf_cluster_fractions(vocab: int, cutoffs: list[int]) -> list[float]:
    """Share of Zipf(1) targets (weights 1/(id + 2.7), msmoe-bench memory's law) in the shortlist and each tail."""
    ids = torch.arange(vocab, dtype=torch.float64)
    w = 1.0 / (ids + 2.7)
    edges = [0, *cutoffs, vocab]
    total = float(w.sum())
    return [float(w[a:b].sum()) / total for a, b in zip(edges, edges[1:])]


def _adaptive_forward(head: nn.AdaptiveLogSoftmaxWithLoss, vocab: int):
    """AdaptiveLogSoftmaxWithLoss's computation on a fixed split of the targets: the head over every token,
    tail cluster i over round(fraction_i * N) tokens (its own projection and log-softmax)."""
    fractions = zipf_cluster_fractions(vocab, list(head.cutoffs[:-1]))

    def forward(h_ND: Tensor, targets_N: Tensor):
        N = h_ND.shape[0]
        head_lp = F.log_softmax(head.head(h_ND), dim=1)
        out = head_lp[:, 0]
        pieces = [out]
        for i, frac in enumerate(fractions[1:]):
            n = max(1, round(frac * N))
            rows = h_ND[:n]
            lp = F.log_softmax(head.tail[i](rows), dim=1)
            pieces.append(lp[:, 0] + head_lp[:n, head.shortlist_size + i])
        return nn.modules.adaptive._ASMoutput(torch.cat(pieces)[:N], out.sum())

    return forward


# --------------------------------------------------------------------------- the census


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kw) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _addmm_inplace_flops(self_shape, mat1_shape, mat2_shape, *args, out_shape=None, **kwargs) -> int:
    m, k = mat1_shape
    return 2 * m * k * mat2_shape[1]


# FlopCounterMode knows the CUDA attention kernels and out-of-place addmm; fake CPU tensors dispatch to the
# CPU flash kernel, and the chunked softmax accumulates its weight gradient with addmm_.
_EXTRA_FLOPS = {
    torch.ops.aten.addmm_: _addmm_inplace_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


_GEMMS = {"mm", "bmm", "addmm", "addmm_", "baddbmm", "addbmm"}
_SDPA = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"}
_RNG = {"bernoulli", "bernoulli_", "native_dropout", "rand", "rand_like", "randn", "randn_like", "uniform_", "normal_"}
_NO_TRAFFIC = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "detach",
    "lift_fresh",
    "_unsafe_view",
}


def gemm_bucket(min_dim: int) -> int:
    """The GEMM size class of a matmul: the largest power of two <= its smallest of m, k, n (1 ... 1024)."""
    return 1 << max(0, min(10, int(min_dim).bit_length() - 1))


def _gemm_work(name: str, args: tuple, out: Any) -> tuple[int, int]:
    """(FLOPs, smallest of m, k, n) of one matmul call; batched matmuls count each item, the batch not in min."""
    if name in _SDPA:  # the CPU flash kernel: q, k, v [B, H, S, hd] (forward) or after grad_out (backward)
        q, k = (args[1], args[2]) if name.endswith("backward") else (args[0], args[1])
        B, H, S, hd = q.shape
        Sk = k.shape[-2]
        flops = 4 * B * H * S * Sk * hd * (2 if name.endswith("backward") else 1)
        return flops, min(S, Sk, hd)
    a, b = (args[1], args[2]) if name in ("addmm", "addmm_", "baddbmm", "addbmm") else (args[0], args[1])
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = a.shape[0] if a.dim() == 3 else 1
    return 2 * batch * m * k * n, min(m, k, n)


def _tensor_bytes(x: Any) -> int:
    """Bytes a call reads or writes of x: a broadcast (stride-0) dimension is read once, not once per index."""
    if isinstance(x, Tensor):
        n = 1
        for size, stride in zip(x.shape, x.stride()):
            n *= size if stride else 1
        return n * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_tensor_bytes(y) for y in x)
    return 0


class _OpCounter(TorchDispatchMode):
    """Counts, per aten call of forward + backward, what it costs to run (the step-time model, plan/step_time.py):

    - every call: one eager dispatch (the per-operator overhead). Separately those of the experts: the CPU path
      loops over the local experts (a few calls per expert), the CUDA path runs them as one grouped GEMM;
    - matmuls (mm, bmm, addmm, baddbmm, the CPU flash-attention kernel): FLOPs by GEMM size class (gemm_bucket
      of the smallest of m, k, n: small matmuls run far below the sustained rate, attention's head dim most);
    - random-number ops (dropout's bernoulli): elements drawn;
    - everything else but views and allocations: bytes read and written (the tensors in and out).

    Keys of ``work``: '<part>.gemm<bucket>', '<part>.rng', '<part>.bytes', part 'expert' or 'other'.
    In forward the experts module's hooks set ``in_experts``; in backward the autograd node being run tells
    (the experts' own Function)."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.expert_calls = 0
        self.in_experts = False
        self.work: dict[str, int] = {}

    def _add(self, key: str, n: int) -> None:
        self.work[key] = self.work.get(key, 0) + int(n)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        node = torch._C._current_autograd_node()
        expert = self.in_experts or (node is not None and "SplitFFN" in node.name())
        if expert:
            self.expert_calls += 1
        part = "expert" if expert else "other"
        name = func.overloadpacket.__name__
        if name in _GEMMS or name in _SDPA:
            flops, min_dim = _gemm_work(name, args, out)
            self._add(f"{part}.gemm{gemm_bucket(min_dim)}", flops)
        elif name in _RNG:
            self._add(f"{part}.rng", out[0].numel() if isinstance(out, tuple) else out.numel())
        elif not func.is_view and name not in _NO_TRAFFIC and func.namespace == "aten" and _tensor_bytes(out):
            self._add(f"{part}.bytes", _tensor_bytes(list(args)) + _tensor_bytes(out))
        return out


class _SavedTensors:
    """Pack hook that adds each saved tensor's storage once to the part of the model running now."""

    def __init__(self, params: set[int]):
        self.params = params
        self.seen: dict[int, Tensor] = {}  # id(base) -> base: kept alive so ids stay unique
        self.where = "outside"
        self.bytes: dict[str, int] = {}

    def pack(self, t: Tensor) -> Tensor:
        base = t._base if t._base is not None else t
        if id(base) in self.params or id(base) in self.seen:
            return t
        self.seen[id(base)] = base
        nbytes = base.untyped_storage().nbytes()
        self.bytes[self.where] = self.bytes.get(self.where, 0) + nbytes
        return t


@contextlib.contextmanager
def _attributing(model: Any, saved: _SavedTensors, inputs: dict[int, int]) -> Iterator[None]:
    """Set ``saved.where`` to 'b{i}.moe_row' / 'b{i}.moe_token' / 'b{i}.rest' while block i's parts run forward."""
    handles = []

    def enter(name: str):
        def hook(mod, args, kwargs=None):
            saved.where = name

        return hook

    for i, block in enumerate(model.blocks):

        def pre_block(mod, args, i=i):
            x, state = args[0], args[1]
            tensors = [x, *(t for t in (state.p, state.m, state.v) if t is not None)]
            inputs[i] = sum(t.untyped_storage().nbytes() for t in tensors)
            saved.where = f"b{i}.rest"

        handles.append(block.register_forward_pre_hook(pre_block))
        handles.append(block.register_forward_hook(lambda m, a, o: setattr(saved, "where", "outside")))
        if block.is_moe:
            handles.append(block.moe.register_forward_pre_hook(enter(f"b{i}.moe_row")))
            handles.append(block.moe.register_forward_hook(enter(f"b{i}.rest")))
            handles.append(block.moe.router.register_forward_pre_hook(enter(f"b{i}.moe_token")))
            handles.append(block.moe.router.register_forward_hook(enter(f"b{i}.moe_row")))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def build_census_model(
    cfg: Config, vocab: int, layout: ParallelLayout, micro_batch: int, flash_attention: bool = True
) -> Any:
    """Rank 0's model under the ambient FakeTensorMode: built from the config, experts sliced to rank 0's
    share, routing fixed (module docstring), in the compute dtype of the engine that would run it.

    flash_attention: plan for a GPU, whose flash kernel saves q, k, v, the output and one log-sum-exp per
    row even with attention dropout. On CPU, attention dropout > 0 falls back to the math kernel, which
    saves the [B, H, S, S] probabilities; False keeps that (the cpu-local cluster)."""
    from msmoe_dist.models.build import build_model

    # Several processes (any DeepSpeed run) in bf16/fp16 hold the weights in that dtype, as DeepSpeed does:
    # built in it (Module.to cannot swap fake parameters).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[cfg.train.dtype])
    try:
        model: Any = build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, vocab)
    finally:
        torch.set_default_dtype(previous)
    tokens = micro_batch * (vit_tokens(cfg) if cfg.model.kind == "vit" else cfg.data.seq_len)
    rows = census_rows_per_expert(cfg, tokens, layout)
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        layer.experts.keep_experts(layout.local_experts(0, cfg.moe.num_experts))
        layer.dispatcher = CensusDispatcher(len(rows), rows)
        layer.router.forward = _balanced_router_forward(layer.router)  # type: ignore[method-assign]
    if flash_attention:
        for block in model.blocks:
            block.attn.dropout = 0.0  # the CPU flash kernel (what fake tensors run) has no dropout
    if cfg.model.kind == "lm" and cfg.model.output_layer == "adaptive":
        model.head.forward = _adaptive_forward(model.head, vocab)
    model.train()
    return model


def vit_tokens(cfg: Config) -> int:
    """Tokens of one image in the V-MoE: its patches, and the class token when vision.pooling=cls."""
    v = cfg.vision
    return (v.image_size // v.patch_size) ** 2 + (1 if v.pooling == "cls" else 0)


def _backward_of(ops: dict) -> int:
    """Backward FLOPs of a block part from its forward ops: a matmul whose input and weight both need
    gradients costs twice its forward again; attention 2.5x (FlopCounterMode's own sdpa formulas)."""
    total = 0
    for op, n in ops.items():
        total += n * 5 // 2 if "scaled_dot_product" in str(op) else 2 * n
    return total


def _attributed_flops(fwd_counts: dict[str, dict], bwd_total: int) -> dict[str, int]:
    """Forward + backward FLOPs by part. FlopCounterMode attributes the forward to modules reliably, the
    backward not (autograd runs outside the modules' hooks), so each block part's backward is derived
    from its forward ops (_backward_of) and the output layer takes the rest of the measured total,
    which includes the chunked softmax's recomputed logits."""
    fwd_total = sum(fwd_counts["Global"].values())

    def part(pattern: str) -> tuple[int, int]:
        rx = re.compile(pattern)
        rows = [ops for name, ops in fwd_counts.items() if rx.search(name)]
        return sum(sum(ops.values()) for ops in rows), sum(_backward_of(ops) for ops in rows)

    out: dict[str, int] = {}
    blocks_f, blocks_b = part(r"\.blocks\.\d+$")
    for name, pattern in (
        ("expert", r"\.blocks\.\d+\.moe\.experts$"),
        ("attention", r"\.blocks\.\d+\.attn$"),
        ("router", r"\.blocks\.\d+\.moe\.router$"),
    ):
        f, b = part(pattern)
        out[name] = f + b
    out["block_other"] = blocks_f + blocks_b - sum(out.values())
    out["output"] = fwd_total + bwd_total - blocks_f - blocks_b
    return out


PROXY_NUMEL = 1024  # elements of each stand-in parameter of the optimiser count


def optimizer_work(cfg: Config, model: Any) -> dict[str, int]:
    """What one step of the real optimiser costs (census._OpCounter), with gradient clipping when the config clips.

    Optimisers read a step count with ``.item()``, which fake tensors cannot, so the real optimiser of
    ``train.optim.build_optimizer`` runs on real stand-ins: one tensor of PROXY_NUMEL elements per parameter,
    in the same groups (decay or not). Its calls are those of the real step (they go per tensor); its bytes per
    element, times the model's parameters, are the real step's bytes. The second step is counted (the first
    allocates the state). Keys: optim.calls, optim.bytes, optim.params (the parameters those bytes are for)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from msmoe_dist.train.optim import build_optimizer, param_groups

    groups = param_groups(model, cfg.optim.weight_decay)
    numel = sum(p.numel() for g in groups for p in g["params"])
    with unset_fake_temporarily():
        proxies = [{**g, "params": [torch.zeros(PROXY_NUMEL, requires_grad=True) for _ in g["params"]]} for g in groups]
        flat = [p for g in proxies for p in g["params"]]
        for p in flat:
            p.grad = torch.ones_like(p)
        opt = build_optimizer(proxies, cfg.optim)
        counter = _OpCounter()
        for counted in (False, True):
            with counter if counted else contextlib.nullcontext():
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(flat, cfg.optim.grad_clip)
                opt.step()
    bytes_per_element = counter.work.get("other.bytes", 0) / max(len(flat) * PROXY_NUMEL, 1)
    return {"optim.calls": counter.calls, "optim.bytes": round(bytes_per_element * numel), "optim.params": numel}


def take_census(
    cfg: Config, vocab: int, layout: ParallelLayout, micro_batch: int, flash_attention: bool = True
) -> Census:
    """Build rank 0's model on fake tensors and count it (module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from msmoe_dist.train.optim import param_groups

    vit = cfg.model.kind == "vit"
    S = vit_tokens(cfg) if vit else cfg.data.seq_len
    with FakeTensorMode(allow_non_fake_inputs=False):
        model = build_census_model(cfg, vocab, layout, micro_batch, flash_attention)
        params = {id(p): p for p in model.parameters() if p.requires_grad}
        dense = [p for p in params.values() if not is_expert_param(p)]
        expert = [p for p in params.values() if is_expert_param(p)]
        if vit:  # images and their class ids
            side = cfg.vision.image_size
            idx = torch.zeros(micro_batch, 3, side, side, dtype=DTYPES[cfg.train.dtype])
            tgt = torch.zeros(micro_batch, vocab)  # one-hot rows (as mixup gives): one_hot cannot run on fakes
        else:
            idx = torch.zeros(micro_batch, S, dtype=torch.long)
            tgt = torch.zeros(micro_batch, S, dtype=torch.long)
        saved = _SavedTensors(set(params))
        inputs: dict[int, int] = {}
        fwd = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)
        bwd = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)
        ops = _OpCounter()
        for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
            layer.experts.register_forward_pre_hook(lambda m, a: setattr(ops, "in_experts", True))
            layer.experts.register_forward_hook(lambda m, a, o: setattr(ops, "in_experts", False))
        with fwd, ops, _attributing(model, saved, inputs):
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                out = model(idx, tgt)
                saved.where = "outside"
                loss = out.loss + out.aux_loss
        with bwd, ops:
            loss.backward()
        opt_work = optimizer_work(cfg, model)
        groups = tuple(
            (bool(g["moe"]), tuple(p.numel() for p in g["params"]))
            for g in param_groups(model, cfg.optim.weight_decay)
            if g["params"]
        )
    flops = _attributed_flops(fwd.get_flop_counts(), sum(bwd.get_flop_counts()["Global"].values()))
    E = cfg.moe.num_experts
    local = len(layout.local_experts(0, E))
    blocks = tuple(
        BlockSaved(
            input_bytes=inputs.get(i, 0),
            moe_row_bytes=saved.bytes.get(f"b{i}.moe_row", 0),
            moe_token_bytes=saved.bytes.get(f"b{i}.moe_token", 0),
            rest_bytes=saved.bytes.get(f"b{i}.rest", 0),
        )
        for i in range(len(model.blocks))
    )
    act_dtype = DTYPES[cfg.train.dtype]
    return Census(
        micro_batch=micro_batch,
        seq_len=S,
        kind=cfg.model.kind,
        vocab=vocab,
        dtype=cfg.train.dtype,
        num_experts=E,
        local_experts=local,
        top_k=cfg.moe.top_k,
        d_model=cfg.model.d_model,
        num_moe_layers=sum(1 for b in model.blocks if b.is_moe),
        dense_params=sum(p.numel() for p in dense),
        expert_params_rank=sum(p.numel() for p in expert),
        expert_params_total=sum(p.numel() for p in expert) * E // local,
        dense_tensors=len(dense),
        expert_tensors=len(expert),
        param_groups=groups,
        routed_rows=sum(census_rows_per_expert(cfg, micro_batch * S, layout)),
        flops=flops,
        blocks=blocks,
        outside_saved_bytes=saved.bytes.get("outside", 0),
        act_bytes=torch.empty((), dtype=act_dtype).element_size(),
        ops=ops.calls,
        expert_ops=ops.expert_calls,
        work={**ops.work, **opt_work},
        capacity_rows=(
            sum(census_rows_per_expert(cfg, micro_batch * S, layout))
            if cfg.moe.capacity_factor > 0 and layout.ep_size > 1
            else None
        ),
    )
