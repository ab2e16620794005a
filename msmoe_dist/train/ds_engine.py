"""The DeepSpeed engine over a model that is already expert-parallel.

DeepSpeed does ZeRO 0/1/2, bf16/fp16 (loss scaling), gradient accumulation, clipping, the LR
schedule and the dense part of checkpoints; `deepspeed_glue` tells it which parameters are
experts. DeepSpeed's own expert checkpoint files assume its MoE parameter names, so each EP rank
writes its experts itself (experts_epNNN.pt); DeepSpeed's model file holds only rank 0's copy.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from msmoe_dist.checkpoint import CheckpointError, CheckpointMeta, torch_load
from msmoe_dist.checkpoint.layout import experts_file, rank_file
from msmoe_dist.config.schema import OptimConfig, ParallelConfig, TrainConfig
from msmoe_dist.moe import is_expert_param
from msmoe_dist.moe.bias_balance import update_expert_biases
from msmoe_dist.parallel import ProcessGroups
from msmoe_dist.parallel import comm as collective
from msmoe_dist.train.deepspeed_glue import prepare_for_deepspeed
from msmoe_dist.train.ds_config import build_ds_config
from msmoe_dist.train.ds_portable import load_full_state, portable_parts, save_dense
from msmoe_dist.train.engine import (
    NonFiniteLoss,
    StepResult,
    nonfinite_params,
    objective,
    rng_state,
    set_rng_state,
)
from msmoe_dist.train.optim import build_optimizer, build_scheduler, param_groups

# The collectives' names, in error messages and statistics.
SUMS = "all_reduce (loss / evaluation sums)"
EXPERT_NORM = "all_reduce (expert gradient norm, EP group)"
PARAMS_FINITE = "all_reduce (are the weights finite? before a checkpoint)"
BIAS_LOADS = "all_reduce (expert loads of the step, moe.balance=bias)"


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(
        self,
        model: nn.Module,
        pg: ProcessGroups,
        num_experts: int,
        optim: OptimConfig,
        train: TrainConfig,
        parallel: ParallelConfig,
        micro_batch_size: int,
    ):
        import deepspeed

        self.pg, self.num_experts, self.dtype = pg, num_experts, train.dtype
        self.rank, self.world_size = pg.rank, pg.layout.world_size
        self.is_main = self.rank == 0
        name = prepare_for_deepspeed(model, pg, num_experts)
        groups = param_groups(model, optim.weight_decay)
        for g in groups:
            if g["moe"]:
                g["name"] = name  # DeepSpeed finds the expert groups by this name
        opt = build_optimizer(groups, optim)
        sched = build_scheduler(opt, optim, train.max_steps)
        self.ds_config = build_ds_config(parallel, optim, train, micro_batch_size)
        self.engine, self.opt, _, self.sched = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=self.ds_config, dist_init_required=False
        )
        self.model = self.engine.module
        self.device = self.engine.device
        self.stage = self.ds_config["zero_optimization"]["stage"]
        self.clip = optim.grad_clip
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.dtype, torch.float32)

    # ---- collectives --------------------------------------------------------------------------
    def barrier(self) -> None:
        collective.barrier(name="barrier")

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return collective.all_reduce(t, name=SUMS).tolist()  # device-to-host sync

    def _stage0_norm_and_clip(self) -> Tensor:
        """Global grad norm as one process would compute it, as a 0-d float64 tensor on the device (no
        sync: the caller reads it with the step's other numbers). Dense grads are already averaged and
        identical on every rank; each expert lives once per EP group, so summing the experts' squares
        over the EP group counts every expert exactly once. One fused norm per kind of parameter."""
        dense: list[Tensor] = []
        expert: list[Tensor] = []
        for p in self.model.parameters():
            if p.grad is not None:
                (expert if is_expert_param(p) else dense).append(p.grad.detach())
        dense_sq, expert_sq = (self._sq_norm(g) for g in (dense, expert))
        expert_sq = collective.all_reduce(expert_sq, group=self.pg.ep, name=EXPERT_NORM)
        norm = (dense_sq + expert_sq).sqrt()
        if self.clip > 0:  # scales by min(1, clip / (norm + 1e-6)) on the device: no sync to compare
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.clip, norm)
        return norm

    def _sq_norm(self, grads: list[Tensor]) -> Tensor:
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        return torch.nn.utils.get_total_norm(grads).double().square()

    # ---- the engine interface ----------------------------------------------------------------
    def set_step(self, step: int) -> None:
        self.model.set_step(step)

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def train_step(self, micro_batches, collect_stats: bool) -> StepResult:
        n, nw = len(micro_batches), len(micro_batches) * self.world_size
        # [ce, aux, ranks with a non-finite loss]: float64 on the device, read once per step.
        acc = torch.zeros(3, dtype=torch.float64, device=self.device)
        stats, norm = None, None
        for i, (x, y) in enumerate(micro_batches):
            out = self.engine(self._input(x), y.to(self.device), collect_stats=collect_stats and i == n - 1)
            loss = objective(out)
            # One all-reduce per micro-batch, no sync: the global means for logging, and a NaN anywhere
            # stops every rank at the same step. Same float64 arithmetic in the same order as the former
            # host loop (sum over ranks, / (n * world), accumulate), so the logged numbers are unchanged.
            mine = [out.loss.detach(), out.aux_loss.detach(), (~torch.isfinite(loss.detach())).float()]
            s = collective.all_reduce(torch.stack([v.double() for v in mine]), name=SUMS)
            acc = torch.cat([acc[:2] + s[:2] / nw, torch.maximum(acc[2:], s[2:])])
            stats = out.stats or stats
            self.engine.backward(loss)
            if i == n - 1:
                if self.stage == 0:
                    norm = self._stage0_norm_and_clip()
                    acc = torch.cat([acc, norm.reshape(1)])
                # The step's one device-to-host sync of our own, before the only step that changes the
                # weights (DeepSpeed steps at the accumulation boundary): the NaN check and the numbers.
                got = acc.tolist()
                if got[2] > 0:
                    raise NonFiniteLoss(f"loss became non-finite on {int(got[2])} rank(s)")
                # The norm is global (the same on every rank): all stop together. fp16 is exempt: an
                # overflow there is DeepSpeed's loss scaler's to handle (it skips the step).
                if norm is not None and self.dtype != "fp16" and not math.isfinite(got[3]):
                    raise NonFiniteLoss(f"gradient norm became {got[3]} (loss {got[0] + got[1]:.4g} still finite)")
            self.engine.step()
        # moe.balance=bias: every rank's counts of every micro-batch of this step, summed over the whole world
        # (one all-reduce for all layers, only when the model has balancers); every rank moves its biases alike.
        update_expert_biases(self.model, lambda loads: collective.all_reduce(loads, name=BIAS_LOADS))
        if norm is None:
            g = self.engine.get_global_grad_norm()  # DeepSpeed's (ZeRO 1/2): already computed on its step
            grad_norm = float(g) if g is not None else float("nan")
            # ZeRO 1/2: DeepSpeed computes the norm inside its step, so this comes after the weights
            # changed; the finite check in save_files keeps them out of any checkpoint.
            if g is not None and self.dtype != "fp16" and not math.isfinite(grad_norm):
                raise NonFiniteLoss(f"gradient norm became {grad_norm} (loss {got[0] + got[1]:.4g} still finite)")
        else:
            grad_norm = got[3]
        return StepResult(got[0], got[1], grad_norm, stats)

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

    # ---- checkpoint files --------------------------------------------------------------------
    def layout_meta(self) -> dict:
        return {
            "engine": self.name,
            "world_size": self.world_size,
            "ep_size": self.pg.layout.ep_size,
            "zero_stage": self.stage,
            "dtype": self.dtype,
        }

    def save_files(self, step_dir: Path) -> None:
        # Every rank calls save_files, so every rank joins this one all-reduce (max) and all of them
        # refuse together; nothing is written, and the Checkpointer never seals the directory.
        bad = nonfinite_params(list(self.model.parameters())).to(self.device)
        if collective.all_reduce(bad, op="max", name=PARAMS_FINITE).item() > 0:
            raise NonFiniteLoss(
                "the weights became non-finite (or overflow float32 when squared) on some rank; "
                "not writing this checkpoint; try a lower optim.lr"
            )
        self.engine.save_checkpoint(str(step_dir.parent), tag=step_dir.name, save_latest=False)
        # The same state by parameter name (ds_portable): what a resume at another layout reads.
        dense, mine = portable_parts(self)
        if dense is not None:
            save_dense(dense, step_dir)
        if self.pg.edp_rank == 0:  # one writer per set of experts
            experts = {n: p.detach().cpu() for n, p in self.model.named_parameters() if is_expert_param(p)}
            torch.save(
                {
                    "ep_rank": self.pg.ep_rank,
                    "ep_size": self.pg.layout.ep_size,
                    "num_experts": self.num_experts,
                    "experts": experts,
                    **(mine or {}),  # "master" (fp32) and "optimizer" (by name) of these experts
                },
                step_dir / experts_file(self.pg.ep_rank),
            )
        torch.save({"rng": rng_state()}, step_dir / rank_file(self.rank))

    def load_files(self, step_dir: Path, meta: CheckpointMeta) -> None:
        path, _ = self.engine.load_checkpoint(
            str(step_dir.parent),
            tag=step_dir.name,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {step_dir}")
        shard = torch_load(step_dir / experts_file(self.pg.ep_rank))
        params = dict(self.model.named_parameters())
        with torch.no_grad():  # DeepSpeed's model file holds rank 0's experts: put ours back
            for n, t in shard["experts"].items():
                params[n].copy_(t)
        set_rng_state(torch_load(step_dir / rank_file(self.rank))["rng"])

    def load_full_state(self, full: dict) -> None:
        """A checkpoint of another layout, assembled by name (checkpoint.full_state): see ds_portable."""
        load_full_state(self, full)
