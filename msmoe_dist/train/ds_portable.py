"""The DeepSpeed engine's state by parameter name: written beside DeepSpeed's files at every save, put back
when a checkpoint of another layout (world size, EP degree, ZeRO stage, engine) is resumed.

Why at save time: ZeRO 1/2 (and DeepSpeed's bf16 optimiser) keep the fp32 master weights and the
optimiser moments as flat partitions, one per data-parallel rank; only DeepSpeed's own mapping cuts them
back into parameters. DeepSpeed exposes that mapping at run time (``safe_get_full_fp32_param``,
``safe_get_full_optimizer_state``: one all-reduce per parameter over its data-parallel group, the other
ranks adding zeros, so the result is exact) and the inverse (``safe_set_full_*``: each rank writes its own
fragment, no communication). Its offline route (``ds_to_universal``) does not know our expert files and
EP groups. Saving the state by name costs a second copy of the optimiser state on disk and one gather per
checkpoint; in exchange any layout can read it with plain ``torch.load``.

Stage 0 in fp32 uses the plain torch optimiser (state keyed by the parameter itself: read and written
directly). fp16 at stage 0 (DeepSpeed's FP16_Optimizer, no mapping) writes no portable state: such a
checkpoint resumes at its own layout only (checkpoint.full_state says so).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch

from msmoe_dist.checkpoint.full_state import local_state, optimizer_step
from msmoe_dist.checkpoint.layout import PORTABLE_DENSE
from msmoe_dist.moe import is_expert_param
from msmoe_dist.parallel.sharding import is_expert_key
from msmoe_dist.train.engine import set_rng_state
from msmoe_dist.train.optim import restore_schedule

DeepSpeedEngine = Any  # train.ds_engine.DeepSpeedEngine (which imports this module)


def _mapped(ds: DeepSpeedEngine) -> bool:
    """True when DeepSpeed keeps fp32 master partitions behind the parameters (ZeRO 1/2, bf16 optimiser)."""
    return any(hasattr(p, "_hp_mapping") for p in ds.model.parameters())


def _base_optimizer(ds: DeepSpeedEngine) -> torch.optim.Optimizer | None:
    """The torch optimiser that holds the state: DeepSpeed's wrapper's inner one, or the optimiser itself."""
    if _mapped(ds):
        return ds.opt.optimizer
    return ds.opt if isinstance(ds.opt, torch.optim.Optimizer) else None  # FP16_Optimizer: None


def _link_optimizer_state(ds: DeepSpeedEngine) -> None:
    """(Re)links each parameter's fragments of the optimiser state. DeepSpeed 0.19 links them once, right
    after the first group's first step (ZeRO 1/2 step one group at a time), so the other groups' parameters
    would have none; linking again once every group has state is what its own universal checkpoint does
    implicitly. Idempotent (the fragments are views)."""
    ds.opt._hp_optimizer_states_linked = False
    ds.opt._lazy_init_hp_params_optimizer_state()


def _state_keys(base: torch.optim.Optimizer) -> list[str]:
    """The per-element state of this optimiser (Adam: exp_avg, exp_avg_sq; SGD: momentum_buffer)."""
    keys: set[str] = set()
    for st in base.state.values():
        keys.update(k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0)
    return sorted(keys)


def _step_count(base: torch.optim.Optimizer) -> torch.Tensor | None:
    steps = [st["step"] for st in base.state.values() if "step" in st]
    return torch.as_tensor(steps[0]).detach().cpu().clone() if steps else None


def portable_parts(ds: DeepSpeedEngine) -> tuple[dict | None, dict | None]:
    """(dense part, this EP rank's expert part), each None where this rank does not write it.

    Every rank must call it (the gathers are collectives over each parameter's data-parallel group, in
    named_parameters order, the same on every rank). Rank 0 writes the dense part, the first rank of
    each expert-data-parallel group its experts."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = _base_optimizer(ds)
    if base is None:
        return None, None
    mapped, keys, step = _mapped(ds), _state_keys(base), _step_count(base)
    if mapped and keys:
        _link_optimizer_state(ds)
    writes_dense, writes_experts = ds.rank == 0, ds.pg.edp_rank == 0
    parts: dict[bool, dict] = {False: {"master": {}, "optimizer": {}}, True: {"master": {}, "optimizer": {}}}
    for name, p in ds.model.named_parameters():
        expert = is_expert_param(p)
        if mapped:
            master = safe_get_full_fp32_param(p)
            moments = {k: safe_get_full_optimizer_state(p, k) for k in keys}
        else:
            st = base.state.get(p, {})
            master, moments = p.detach().float(), {k: st[k] for k in keys if k in st}
        if not (writes_experts if expert else writes_dense):
            continue
        parts[expert]["master"][name] = master.detach().float().cpu().clone()
        entry = {k: v.detach().float().cpu().clone() for k, v in moments.items()}
        if step is not None and entry:
            entry["step"] = step.clone()
        parts[expert]["optimizer"][name] = entry
    canonical = {id(p): n for n, p in ds.model.named_parameters()}
    for name, p in ds.model.named_parameters(remove_duplicate=False):  # tied weights: every state-dict key
        part = parts[is_expert_param(p)]["master"]
        if name not in part and canonical[id(p)] in part:
            part[name] = part[canonical[id(p)]]
    for name, buf in ds.model.named_buffers():
        parts[is_expert_key(name)]["master"][name] = buf.detach().cpu().clone()
    dense = {**parts[False], "scheduler": ds.sched.state_dict()} if writes_dense else None
    return dense, (parts[True] if writes_experts else None)


def save_dense(dense: dict, step_dir: Path) -> None:
    torch.save(dense, step_dir / PORTABLE_DENSE)


def load_full_state(ds: DeepSpeedEngine, full: dict) -> None:
    """Puts a layout-free state (checkpoint.full_state) into this rank: its experts' slice, the fp32 master
    fragments and optimiser-moment fragments DeepSpeed keeps here, the schedule, DeepSpeed's step counters
    and, where this rank existed in the saved run, its RNG streams (else a stream seeded from the step and
    rank: per-rank dropout cannot continue when the ranks change)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    base = _base_optimizer(ds)
    if base is None:
        from msmoe_dist.checkpoint import CheckpointError

        raise CheckpointError(
            "parallel.zero_stage=0 with train.dtype=fp16 cannot take a checkpoint of another layout (DeepSpeed's "
            "fp16 optimiser exposes no per-parameter state); use zero_stage>=1 or another dtype"
        )
    model_sd, optim = local_state(full, ds.pg.ep_rank, ds.pg.layout.ep_size)
    ds.model.load_state_dict(model_sd)  # weights in the module's dtype, buffers (routing tables, biases)
    mapped, step = _mapped(ds), optimizer_step(full)
    keys = sorted({k for st in optim.values() for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0})
    params = dict(ds.model.named_parameters())
    if mapped:
        for name, p in params.items():
            safe_set_full_fp32_param(p, model_sd[name].to(p.device, torch.float32))
        if keys:
            for group in base.param_groups:  # torch creates state lazily at the first step: create it now
                for flat in group["params"]:
                    st = base.state[flat]
                    if not st:
                        st.update({k: torch.zeros_like(flat) for k in keys})
                        if step is not None:
                            st["step"] = torch.tensor(step, dtype=torch.float32)
            _link_optimizer_state(ds)  # DeepSpeed links the fragments after a first step
            for name, p in params.items():
                for k in keys:
                    if k in optim.get(name, {}):
                        safe_set_full_optimizer_state(p, optim[name][k].to(p.device, torch.float32), k)
    else:
        for name, p in params.items():
            if optim.get(name):
                base.state[p] = {
                    k: (v.to(p.device, p.dtype) if torch.is_tensor(v) and v.dim() > 0 else v.clone())
                    for k, v in optim[name].items()
                }
    restore_schedule(ds.sched, full["scheduler"])
    eng, steps = ds.engine, int(full["step"])
    eng.global_steps, eng.global_samples = steps, steps * eng.train_batch_size()
    eng.micro_steps = steps * eng.gradient_accumulation_steps()
    if ds.rank in full["rng"]:
        set_rng_state(full["rng"][ds.rank])
    else:
        torch.manual_seed(zlib.crc32(f"msmoe-resume/{steps}/{ds.rank}".encode()))
