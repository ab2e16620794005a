"""The DeepSpeed engine with our own expert parallelism.

DeepSpeed does ZeRO 0/1/2, bf16/fp16 (loss scaling), gradient accumulation, clipping, the LR
schedule and the dense part of checkpoints. Our MoE layers are not deepspeed.moe.layer.MoE, so
we give DeepSpeed exactly what its MoE support keys on (DeepSpeed 0.19):
  * every expert tensor is tagged `allreduce=False`, `group_name="ep_size_<P>"`, and our own EP
    and expert-data-parallel (EDP) groups are registered under that name in
    `deepspeed.utils.groups`, so expert gradients are summed over EDP only and divided by the
    world size (the global-batch mean), never averaged across different experts;
  * the optimiser's expert parameter groups carry `moe=True` and that name, so ZeRO partitions
    them over EDP;
  * a parameter-free `MoE` subclass marks the model, which switches on DeepSpeed's MoE paths
    (expert-aware gradient norm in ZeRO, per-EP-rank optimiser files at stage 0, no broadcast of
    rank 0's experts over the whole world at start-up).
DeepSpeed's own expert checkpoint files assume its MoE parameter names, so each EP rank writes
its experts itself (experts_epNNN.pt); DeepSpeed's model file holds only rank 0's copy.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from msmoe_dist.config.schema import Config
from msmoe_dist.data import eval_batches
from msmoe_dist.moe import LocalDispatcher
from msmoe_dist.parallel import AllToAllDispatcher, ProcessGroups, is_expert_key, shard_expert_state
from msmoe_dist.parallel.collectives import named_collective
from msmoe_dist.train.checkpoint import CheckpointError, torch_load
from msmoe_dist.train.ds_config import build_ds_config
from msmoe_dist.train.engine_base import NonFiniteLoss, StepResult, rng_state, set_rng_state
from msmoe_dist.train.optim import build_scheduler, param_groups


def _marker_class():
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEMarker(MoE):
        """Holds no parameters; its presence makes DeepSpeed treat the model as an MoE model."""

        def __init__(self, num_experts: int, ep_size: int, group_name: str):
            nn.Module.__init__(self)  # deliberately not MoE.__init__: it would build its own experts
            self.num_experts, self.ep_size, self.expert_group_name = num_experts, ep_size, group_name
            self.num_local_experts = 0  # our experts are checkpointed by us, not by DeepSpeed

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # groups are registered by register_groups()

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedMoEMarker is a marker, not a layer")

    return DeepSpeedMoEMarker


def register_groups(pg: ProcessGroups, name: str) -> None:
    """Hands our EP/EDP groups to DeepSpeed under `name` (instead of letting it build its own)."""
    from deepspeed.utils import groups as ds_groups

    ds_groups._EXPERT_PARALLEL_GROUP[name] = pg.ep
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = pg.layout.ep_group_of(pg.rank)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = pg.edp
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = pg.layout.edp_group_of(pg.rank)


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, cfg: Config, build_model, vocab_size: int, pg: ProcessGroups, init_weights: dict | None):
        import deepspeed

        self.cfg, self.pg = cfg, pg
        self.rank, self.world_size = pg.rank, pg.layout.world_size
        self.is_main = self.rank == 0
        ep, E = pg.layout.ep_size, cfg.moe.num_experts
        self.group_name = f"ep_size_{ep}"
        register_groups(pg, self.group_name)
        # Build the full model from the seed on every rank, then keep this rank's experts: the
        # initial weights are exactly those of a single-process run (memory: one full copy, once).
        torch.manual_seed(cfg.train.seed)
        full = build_model(cfg, vocab_size, None)
        if init_weights is not None:
            full.load_state_dict(init_weights)
        dispatcher = AllToAllDispatcher(E, pg.ep, ep, pg.ep_rank) if ep > 1 else LocalDispatcher(E)
        model = build_model(cfg, vocab_size, dispatcher)
        model.load_state_dict(shard_expert_state(full.state_dict(), pg.ep_rank, ep))
        del full
        for n, p in model.named_parameters():
            if is_expert_key(n):
                p.allreduce, p.group_name = False, self.group_name
        model.add_module("deepspeed_moe_marker", _marker_class()(E, ep, self.group_name))
        groups = param_groups(model, cfg.optim.weight_decay)
        for g in groups:
            if g["moe"]:
                g["name"] = self.group_name
        o = cfg.optim
        if o.name == "sgd":
            opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.beta1)
        else:
            cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
            opt = cls(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        sched = build_scheduler(opt, o, cfg.train.max_steps)
        self.ds_config = build_ds_config(cfg)
        self.engine, self.opt, _, self.sched = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=self.ds_config, dist_init_required=False
        )
        self.model = self.engine.module
        self.device = self.engine.device
        self.stage = self.ds_config["zero_optimization"]["stage"]
        self.clip = cfg.optim.grad_clip
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.dtype, torch.float32)

    # ---- collectives --------------------------------------------------------------------------
    def barrier(self) -> None:
        with named_collective("barrier"):
            dist.barrier()

    def _all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        with named_collective("all_reduce (loss / evaluation sums)"):
            dist.all_reduce(t)
        return t.tolist()

    def _stage0_norm_and_clip(self) -> float:
        """Global grad norm as one process would compute it: dense grads are already averaged and
        identical on every rank; each expert lives once per EP group, so summing the experts'
        squares over the EP group counts every expert exactly once."""
        dense = expert = 0.0
        for n, p in self.model.named_parameters():
            if p.grad is None:
                continue
            sq = float(p.grad.detach().float().pow(2).sum())
            if is_expert_key(n):
                expert += sq
            else:
                dense += sq
        t = torch.tensor([expert], dtype=torch.float64)
        dist.all_reduce(t, group=self.pg.ep)
        norm = math.sqrt(dense + float(t[0]))
        if self.clip > 0 and norm > self.clip:
            scale = self.clip / (norm + 1e-6)
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        return norm

    # ---- the engine interface ----------------------------------------------------------------
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def train_step(self, micro_batches, collect_stats: bool) -> StepResult:
        n = len(micro_batches)
        ce = aux = 0.0
        stats, norm = None, None
        for i, (x, y) in enumerate(micro_batches):
            out = self.engine(self._input(x), y.to(self.device), collect_stats=collect_stats and i == n - 1)
            loss = out.loss + out.aux_loss
            # One all-reduce per micro-batch: the global mean for logging, and a NaN anywhere
            # stops every rank at the same step, before any weight changes.
            bad = 0.0 if torch.isfinite(loss.detach()) else 1.0
            s_ce, s_aux, s_bad = self._all_sum([float(out.loss.detach()), float(out.aux_loss.detach()), bad])
            if s_bad > 0:
                raise NonFiniteLoss(f"loss became non-finite on {int(s_bad)} rank(s)")
            ce, aux = ce + s_ce / (n * self.world_size), aux + s_aux / (n * self.world_size)
            stats = out.stats or stats
            self.engine.backward(loss)
            if i == n - 1 and self.stage == 0:
                norm = self._stage0_norm_and_clip()
            self.engine.step()
        if norm is None:
            g = self.engine.get_global_grad_norm()
            norm = float(g) if g is not None else float("nan")
        return StepResult(ce, aux, norm, stats)

    @torch.no_grad()
    def evaluate(self, stream, batch_size: int, seq_len: int, max_batches: int) -> dict:
        """Batches are dealt round-robin to ranks; a rank without a batch still runs a forward on
        a dummy one (uncounted), because every rank of an EP group must join every all-to-all."""
        batches = list(eval_batches(stream, batch_size, seq_len, max_batches))
        mine = batches[self.rank::self.world_size]
        rounds = math.ceil(len(batches) / self.world_size)
        self.engine.eval()
        nll = count = 0.0
        try:
            for i in range(rounds):
                x, y = mine[i] if i < len(mine) else batches[0]
                out = self.engine(x.to(self.device), y.to(self.device), reduction="sum")
                if i < len(mine):
                    nll, count = nll + float(out.loss), count + y.numel()
        finally:
            self.engine.train()
        nll, count = self._all_sum([nll, count])
        loss = nll / max(count, 1.0)
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(count)}

    @contextlib.contextmanager
    def evaluating(self):
        """The model in eval mode (restored afterwards), for eval_forward calls."""
        self.engine.eval()
        try:
            yield
        finally:
            self.engine.train()

    @torch.no_grad()
    def eval_forward(self, x, y=None, **kwargs):
        return self.engine(self._input(x), None if y is None else y.to(self.device), **kwargs)

    def _input(self, x):
        """Token ids go as they are; images take the engine's weight dtype (bf16/fp16 modes keep the
        module's weights in that dtype, and a conv does not mix dtypes)."""
        x = x.to(self.device)
        return x.to(self.input_dtype) if x.is_floating_point() else x

    def all_sum(self, values: list[float]) -> list[float]:
        return self._all_sum(values)

    def seal(self) -> dict:
        return {"engine": self.name, "world_size": self.world_size, "ep_size": self.pg.layout.ep_size,
                "zero_stage": self.stage, "dtype": self.cfg.train.dtype}

    def write_rank_files(self, out_dir: Path, step: int) -> None:
        self.engine.save_checkpoint(str(out_dir.parent), tag=out_dir.name, client_state={"step": step},
                                    save_latest=False)
        if self.pg.edp_rank == 0:  # one writer per set of experts
            experts = {n: p.detach().cpu() for n, p in self.model.named_parameters() if is_expert_key(n)}
            torch.save({"ep_rank": self.pg.ep_rank, "ep_size": self.pg.layout.ep_size,
                        "num_experts": self.cfg.moe.num_experts, "experts": experts},
                       out_dir / f"experts_ep{self.pg.ep_rank:03d}.pt")
        torch.save({"rng": rng_state(), "step": step}, out_dir / f"rank{self.rank:05d}.pt")

    def load(self, step_dir: Path, seal: dict) -> int:
        mine = self.seal()
        diff = [k for k in ("engine", "world_size", "ep_size", "zero_stage", "dtype") if seal.get(k) != mine[k]]
        if diff:
            got = ", ".join(f"{k}={seal.get(k)} (now {mine[k]})" for k in diff)
            raise CheckpointError(
                f"cannot resume {step_dir.name}: saved with {got}; a resume needs the same layout. To continue "
                "at another EP degree or world size, start a new run with checkpoint.init_from=<checkpoint> "
                "(weights only: optimiser state and step restart)"
            )
        path, client = self.engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name,
                                                   load_module_strict=True, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {step_dir}")
        shard = torch_load(step_dir / f"experts_ep{self.pg.ep_rank:03d}.pt")
        params = dict(self.model.named_parameters())
        with torch.no_grad():  # DeepSpeed's model file holds rank 0's experts: put ours back
            for n, t in shard["experts"].items():
                params[n].copy_(t)
        set_rng_state(torch_load(step_dir / f"rank{self.rank:05d}.pt")["rng"])
        return int(seal["step"])
