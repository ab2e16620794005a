"""The native engine: one process, plain PyTorch optimiser, optional bf16 autocast."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from msmoe_dist.checkpoint import CheckpointMeta, torch_load
from msmoe_dist.checkpoint.full_state import optimizer_param_names
from msmoe_dist.checkpoint.layout import NATIVE_STATE
from msmoe_dist.config.schema import OptimConfig, TrainConfig
from msmoe_dist.eval.evaluator import LocalEvaluator, autocast_ctx
from msmoe_dist.models.base import MoEModel
from msmoe_dist.moe.bias_balance import update_expert_biases
from msmoe_dist.train.engine import (
    NonFiniteLoss,
    StepResult,
    check_finite_params,
    objective,
    rng_state,
    set_rng_state,
)
from msmoe_dist.train.optim import build_optimizer, build_scheduler, param_groups, restore_schedule


class NativeEngine(LocalEvaluator):
    name = "native"
    is_main = True

    def __init__(self, model: MoEModel, optim: OptimConfig, train: TrainConfig, device: torch.device):
        super().__init__(model.to(device), device, train.dtype)
        self.model: MoEModel = model
        groups = param_groups(model, optim.weight_decay)
        self.param_names = optimizer_param_names(model, groups)  # optimiser index -> name, saved with the state
        self.opt = build_optimizer(groups, optim)
        self.sched = build_scheduler(self.opt, optim, train.max_steps)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip = optim.grad_clip if optim.grad_clip > 0 else float("inf")

    def barrier(self) -> None:
        pass

    def set_step(self, step: int) -> None:
        self.model.set_step(step)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def train_step(self, micro_batches, collect_stats: bool) -> StepResult:
        n = len(micro_batches)
        # On the device, read once per step: [ce, aux] as float64 means (the former host loop's arithmetic,
        # so the logged numbers are unchanged) and the first non-finite loss, if any (0 while all are finite).
        acc = torch.zeros(2, dtype=torch.float64, device=self.device)
        first_bad = torch.zeros((), device=self.device)
        stats = None
        self.opt.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(micro_batches):
            x, y = x.to(self.device), y.to(self.device)
            with autocast_ctx(self.device, self.dtype):
                out = self.model(x, y, collect_stats=collect_stats and i == n - 1)
            loss = objective(out)
            ok = torch.isfinite(first_bad)
            first_bad = torch.where(ok & ~torch.isfinite(loss.detach()), loss.detach().float(), first_bad)
            (loss / n).backward()
            acc = acc + torch.stack([out.loss.detach().double(), out.aux_loss.detach().double()]) / n
            stats = out.stats or stats
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)  # on the device: no sync
        # The step's one device-to-host sync, before the weights change: the NaN check and the numbers.
        ce, aux, bad, norm = torch.cat([acc, first_bad.double().reshape(1), gnorm.double().reshape(1)]).tolist()
        if not math.isfinite(bad):
            raise NonFiniteLoss(f"loss became {bad}")
        if not math.isfinite(norm):  # the loss can still be finite: stop before the weights change
            raise NonFiniteLoss(f"gradient norm became {norm} (loss {ce + aux:.4g} still finite)")
        self.opt.step()
        self.sched.step()
        update_expert_biases(self.model)  # moe.balance=bias: this step's loads (one process: the global batch)
        return StepResult(ce, aux, norm, stats)

    def layout_meta(self) -> dict:
        return {"engine": self.name, "world_size": 1, "ep_size": 1, "zero_stage": None, "dtype": self.dtype}

    def save_files(self, step_dir: Path) -> None:
        check_finite_params(self.params)  # never seal a checkpoint of non-finite weights
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "rng": rng_state(),
                "param_names": self.param_names,
            },
            step_dir / NATIVE_STATE,
        )

    def load_files(self, step_dir: Path, meta: CheckpointMeta) -> None:
        state = torch_load(step_dir / NATIVE_STATE)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])

    def load_full_state(self, full: dict) -> None:
        """A checkpoint of another layout (checkpoint.full_state): every weight and buffer, the optimiser
        state by name, the schedule; the RNG of its rank 0 (the one stream this process has)."""
        self.model.load_state_dict(full["model"])
        sd = self.opt.state_dict()
        index = {n: i for i, n in enumerate(self.param_names)}
        sd["state"] = {index[n]: dict(st) for n, st in full["optimizer"].items()}
        self.opt.load_state_dict(sd)  # casts the moments to each parameter's dtype and device
        restore_schedule(self.sched, full["scheduler"])
        if 0 in full["rng"]:
            set_rng_state(full["rng"][0])
