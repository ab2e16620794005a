"""Memory per rank of one training step: model state as the engine partitions it, activations, buffers.

Model state (bytes per parameter; P_d dense, P_e this rank's experts; N = the group the state is split
over: the data-parallel world for dense, the expert-data-parallel group (world / ep_size) for experts,
as DeepSpeed's ZeRO partitions MoE parameter groups):

    engine, dtype                 params   grads            optimiser (Adam)            extra
    native (one process), any     4        4                8 + 4 per tensor (step)     (bf16: autocast)
    deepspeed fp32, ZeRO 0        4        4                8                           -
    deepspeed bf16/fp16, ZeRO 0   2        2 + 4 (fp32)     12 (fp32 master, m, v)      -
    deepspeed, ZeRO 1             w        w / N (*)        (4 + 8) / N                 reduce bucket
    deepspeed, ZeRO 2             w        w / N (*)        (4 + 8) / N                 reduce bucket
(w = 2 for bf16/fp16, 4 for fp32; ZeRO 1/2 keep an fp32 master partition even for fp32 weights; the ZeRO 1/2
reduce bucket is DeepSpeed's default reduce_bucket_size, 5e8 elements of w bytes, which msmoe_dist does
not change (zero_bucket_bytes). SGD keeps one momentum buffer of 4 bytes instead of Adam's 8.
(*) DeepSpeed 0.19 treats ZeRO 1 like ZeRO 2 here (contiguous_gradients, which msmoe_dist sets): gradients
go through the reduce bucket and each rank keeps only those of its partition, as whole tensors: every
tensor that reaches into the partition (_partition_grad_elements). At least 1/N; a tensor spanning several
partitions is kept whole by each of them, so at a large N the biggest tensors (embedding, output layer, a
layer's stacked experts) set it.)

Activations (bytes saved for backward, from the census of the real model, per micro-batch):

    none        sum over blocks (moe_rows * f + router + rest) + outside  (a block's input is among these)
    block       sum over blocks of input + max over blocks of (moe_rows * f + router + rest) + outside
                (torch.utils.checkpoint of whole blocks: each block's input is kept; in backward one block
                at a time is recomputed and holds its activations)
    selective   sum over blocks (input + moe_rows * f + router) + max over blocks of rest + outside
                (attention, norms and the dense parts are recomputed; the MoE layer's saved tensors stay)
f: the imbalance (max / mean rows on one rank) for the worst rank; 1 for the expected, balanced case.

Buffers live at once at the peak (in backward): the all-to-all buffers of one MoE layer (send and
receive, T*K*D each, f times for the worst receiver; capacity: E*C*D exactly), the backward working set
of one block (the gradients of its activations: as large as what it saved) and the output layer's
transient logits (full: the [N, V] gradient and log-softmax gradient in fp32; chunked: two
[chunk, V] fp32 buffers, plus the fp32 [V, D] weight gradient under bf16; adaptive: small).
"""

from __future__ import annotations

from dataclasses import dataclass

from msmoe_dist.plan.census import Census

MODES = ("none", "block", "selective")
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)


@dataclass(frozen=True)
class Setting:
    """One candidate run (what the search varies, plus what the config fixes)."""

    world: int
    ep_size: int
    zero_stage: int
    micro_batch: int
    checkpointing: str
    dtype: str
    engine: str  # native or deepspeed
    optimizer: str  # adam, adamw, sgd
    imbalance: float = 1.0

    @property
    def dp(self) -> int:
        return self.world

    @property
    def edp(self) -> int:
        return self.world // self.ep_size


