"""Which (ep_size, zero_stage, micro-batch, activation checkpointing) fit on the cluster, and which run fastest.

The census of the model is taken once per micro-batch size and expert-parallel degree that changes it
(with a capacity the padded rows depend on ep_size; dropless they do not, and the expert parameters of a
rank are the census's total * local / E, from ``ParallelLayout.local_experts`` of rank 0). Each micro-batch
size is counted, not extrapolated: FLOPs, parameters and saved bytes are linear in it, but the speed of a
matmul depends on its smallest side, which the micro-batch changes (the experts' rows per expert).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from msmoe_dist.config.schema import Config
from msmoe_dist.errors import UserError
from msmoe_dist.parallel.layout import ParallelLayout
from msmoe_dist.plan.census import Census, take_census
from msmoe_dist.plan.cluster import Cluster
from msmoe_dist.plan.memory import MODES, Memory, Setting, plan_memory
from msmoe_dist.plan.step_time import StepTime, plan_step

WIKITEXT103_VOCAB = 267_735  # the word vocabulary of WikiText-103's training split (msmoe-prepare; Merity et al.)
GIB = 2**30


class PlanError(UserError):
    """A plan that cannot be made: bad degrees, or nothing fits (one line)."""


@dataclass(frozen=True)
class Candidate:
    setting: Setting
    memory: Memory
    time: StepTime
    fits: bool
    tokens_per_s: float
    mfu: float


def resolve_vocab(cfg: Config, vocab: int | None) -> int:
    """--vocab, else model.vocab_size, else the prepared data's header, else WikiText-103's word vocabulary
    for prepared word-level data; anything else must be given."""
    if vocab:
        return vocab
    if cfg.model.kind == "vit":  # the classifier's outputs play the vocabulary's part
        return cfg.vision.num_classes
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    meta = Path(cfg.data.path) / "meta.json"
    if cfg.data.kind == "prepared" and meta.is_file():
        return int(json.loads(meta.read_text())["vocab_size"])
    if cfg.data.kind == "prepared" and cfg.data.tokenizer == "word" and "wikitext-103" in cfg.data.path:
        return WIKITEXT103_VOCAB
    raise PlanError(
        f"cannot tell the vocabulary size of data.kind={cfg.data.kind} at {cfg.data.path}: "
        "pass --vocab N (or model.vocab_size=N)"
    )


class CensusCache:
    """Censuses by (micro-batch, ep_size), built lazily (module docstring)."""

    def __init__(self, cfg: Config, vocab: int, flash_attention: bool):
        self.cfg, self.vocab, self.flash = cfg, vocab, flash_attention
        self._c: dict[tuple[int, int], Census] = {}

    def _take(self, mb: int, ep: int) -> Census:
        key = (mb, ep)
        if key not in self._c:
            self._c[key] = take_census(self.cfg, self.vocab, ParallelLayout(ep, ep), mb, self.flash)
        return self._c[key]

    def get(self, mb: int, ep: int) -> Census:
        E = self.cfg.moe.num_experts
        ParallelLayout(ep, ep).check_experts(E)  # LayoutError when ep_size does not divide the experts
        if self.cfg.moe.capacity_factor > 0:
            return self._take(mb, ep)
        c = self._take(mb, 1)
        local = E // ep
        # The CPU experts loop over the local experts: their calls shrink with them.
        ops = c.ops - c.expert_ops + c.expert_ops * local // E
        return replace(
            c,
            local_experts=local,
            expert_params_rank=c.expert_params_total * local // E,
            # each stacked expert tensor keeps its local experts' rows
            param_groups=tuple((moe, tuple(n * local // E for n in ns) if moe else ns) for moe, ns in c.param_groups),
            ops=ops,
            expert_ops=c.expert_ops * local // E,
        )


def engine_of(cfg: Config, world: int) -> str:
    """The engine msmoe-train would pick: parallel.engine, or auto = native for one process."""
    if cfg.parallel.engine != "auto":
        return cfg.parallel.engine
    return "native" if world == 1 else "deepspeed"


def evaluate(cache: CensusCache, cfg: Config, cluster: Cluster, setting: Setting) -> Candidate:
    c = cache.get(setting.micro_batch, setting.ep_size)
    mem = plan_memory(c, setting, cfg.model.output_layer, cfg.model.output_chunk_tokens, cluster.device)
    t = plan_step(c, setting, cluster, cfg.data.batch_size, cfg.train.grad_accum_steps)
    budget = cluster.gpu_memory_gib * cluster.usable_memory_fraction * GIB
    tokens = setting.world * cfg.data.batch_size * c.seq_len * cfg.train.grad_accum_steps  # ViT: patch tokens
    tps = tokens / t.serial
    mfu = t.flops_per_step / t.serial / (1e12 * cluster.peak_tflops)
    return Candidate(setting, mem, t, mem.peak <= budget, tps, mfu)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_settings(cfg: Config, world: int, imbalance: float, modes: tuple[str, ...] = MODES) -> list[Setting]:
    """Every ep_size dividing both the world and the experts, ZeRO 0-2 (fp16 needs >= 1; one process runs
    the native engine: no ZeRO), every micro-batch dividing data.batch_size, every checkpointing mode."""
    engine = engine_of(cfg, world)
    eps = [e for e in divisors(world) if cfg.moe.num_experts % e == 0]
    zeros = [0] if engine == "native" else [z for z in (0, 1, 2) if not (cfg.train.dtype == "fp16" and z == 0)]
    mbs = divisors(cfg.data.batch_size)
    opt = cfg.optim.name
    return [
        Setting(world, ep, z, mb, mode, cfg.train.dtype, engine, opt, imbalance)
        for ep in eps
        for z in zeros
        for mb in mbs
        for mode in modes
    ]


def check_degrees(world: int, gpus_per_node: int, ep_size: int | None, num_experts: int) -> None:
    if world < 1:
        raise PlanError(f"--gpus must be >= 1, got {world}")
    if gpus_per_node < 1:
        raise PlanError(f"--gpus-per-node must be >= 1, got {gpus_per_node}")
    if world > gpus_per_node and world % gpus_per_node:
        raise PlanError(f"--gpus {world} is not divisible by --gpus-per-node {gpus_per_node} (whole nodes only)")
    if ep_size is not None:
        if world % ep_size:
            raise PlanError(
                f"--gpus {world} is not divisible by parallel.ep_size={ep_size} "
                f"(expected one of {', '.join(map(str, divisors(world)))})"
            )
        if num_experts % ep_size:
            raise PlanError(f"parallel.ep_size={ep_size} does not divide moe.num_experts={num_experts}")


def search(
    cache: CensusCache,
    cfg: Config,
    cluster: Cluster,
    world: int,
    imbalance: float,
    ep_size: int | None = None,
    modes: tuple[str, ...] = MODES,
) -> list[Candidate]:
    """Every candidate, fastest fitting first; the caller refuses when none fits (see no_fit_message)."""
    settings = candidate_settings(cfg, world, imbalance, modes)
    if ep_size is not None:
        settings = [s for s in settings if s.ep_size == ep_size]
    out = [evaluate(cache, cfg, cluster, s) for s in settings]
    return sorted(out, key=lambda c: (not c.fits, c.time.serial if c.fits else c.memory.peak))


def no_fit_message(cands: list[Candidate], cluster: Cluster, world: int) -> str:
    budget = cluster.gpu_memory_gib * cluster.usable_memory_fraction
    best = min(cands, key=lambda c: c.memory.peak)
    s = best.setting
    need = best.memory.peak / GIB
    # What would fit: more ranks for the state that ZeRO splits, or a larger device.
    return (
        f"no configuration fits on {world} x {cluster.name} ({budget:.1f} GiB usable per device): the smallest, "
        f"ep_size={s.ep_size} zero_stage={s.zero_stage} micro_batch={s.micro_batch} checkpointing={s.checkpointing}, "
        f"needs {need:.1f} GiB per rank ({need - budget:.1f} GiB over; model state {best.memory.model_state / GIB:.1f}"
        f" GiB, activations {best.memory.activations / GIB:.1f} GiB); it would fit on a device with "
        f"{need / cluster.usable_memory_fraction:.0f} GiB, or with fewer parameters or a shorter sequence per rank"
    )
