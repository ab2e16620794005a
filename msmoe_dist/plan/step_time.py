"""Time of one optimiser step on one rank, from the census FLOPs, the bytes that move, and the cluster.

Per micro-batch (a step runs m = data.batch_size / micro_batch * train.grad_accum_steps of them), from what the
census counted per aten call of forward + backward (census._OpCounter):

    compute    every matmul's FLOPs / (sustained rate * the cluster's efficiency for its GEMM size class: the
               smallest of m, k, n; this CPU runs head-dim-16 matmuls at a quarter to a third of its large-GEMM rate),
               the experts' part times f; plus the recomputed forward: block checkpointing runs every block's
               forward again (1/3 of the blocks' FLOPs: a matmul's backward costs twice its forward), selective
               the forward of attention and the rest, at the step's average GEMM rate
    memory     bytes read and written by every other call (views and allocations excepted) / the element-wise
               bandwidth, plus random numbers drawn (dropout masks) / the cluster's RNG rate; times (1 + the
               recomputed share) under checkpointing
    overhead   aten calls of forward + backward (counted in the census; on CUDA the experts' per-expert CPU loop
               is replaced by the grouped-GEMM path's ~40 calls per layer) * the cluster's op_overhead_us. On a CPU
               the calls run one after another with the math: compute + memory + overhead. On a GPU the launches
               are asynchronous: max(compute + memory, overhead) (a small model is launch-bound).
    all-to-all 4 per MoE layer (dispatch and combine, forward and backward; +2 with block checkpointing; dropless
               under EP one more per forward for the counts),
               each moving T*K*D*b*f bytes per rank; the share (ep - g) / ep with g = ranks of the EP group on
               the same node goes over the network, the rest over NVLink, both at once: time = max of the two
               + latency. ep_size 1 moves nothing.
Per step:
    gradients  dense: 2 (N-1)/N * P_d * w bytes over the data-parallel group (all-reduce, or reduce-scatter +
               all-gather of the updated weights with ZeRO 1/2: the same bytes); experts the same over their
               EDP group. A group inside one node uses the NVLink rate, one spanning nodes the network rate. Plus
               the latency of the step's small all-reduces (STEP_COLLECTIVES) on more than one rank.
    optimiser  over this rank's partition (and the gradient clipping): on a GPU a fused Adam, 28 bytes per
               parameter held / memory bandwidth; on a CPU the real optimiser's step as counted by the census
               (bytes per parameter / element-wise bandwidth + its calls * op_overhead_us). Under DeepSpeed, plus
               its own work (DEEPSPEED_STEP_WORK: bytes per parameter of the rank, calls per parameter tensor).
Two totals: no overlap (sum: what msmoe_dist does, its all-to-all is blocking and DeepSpeed's overlap_comm is
off by default) and full overlap (communication hidden behind compute: max), the best any overlap could do.
f is the imbalance: the slowest rank has f times the mean rows (dropless); capacity pads to E*C rows exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from msmoe_dist.plan.census import Census
from msmoe_dist.plan.cluster import Cluster
from msmoe_dist.plan.memory import Setting, weight_bytes

STEP_COLLECTIVES = 4  # train/loop.py's stop flag, ds_engine's SUMS and EXPERT_NORM, DeepSpeed's gradient norm
GROUPED_EXPERT_OPS = 40  # Experts._forward_grouped_mm: 13 calls forward, about twice that in backward
# DeepSpeed's own work in a step, by ZeRO stage: (bytes per parameter this rank holds, calls per parameter
# tensor). Gradients copied into its reduce bucket, averaged, the partition flattened, clipped, the fp32 master
# copied back into the weights, its hooks: what a step costs beyond forward + backward and an Adam over the
# partition. Counted by bench/deepspeed_work.py (census._OpCounter) on DeepSpeed 0.19, fp32, at 2 ranks (EP 2) on
# the quickstart, WikiText-103 small and a 2-block d-64 model (tests/distributed/test_deepspeed_step_work.py):
#   ZeRO 0: 19.6-20.1 bytes, 15.6-16.2 calls; ZeRO 1: 65.0-72.5, 18.9-22.6; ZeRO 2: 69.1-77.8, 20.2-23.6.
# Used as counted for bf16/fp16 too (their 2-byte gradient copies move fewer bytes: an upper bound there).
DEEPSPEED_STEP_WORK = {0: (20, 16), 1: (70, 20), 2: (75, 21)}


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimiser step, by part (one rank; every rank runs the same in a balanced run)."""

    compute: float
    memory_ops: float  # element-wise work, plus the eager per-operator overhead not hidden behind the math
    all_to_all: float
    grad_reduce: float
    optimizer: float
    micro_batches: int
    flops_per_step: float  # counted model FLOPs of this rank's step (no recompute, balanced)

    @property
    def serial(self) -> float:
        return self.compute + self.memory_ops + self.all_to_all + self.grad_reduce + self.optimizer

    @property
    def overlapped(self) -> float:
        return max(self.compute + self.memory_ops, self.all_to_all + self.grad_reduce) + self.optimizer

    def as_dict(self) -> dict:
        return {**asdict(self), "serial": self.serial, "overlapped": self.overlapped}