@dataclass(frozen=True)
class Memory:
    """Bytes per rank (rank with the most rows when imbalance > 1)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    a2a_buffers: int
    transient: int  # one block's backward working set or the output layer's logits, whichever is larger
    zero_bucket: int

    @property
    def model_state(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def peak(self) -> int:
        return self.model_state + self.activations + self.a2a_buffers + self.transient + self.zero_bucket


def weight_bytes(s: Setting) -> int:
    return 4 if s.engine == "native" or s.dtype == "fp32" else 2


def model_state_bytes(c: Census, s: Setting) -> tuple[int, int, int]:
    """(params, grads, optimiser) bytes on one rank (module docstring table)."""
    tensors = c.dense_tensors + c.expert_tensors
    moments = 4 if s.optimizer == "sgd" else 8
    P = c.dense_params + c.expert_params_rank
    if s.engine == "native":
        step = 0 if s.optimizer == "sgd" else 4 * tensors  # torch Adam's 0-d float32 step per parameter tensor
        return 4 * P, 4 * P, moments * P + step
    w = weight_bytes(s)
    # Adam's 0-d float32 step count: one per tensor it steps (ZeRO 0: each parameter; ZeRO 1/2: each parameter
    # group, which DeepSpeed flattens into one tensor)
    steps = 0 if s.optimizer == "sgd" else 4 * (tensors if s.zero_stage == 0 else len(c.param_groups))

    def part(n: int, group: int) -> tuple[float, float, float]:
        if s.zero_stage == 0:
            if w == 2:
                return 2 * n, (2 + 4) * n, (4 + moments) * n
            return 4 * n, 4 * n, moments * n
        return w * n, w * n / group, (4 + moments) * n / group

    d = part(c.dense_params, s.dp)
    e = part(c.expert_params_rank, s.edp)
    grads = d[1] + e[1]
    if s.zero_stage and c.param_groups:
        grads = w * sum(_partition_grad_elements(numels, s.edp if moe else s.dp) for moe, numels in c.param_groups)
    return int(d[0] + e[0]), int(grads), int(d[2] + e[2]) + steps


def _partition_grad_elements(numels: tuple[int, ...], group: int) -> int:
    """Gradient elements DeepSpeed ZeRO 1/2 keeps of one parameter group on the rank that keeps most, in a group of
    `group` ranks: it flattens the parameter group, cuts it into `group` equal partitions, and each rank keeps
    (averaged_gradients) the whole gradient of every tensor that reaches into its partition
    (stage_1_and_2.py get_partition_info), not just the slice."""
    size = max(1, -(-sum(numels) // group))
    kept: dict[int, int] = {}
    start = 0
    for n in numels:
        if n:
            for part in range(start // size, (start + n - 1) // size + 1):
                kept[part] = kept.get(part, 0) + n
        start += n
    return max(kept.values(), default=0)


def activation_bytes(c: Census, mode: str, imbalance: float = 1.0) -> int:
    """Saved-for-backward bytes of one micro-batch under train.activation_checkpointing=mode (docstring)."""
    if mode not in MODES:
        raise ValueError(f"unknown activation checkpointing mode {mode!r}")
    f = imbalance if c.routed_rows and not _capacity_padded(c) else 1.0
    blocks = c.blocks
    if mode == "none":
        inner = sum(b.moe_row_bytes * f + b.moe_token_bytes + b.rest_bytes for b in blocks)
    elif mode == "block":
        inner = sum(b.input_bytes for b in blocks) + max(
            (b.moe_row_bytes * f + b.moe_token_bytes + b.rest_bytes for b in blocks), default=0
        )
    else:
        inner = sum(b.input_bytes + b.moe_row_bytes * f + b.moe_token_bytes for b in blocks) + max(
            (b.rest_bytes for b in blocks), default=0
        )
    return int(inner + c.outside_saved_bytes)


def _capacity_padded(c: Census) -> bool:
    return c.capacity_rows is not None


def a2a_buffer_bytes(c: Census, s: Setting) -> int:
    """Send + receive buffers of one MoE layer's all-to-all on the worst rank (0 without expert parallelism)."""
    if s.ep_size == 1 or c.num_moe_layers == 0:
        return 0
    row = c.d_model * c.act_bytes
    send = c.tokens * c.top_k * row
    if c.capacity_rows is not None:
        return 2 * c.capacity_rows * row
    return int(send + send * s.imbalance)


def output_transient_bytes(c: Census, s: Setting, output_layer: str, chunk_tokens: int) -> int:
    if c.kind == "vit":  # one [B, classes] fp32 logit row and its gradient per image
        return 2 * c.micro_batch * c.vocab * 4
    N, V = c.tokens, c.vocab
    if output_layer == "full":
        return 2 * N * V * 4
    if output_layer == "chunked":
        extra = 0 if s.dtype == "fp32" else V * c.d_model * 4  # fp32 weight-gradient accumulator
        return 2 * min(chunk_tokens, N) * V * 4 + extra
    return 0  # adaptive: its logits are saved (census), the tails are small


def zero_bucket_bytes(c: Census, s: Setting, device: str = "cuda") -> int:
    """DeepSpeed ZeRO 1 and 2 (contiguous_gradients, which msmoe_dist sets) allocate a reduce bucket of
    reduce_bucket_size elements of the gradient dtype (= w: DeepSpeed's grad_accum_dtype defaults to the
    weights' dtype) once a step, whatever the model's size (stage_1_and_2.py setup_buckets). A GPU's caching
    allocator holds all of it; a CPU commits only the pages written: this rank's gradients."""
    if s.engine != "deepspeed" or s.zero_stage == 0:
        return 0
    full = DS_REDUCE_BUCKET * weight_bytes(s)
    return min(full, (c.dense_params + c.expert_params_rank) * weight_bytes(s)) if device == "cpu" else full


def plan_memory(c: Census, s: Setting, output_layer: str, chunk_tokens: int, device: str = "cuda") -> Memory:
    params, grads, optim = model_state_bytes(c, s)
    acts = activation_bytes(c, s.checkpointing, s.imbalance)
    f = s.imbalance if c.capacity_rows is None else 1.0
    block_ws = max((b.moe_row_bytes * f + b.moe_token_bytes + b.rest_bytes for b in c.blocks), default=0)
    transient = max(int(block_ws), output_transient_bytes(c, s, output_layer, chunk_tokens))
    return Memory(params, grads, optim, acts, a2a_buffer_bytes(c, s), transient, zero_bucket_bytes(c, s, device))
