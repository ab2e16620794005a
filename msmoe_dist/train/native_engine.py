"""The native engine: one process, plain PyTorch optimiser, optional bf16 autocast."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from msmoe_dist.config.schema import Config
from msmoe_dist.eval import autocast_ctx, evaluate_lm
from msmoe_dist.train.checkpoint import CheckpointError, torch_load
from msmoe_dist.train.engine_base import NonFiniteLoss, StepResult, rng_state, set_rng_state
from msmoe_dist.train.optim import build_optimizer, build_scheduler


class NativeEngine:
    name = "native"
    rank, world_size, is_main = 0, 1, True

    def __init__(self, model: torch.nn.Module, cfg: Config, device: torch.device):
        self.model, self.cfg, self.device = model.to(device), cfg, device
        self.opt = build_optimizer(model, cfg.optim)
        self.sched = build_scheduler(self.opt, cfg.optim, cfg.train.max_steps)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")

    def barrier(self) -> None:
        pass

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def train_step(self, micro_batches, collect_stats: bool) -> StepResult:
        n = len(micro_batches)
        ce = aux = 0.0
        stats = None
        self.opt.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(micro_batches):
            x, y = x.to(self.device), y.to(self.device)
            with autocast_ctx(self.device, self.cfg.train.dtype):
                out = self.model(x, y, collect_stats=collect_stats and i == n - 1)
            loss = out.loss + out.aux_loss
            if not torch.isfinite(loss):  # checked before backward: the weights stay good
                raise NonFiniteLoss(f"loss became {float(loss)}")
            (loss / n).backward()
            ce, aux = ce + float(out.loss.detach()) / n, aux + float(out.aux_loss.detach()) / n
            stats = out.stats or stats
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip))
        self.opt.step()
        self.sched.step()
        return StepResult(ce, aux, gnorm, stats)

    def evaluate(self, stream, batch_size: int, seq_len: int, max_batches: int) -> dict:
        return evaluate_lm(self.model, stream, batch_size, seq_len, max_batches, self.device, self.cfg.train.dtype)

    @contextlib.contextmanager
    def evaluating(self):
        """The model in eval mode (restored afterwards), for eval_forward calls."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def eval_forward(self, x, y=None, **kwargs):
        with autocast_ctx(self.device, self.cfg.train.dtype):
            return self.model(x.to(self.device), None if y is None else y.to(self.device), **kwargs)

    def all_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def seal(self) -> dict:
        return {"engine": self.name, "world_size": 1, "ep_size": 1, "zero_stage": None,
                "dtype": self.cfg.train.dtype}

    def write_rank_files(self, out_dir: Path, step: int) -> None:
        torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(), "rng": rng_state(), "step": step}, out_dir / "state.pt")

    def load(self, step_dir: Path, seal: dict) -> int:
        if seal.get("engine") != self.name:
            raise CheckpointError(
                f"cannot resume {step_dir.name}: saved by the {seal.get('engine')} engine; a resume needs the same "
                "engine (set parallel.engine to match, or start a new run with checkpoint.init_from=<checkpoint>)"
            )
        state = torch_load(step_dir / "state.pt")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return state["step"]
