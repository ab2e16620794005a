"""`run(cfg)`: assembles a training run (runtime, task, model, engine, checkpoints, logs) and fits it.

Who owns what: the Runtime says who and where this process is; the task owns the data and builds
the model on one device; `apply_expert_parallel` makes it parallel; the engine owns the optimiser
and its checkpoint files; the Checkpointer owns the checkpoint protocol; CheckpointMeta decides
whether a checkpoint fits; the Trainer runs the loop. Rank and world size come from the
environment (torchrun, the deepspeed launcher), else 1.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from msmoe_dist.checkpoint import (
    Checkpointer,
    CheckpointMeta,
    latest_checkpoint,
    load_full_weights,
    read_meta,
    resolve_checkpoint,
)
from msmoe_dist.config.loader import config_to_dict, config_to_yaml, save_config
from msmoe_dist.config.model_spec import ModelSpec
from msmoe_dist.config.schema import Config, ParallelConfig, TrainConfig
from msmoe_dist.models.base import MoEModel
from msmoe_dist.parallel.runtime import Runtime
from msmoe_dist.train.engine import Engine
from msmoe_dist.train.errors import NonFiniteLoss, TrainError
from msmoe_dist.train.loop import Trainer
from msmoe_dist.train.metrics import MetricsLogger
from msmoe_dist.train.routing_fluctuation import FluctuationRecorder
from msmoe_dist.train.tasks import Task, make_task


def engine_kind(pcfg: ParallelConfig, world_size: int) -> str:
    """native (one process, plain PyTorch) or deepspeed; refuses launches that cannot work."""
    kind = pcfg.engine
    if kind == "auto":
        kind = "deepspeed" if world_size > 1 else "native"
    if kind == "native" and world_size > 1:
        raise TrainError(
            f"parallel.engine=native runs one process, but WORLD_SIZE={world_size} "
            "(expected parallel.engine=deepspeed or auto)"
        )
    if kind == "native" and pcfg.ep_size > 1:
        raise TrainError(
            f"parallel.ep_size={pcfg.ep_size} needs several processes (launch with torchrun "
            "or the deepspeed launcher); expected parallel.ep_size=1 for one process"
        )
    return kind


def find_resume_point(train: TrainConfig) -> Path | None:
    """Checks the run directory against train.resume/overwrite (read-only; every rank may call it)."""
    run_dir = Path(train.run_dir)
    latest = latest_checkpoint(run_dir / "checkpoints")
    if train.resume:
        if latest is None:
            raise TrainError(
                f"train.resume=true but {run_dir / 'checkpoints'} holds no complete checkpoint (check train.run_dir)"
            )
        return latest
    if train.auto_resume:
        return latest
    if latest is not None and not train.overwrite:
        raise TrainError(
            f"{run_dir} already holds checkpoints (latest {latest.name}); expected train.resume=true to "
            "continue it, train.overwrite=true to start over, or another train.run_dir"
        )
    return None


def build_initial_model(cfg: Config, task: Task) -> MoEModel:
    """The model on one device, from the seed (as one process would build it), or from
    checkpoint.init_from's weights (every expert, any EP degree; the network must match)."""
    init = None
    if cfg.checkpoint.init_from:
        step_dir = resolve_checkpoint(cfg.checkpoint.init_from)
        init, meta = load_full_weights(step_dir)
        meta.check_weights(step_dir, ModelSpec.of(cfg))
    torch.manual_seed(cfg.train.seed)
    model = task.build_model()
    if init is not None:
        model.load_state_dict(init)
    return model


def build_engine(cfg: Config, kind: str, runtime: Runtime, model: MoEModel) -> Engine:
    """Wraps a model built on one device: native as it is; deepspeed after building the process
    groups and applying expert parallelism (this rank keeps its experts)."""
    if kind == "native":
        from msmoe_dist.train.native_engine import NativeEngine

        return NativeEngine(model, cfg.optim, cfg.train, runtime.device)
    from msmoe_dist.parallel import LayoutError, ParallelLayout, build_process_groups
    from msmoe_dist.parallel.expert_parallel import apply_expert_parallel
    from msmoe_dist.train.ds_engine import DeepSpeedEngine

    try:
        layout = ParallelLayout(runtime.world_size, cfg.parallel.ep_size)
        layout.check_experts(cfg.moe.num_experts)
    except LayoutError as exc:
        raise TrainError(str(exc)) from exc
    pg = build_process_groups(layout, runtime.rank, cfg.parallel.timeout_s)
    apply_expert_parallel(model, pg)
    return DeepSpeedEngine(model, pg, cfg.moe.num_experts, cfg.optim, cfg.train, cfg.parallel, cfg.data.batch_size)


def run(cfg: Config) -> dict:
    """Trains according to `cfg`; returns a summary dict (final losses and file locations)."""
    runtime = Runtime.from_env(cfg.train.device)
    kind = engine_kind(cfg.parallel, runtime.world_size)  # refuse impossible launches before touching anything
    resume_from = find_resume_point(cfg.train)
    run_dir = Path(cfg.train.run_dir)
    if kind == "deepspeed":
        runtime.start_distributed(cfg.parallel)
    task = make_task(cfg)
    # Rank 0 generates/caches the data first; the others then read its cache.
    if runtime.is_main:
        task.load_data()
    if runtime.world_size > 1:
        torch.distributed.barrier()
    if not runtime.is_main:
        task.load_data()
    engine = build_engine(cfg, kind, runtime, build_initial_model(cfg, task))
    start, resumed = 0, None
    if resume_from is not None:
        resumed = read_meta(resume_from)
        resumed.check_resume(resume_from, engine.layout_meta(), ModelSpec.of(cfg))
        engine.load_files(resume_from, resumed)
        start = resumed.step
        if start >= cfg.train.max_steps:
            raise TrainError(f"checkpoint is at step {start}, already >= train.max_steps={cfg.train.max_steps}")
    elif engine.is_main and cfg.train.overwrite:
        for sub in ("checkpoints", "tensorboard"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    engine.barrier()
    resume_step = resumed.step if resumed is not None else None
    logger = None
    if engine.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        logger = MetricsLogger(
            run_dir,
            cfg.logging.tensorboard,
            resume_step=resume_step,
            resume_state=resumed.parts.get("metrics") if resumed is not None else None,
        )
    lg = cfg.logging
    recorder = FluctuationRecorder(
        lg.fluct_every,
        lg.fluct_tokens,
        task.probe_stream,
        cfg.data.seq_len,
        cfg.data.batch_size,
        cfg.train.max_steps,
        run_dir,
        engine.is_main,
        cfg.train.dtype == "bf16",
        resume_step,
    )
    config = config_to_dict(cfg)
    data = task.data_fingerprint()

    def meta_at(step: int) -> CheckpointMeta:
        parts = {"metrics": logger.state_dict()} if logger is not None else {}
        return CheckpointMeta(step, engine.layout_meta(), config, data, parts)

    trainer = Trainer(
        engine,
        task,
        Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last, engine.is_main, engine.barrier),
        logger,
        recorder,
        cfg.train,
        cfg.logging,
        cfg.checkpoint,
        meta_at,
        config_to_yaml(cfg),
        recorder_title=cfg.moe.router,
    )
    final = trainer.fit(start)
    final.update(
        {
            "run_dir": str(run_dir),
            "metrics": str(run_dir / "metrics.jsonl"),
            "tensorboard": str(run_dir / "tensorboard"),
        }
    )
    return final


__all__ = [
    "NonFiniteLoss",
    "TrainError",
    "build_engine",
    "build_initial_model",
    "engine_kind",
    "find_resume_point",
    "run",
]
