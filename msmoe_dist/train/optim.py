"""Optimiser with parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from msmoe_dist.config.schema import OptimConfig
from msmoe_dist.moe import is_expert_param


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Four groups: {dense, expert} x {decay, no decay}.

    No decay for biases, norms, embeddings (ViT: position table, class token), the experts' stacked
    [E, F] biases and the momentum coefficients: decaying mu/gamma towards 0 would silently turn
    MomentumSMoE back into SMoE.
    """
    groups: dict[tuple[bool, bool], list] = {}  # (expert, no decay) -> parameters
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear twice
            continue
        seen.add(id(p))
        expert = is_expert_param(p)  # a tag set where experts are built
        no_decay = (
            p.ndim < 2
            or "emb" in name
            or "norm" in name
            or "momentum_" in name
            or "cls_token" in name
            or (expert and name.endswith((".b1", ".b2")))
        )
        groups.setdefault((expert, no_decay), []).append(p)
    out = []
    for (expert, no_decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "name": f"{'expert' if expert else 'dense'}_{'no_decay' if no_decay else 'decay'}",
                "moe": expert,
            }
        )
    return out


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser over ``param_groups(...)`` (an engine may rename groups first, as DeepSpeed needs)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.beta1)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the peak lr at optimiser step `step` (0-based): linear warm-up, then the schedule."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - lo) * frac
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * frac))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, max_steps))


def restore_schedule(sched, state: dict) -> None:
    """Loads a LambdaLR state saved under another engine/layout and sets every group's lr from it (a
    same-layout resume restores the groups' lr with the optimiser state; here the optimiser is rebuilt)."""
    sched.load_state_dict(state)
    for group, lr, base in zip(sched.optimizer.param_groups, sched.get_last_lr(), sched.base_lrs, strict=True):
        group["lr"], group["initial_lr"] = lr, base