def ranks_on_node(group_size: int, stride: int, gpus_per_node: int) -> int:
    """How many of a group's ranks share a node with any one of them (ranks r, r+stride, ...; nodes of
    gpus_per_node consecutive ranks; groups of consecutive ranks have stride 1)."""
    if stride >= gpus_per_node:
        return 1
    return min(group_size, gpus_per_node // stride)


def _group_rate(cluster: Cluster, size: int, stride: int) -> float:
    """Bus bandwidth (bytes/s) of a ring collective over the group: NVLink if it fits in one node."""
    inside = ranks_on_node(size, stride, cluster.gpus_per_node) >= size
    return 1e9 * (cluster.nvlink_allreduce_gbps if inside else cluster.net_allreduce_gbps)


def a2a_seconds(nbytes: float, ep_size: int, cluster: Cluster) -> float:
    """One all-to-all in which each rank sends nbytes spread evenly over its EP group."""
    if ep_size == 1 or nbytes == 0:
        return 0.0
    g = ranks_on_node(ep_size, 1, cluster.gpus_per_node)
    off_node = (ep_size - g) / ep_size
    t_nvlink = nbytes * (1 - off_node) / (1e9 * cluster.nvlink_a2a_gbps)
    t_net = nbytes * off_node / (1e9 * cluster.net_a2a_gbps)
    return max(t_nvlink, t_net) + 1e-6 * cluster.collective_latency_us


def gemm_seconds(work: dict[str, int], cluster: Cluster, f: float) -> tuple[float, float]:
    """(seconds, FLOPs) of the counted matmuls, each size class at its share of the sustained rate; experts' x f."""
    secs = flops = 0.0
    for key, n in work.items():
        part, _, kind = key.partition(".")
        if part != "optim" and kind.startswith("gemm"):
            scale = f if part == "expert" else 1.0
            rate = 1e12 * cluster.sustained_tflops * cluster.gemm_fraction(int(kind[4:]))
            secs += scale * n / rate
            flops += scale * n
    return secs, flops


def elementwise_seconds(work: dict[str, int], cluster: Cluster, f: float) -> float:
    """Seconds of the counted element-wise traffic and random numbers (experts' part x f)."""
    bw = 1e9 * (cluster.elementwise_gbps or cluster.mem_gbps)
    secs = 0.0
    for key, n in work.items():
        part, _, kind = key.partition(".")
        scale = f if part == "expert" else 1.0
        if part == "optim":
            continue
        if kind == "bytes":
            secs += scale * n / bw
        elif kind == "rng":
            secs += scale * (n / (1e9 * cluster.rng_gelems) if cluster.rng_gelems else 4 * n / bw)
    return secs


def optimizer_seconds(work: dict[str, int], held: float, cluster: Cluster) -> float:
    """One optimiser step over the `held` parameters of this rank. On a GPU, a fused Adam: 28 bytes per parameter
    (read params, grads and two moments, write params and moments) at the memory bandwidth. On a CPU, the counted
    real step (census.optimizer_work: its bytes per parameter at the element-wise bandwidth, its calls at the
    per-call overhead), which runs tensor by tensor."""
    if cluster.device == "cuda" or not work.get("optim.params"):
        return 28 * held / (1e9 * cluster.mem_gbps)
    bw = 1e9 * (cluster.elementwise_gbps or cluster.mem_gbps)
    per_param = work["optim.bytes"] / work["optim.params"]
    return per_param * held / bw + work["optim.calls"] * 1e-6 * cluster.op_overhead_us


def deepspeed_seconds(c: Census, zero_stage: int, cluster: Cluster) -> float:
    """DeepSpeed's own per-step work (DEEPSPEED_STEP_WORK) on this rank: its bytes at the element-wise bandwidth
    (a GPU's memory bandwidth), its calls at the per-call overhead on a CPU (a GPU overlaps those launches)."""
    per_param, per_tensor = DEEPSPEED_STEP_WORK[zero_stage]
    gbps = (cluster.elementwise_gbps or cluster.mem_gbps) if cluster.device == "cpu" else cluster.mem_gbps
    bw = 1e9 * gbps
    seconds = per_param * (c.dense_params + c.expert_params_rank) / bw
    if cluster.device == "cpu":
        seconds += per_tensor * (c.dense_tensors + c.expert_tensors) * 1e-6 * cluster.op_overhead_us
    return seconds


def overhead_seconds(c: Census, s: Setting, cluster: Cluster, math_s: float) -> float:
    """The eager per-call cost not hidden behind the math (math_s: compute + element-wise seconds). On CUDA the
    experts run as one grouped GEMM per layer (~40 calls forward + backward) and launches are asynchronous, so
    only what exceeds the math counts; on a CPU every call adds to it."""
    ops = c.ops
    if cluster.device == "cuda":
        ops = c.ops - c.expert_ops + GROUPED_EXPERT_OPS * c.num_moe_layers
    overhead = ops * (1.5 if s.checkpointing != "none" else 1.0) * 1e-6 * cluster.op_overhead_us
    return overhead if cluster.device == "cpu" else max(0.0, overhead - math_s)


def plan_step(c: Census, s: Setting, cluster: Cluster, batch_size: int, grad_accum: int) -> StepTime:
    m = batch_size // s.micro_batch * grad_accum
    f = s.imbalance if c.capacity_rows is None else 1.0
    fl = c.flops
    block_flops = fl["expert"] + fl["attention"] + fl["router"] + fl["block_other"]
    recompute = 0.0
    if s.checkpointing == "block":
        recompute = block_flops / 3
    elif s.checkpointing == "selective":
        recompute = (fl["attention"] + fl["block_other"]) / 3
    flops = c.total_flops + fl["expert"] * (f - 1) + recompute
    gemm_s, gemm_flops = gemm_seconds(c.work, cluster, f)
    if gemm_flops:  # the recomputed forward at the step's average GEMM rate
        compute = gemm_s * (1 + recompute / gemm_flops)
    else:  # a census without per-call work (none in this package): every FLOP at the sustained rate
        compute = flops / (1e12 * cluster.sustained_tflops)
    memory_ops = elementwise_seconds(c.work, cluster, f) * (1 + recompute / max(c.total_flops, 1))
    memory_ops += overhead_seconds(c, s, cluster, compute + memory_ops)
    rows = c.capacity_rows if c.capacity_rows is not None else c.tokens * c.top_k * f
    calls = 4 + (2 if s.checkpointing == "block" else 0)
    if c.capacity_rows is None and s.ep_size > 1:  # dropless: the counts go first, once per forward
        calls += 2 if s.checkpointing == "block" else 1
    a2a = c.num_moe_layers * calls * a2a_seconds(rows * c.d_model * c.act_bytes, s.ep_size, cluster)
    w = weight_bytes(s)
    grad = 0.0
    for params, size, stride in ((c.dense_params, s.dp, 1), (c.expert_params_rank, s.edp, s.ep_size)):
        if size > 1 and params:
            grad += 2 * (size - 1) / size * params * w / _group_rate(cluster, size, stride)
            grad += 2e-6 * cluster.collective_latency_us
    if s.world > 1:  # the step's small all-reduces (stop flag, loss sums, expert and DeepSpeed gradient norms)
        grad += STEP_COLLECTIVES * 1e-6 * cluster.collective_latency_us
    held = c.dense_params / (s.dp if s.zero_stage else 1) + c.expert_params_rank / (s.edp if s.zero_stage else 1)
    optimizer = optimizer_seconds(c.work, held, cluster)
    if s.engine == "deepspeed":
        optimizer += deepspeed_seconds(c, s.zero_stage, cluster)
    return StepTime(
        compute=m * compute,
        memory_ops=m * memory_ops,
        all_to_all=m * a2a,
        grad_reduce=grad,
        optimizer=optimizer,
        micro_batches=m,
        flops_per_step=m * c.total_flops,
    )
