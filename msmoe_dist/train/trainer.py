"""`run(cfg)`: assembles a training run (runtime, task, model, engine, checkpoints, logs) and fits it.

Who owns what: the Runtime says who and where this process is; the task owns the data and builds
the model on one device; `apply_expert_parallel` makes it parallel; the engine owns the optimiser
and its checkpoint files; the Checkpointer owns the checkpoint protocol; CheckpointMeta decides
whether a checkpoint fits; the Trainer runs the loop. Rank and world size come from the
environment (torchrun, the deepspeed launcher), else 1.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

from msmoe_dist import logs
from msmoe_dist.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointMeta,
    load_full_weights,
    read_meta,
    resolve_checkpoint,
    resume_changes,
    sealed_checkpoints,
    set_aside,
    verify_files,
)
from msmoe_dist.config.fields import arch_keys
from msmoe_dist.config.loader import config_to_dict, config_to_yaml, save_config
from msmoe_dist.config.model_spec import ModelSpec
from msmoe_dist.config.schema import Config, ParallelConfig, TrainConfig
from msmoe_dist.models.base import MoEModel
from msmoe_dist.parallel import comm
from msmoe_dist.parallel.runtime import Runtime
from msmoe_dist.train.engine import Engine
from msmoe_dist.train.errors import NonFiniteLoss, TrainError
from msmoe_dist.train.loop import Trainer
from msmoe_dist.train.metrics import MetricsLogger
from msmoe_dist.train.routing_fluctuation import FluctuationRecorder
from msmoe_dist.train.tasks import Task, make_task
from msmoe_dist.train.wandb_log import WandbSink, require_wandb


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


def prepare_run_dir(run_dir: Path, is_main: bool) -> None:
    """Refuses a run directory that is a file or cannot be written, in one line, before any work."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainError(f"train.run_dir={run_dir} is a file; expected a directory (or a path that does not exist yet)")
    if not is_main:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):  # permissions alone do not tell (read-only mounts, root)
            pass
    except OSError as exc:
        raise TrainError(
            f"cannot write to train.run_dir={run_dir}: {exc.strerror or exc}; expected a writable directory"
        ) from None


def resume_candidates(train: TrainConfig) -> list[Path]:
    """The sealed checkpoints to resume from, newest first ([] = start fresh); refuses a fresh start
    over existing checkpoints (read-only; every rank may call it)."""
    run_dir = Path(train.run_dir)
    sealed = sealed_checkpoints(run_dir / "checkpoints")
    if train.resume:
        if not sealed:
            raise TrainError(
                f"train.resume=true but {run_dir / 'checkpoints'} holds no complete checkpoint (check train.run_dir)"
            )
        return sealed
    if train.auto_resume:
        return sealed
    if sealed and not train.overwrite:
        raise TrainError(
            f"{run_dir} already holds a run (latest checkpoint {sealed[0].name}); to continue it add "
            "train.resume=true (with a larger train.max_steps), to start over train.overwrite=true (deletes its "
            "checkpoints), or pass another train.run_dir"
        )
    return []


def pick_checkpoint(candidates: list[Path], on_corrupt: str) -> tuple[Path, CheckpointMeta]:
    """The newest candidate whose files match their recorded checksums (main rank only).

    on_corrupt=fallback: a corrupt checkpoint is renamed to step_N.corrupt (kept, never deleted; a
    later save of that step must not meet it), said on stderr, and the next older one is tried.
    on_corrupt=fail: the first corrupt one stops the run, naming its files.
    """
    skipped = []
    for step_dir in candidates:
        try:
            meta = read_meta(step_dir)
            verified = verify_files(step_dir, meta)
        except CheckpointError as exc:
            if on_corrupt == "fail":
                raise type(exc)(
                    f"{exc} (checkpoint.on_corrupt=fallback resumes from the newest checkpoint that verifies)"
                ) from None
            moved = set_aside(step_dir, "corrupt")
            logs.info(f"msmoe-train: {exc}; kept as {moved.name}, trying the previous checkpoint")
            skipped.append(step_dir.name)
            continue
        if not verified:
            logs.info(f"msmoe-train: {step_dir} records no checksums (saved before they were kept); not verified")
        if skipped:
            logs.info(f"msmoe-train: resuming from {step_dir.name} instead of {skipped[0]}, which is corrupt")
        return step_dir, meta
    raise CheckpointError(
        f"no checkpoint of {candidates[0].parent} verifies ({', '.join(skipped)} kept as *.corrupt); to start "
        "over use train.overwrite=true or another train.run_dir"
    )


def agree_on_checkpoint(engine: Engine, candidates: list[Path], on_corrupt: str) -> Path:
    """Rank 0 verifies (one reader of every file, not world_size of them) and every rank takes its choice."""
    chosen, error = None, None
    if engine.is_main:
        try:
            chosen, _ = pick_checkpoint(candidates, on_corrupt)
        except CheckpointError as exc:
            error = exc
        except OSError as exc:  # setting a corrupt checkpoint aside failed: still tell the other ranks first
            error = CheckpointError(f"cannot set aside a corrupt checkpoint in {candidates[0].parent}: {exc}")
    # all_sum as a broadcast: rank 0 sends index + 1, or 0 when it found nothing usable
    code = candidates.index(chosen) + 1 if chosen is not None else 0
    (total,) = engine.all_sum([float(code if engine.is_main else 0)])
    if error is not None:
        raise error
    if int(total) == 0:
        raise CheckpointError("rank 0 found no usable checkpoint to resume from (its message says why)")
    return candidates[int(total) - 1]


def local_expert_ids(cfg: Config, kind: str, runtime: Runtime) -> range | None:
    """The global experts this rank holds (deepspeed engine, parallel.ep_size > 1), or None for all of them."""
    if kind != "deepspeed" or cfg.parallel.ep_size <= 1:
        return None
    from msmoe_dist.parallel import LayoutError, ParallelLayout

    try:
        return ParallelLayout(runtime.world_size, cfg.parallel.ep_size).local_experts(runtime.rank, cfg.moe.num_experts)
    except LayoutError as exc:
        raise TrainError(str(exc)) from exc


def build_initial_model(cfg: Config, task: Task, local_experts: range | None = None) -> MoEModel:
    """The model on one device, from the seed, or from checkpoint.init_from's weights (any EP degree; the
    network must match). local_experts: only these experts are built (and read from init_from); their
    initial values are the ones a one-process build gives them (moe.experts.expert_seed)."""
    init = None
    if cfg.checkpoint.init_from:
        step_dir = resolve_checkpoint(cfg.checkpoint.init_from)
        init, meta = load_full_weights(step_dir, local_experts)
        meta.check_weights(step_dir, ModelSpec.of(cfg))
    torch.manual_seed(cfg.train.seed)
    model = task.build_model(local_experts)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
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


def restore(engine: Engine, step_dir: Path, cfg: Config, world_size: int = 1) -> CheckpointMeta:
    """Checks that the checkpoint fits this run (one error naming every reason: network, EP degree, global
    batch, then any other setting that may not change on resume), says which allowed settings changed,
    loads the state, and returns its metadata (the step to continue from, the metrics log's position).

    Same layout: the engine's own files (``load_files``, bit for bit). Another layout (engine, world size,
    EP degree, ZeRO stage, dtype): the checkpoint is assembled into one state by parameter name
    (checkpoint.full_state) and each rank takes its slice (``load_full_state``)."""
    meta = read_meta(step_dir)
    layout_now = engine.layout_meta()
    batch_now = {
        "batch_size": cfg.data.batch_size,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "world_size": world_size,
    }
    notes = meta.check_resume(step_dir, layout_now, ModelSpec.of(cfg), batch_now, cfg.train.allow_batch_change)
    changed = resume_changes(step_dir, meta.config, config_to_dict(cfg), arch_keys("vision"))
    if meta.step >= cfg.train.max_steps:
        raise TrainError(f"checkpoint is at step {meta.step}, already >= train.max_steps={cfg.train.max_steps}")
    if changed and engine.is_main:
        logs.info(f"msmoe-train: resuming {step_dir.name} with changed settings: {', '.join(changed)}")
    if meta.layout_differences(layout_now):
        from msmoe_dist.checkpoint.full_state import assemble_full_state

        full = assemble_full_state(step_dir, meta, getattr(engine, "param_names", None))
        engine.load_full_state(full)
    else:
        engine.load_files(step_dir, meta)
    if engine.is_main:
        for note in notes:
            logs.info(f"msmoe-train: resuming {step_dir.name}: {note}")
    return meta


def data_world_of(resumed: CheckpointMeta | None, cfg: Config, world_size: int) -> int:
    """The run's data layout (data.batches.data_slot): the world size it started with, kept across resumes
    at other world sizes so that they read the same samples; a resume with another batch (allowed by
    train.allow_batch_change) starts the new batch's order, that of this world size."""
    if resumed is None:
        return world_size
    batch_now = {"batch_size": cfg.data.batch_size, "grad_accum_steps": cfg.train.grad_accum_steps}
    if resumed.batch_change({**batch_now, "world_size": world_size}):
        return world_size
    saved = resumed.parts.get("data", {}).get("world_size")  # absent before issue 17: the saving run's world
    return int(saved or resumed.layout.get("world_size") or 1)


def banner(cfg: Config, kind: str, world_size: int, model: MoEModel) -> str:
    """The start-up lines (rank 0): engine, layout, precision, model size, batch size, run directory."""
    from msmoe_dist.moe import is_expert_param

    # Every expert of the model, not this rank's share (a rank under EP holds 1/ep_size of them).
    ep_share = cfg.parallel.ep_size if kind == "deepspeed" else 1
    local_expert = sum(p.numel() for p in model.parameters() if is_expert_param(p))
    expert = ep_share * local_expert
    total = sum(p.numel() for p in model.parameters()) - local_expert + expert
    active = total - expert + expert * cfg.moe.top_k // max(cfg.moe.num_experts, 1)
    pc, d, G = cfg.parallel, cfg.data, cfg.train.grad_accum_steps
    ep = pc.ep_size if kind == "deepspeed" else 1
    per_step = (
        f"{d.batch_size * G * world_size:,} images/step"
        if cfg.model.kind == "vit"
        else f"{d.batch_size * d.seq_len * G * world_size:,} tokens/step"
    )
    zero = f", ZeRO stage {pc.zero_stage}" if kind == "deepspeed" else ""
    return (
        f"msmoe-train: engine {kind}, world size {world_size} (EP {ep} x DP {world_size // ep}){zero}, "
        f"dtype {cfg.train.dtype}\n"
        f"msmoe-train: parameters {total:,} total, {active:,} active per token "
        f"(top-{cfg.moe.top_k} of {cfg.moe.num_experts} experts); {per_step}; run dir {cfg.train.run_dir}"
    )


def run_info(world_size: int, resume_step: int | None) -> dict:
    """What ran: versions (package, Python, torch, DeepSpeed, CUDA), the git commit when the package
    lives in a git checkout, the command line, host, world size and the step it started from."""
    import platform
    import subprocess
    import time
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    commit = None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resume_step": resume_step,
        "argv": sys.argv,
        "host": platform.node(),
        "world_size": world_size,
        "msmoe_dist": pkg("msmoe_dist") or pkg("msmoe-dist"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": pkg("deepspeed"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git_commit": commit,
    }


def record_run_info(run_dir: Path, world_size: int, resume_step: int | None) -> None:
    """Appends this launch's `run_info` to run_dir/run_info.json (a list: one entry per start or resume)."""
    import json

    path = run_dir / "run_info.json"
    try:
        runs = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, ValueError):
        runs = []
    if not isinstance(runs, list):
        runs = []
    runs.append(run_info(world_size, resume_step))
    path.write_text(json.dumps(runs, indent=1) + "\n")


def run(cfg: Config) -> dict:
    """Trains according to `cfg`; returns a summary dict (final losses and file locations)."""
    runtime = Runtime.from_env(cfg.train.device)
    kind = engine_kind(cfg.parallel, runtime.world_size)  # refuse impossible launches before touching anything
    require_wandb(cfg.logging.wandb)
    run_dir = Path(cfg.train.run_dir)
    prepare_run_dir(run_dir, runtime.is_main)
    candidates = resume_candidates(cfg.train)
    if kind == "deepspeed":
        runtime.start_distributed(cfg.parallel)
    task = make_task(cfg)
    # Rank 0 generates/caches the data first; the others then read its cache.
    if runtime.is_main:
        task.load_data()
    if runtime.world_size > 1:
        comm.barrier(name="barrier (rank 0 prepared the data)")
    if not runtime.is_main:
        task.load_data()
    model = build_initial_model(cfg, task, local_expert_ids(cfg, kind, runtime))
    if runtime.is_main:
        logs.info(banner(cfg, kind, runtime.world_size, model))
    engine = build_engine(cfg, kind, runtime, model)
    resumed = None
    if candidates:
        step_dir = agree_on_checkpoint(engine, candidates, cfg.checkpoint.on_corrupt)
        resumed = restore(engine, step_dir, cfg, runtime.world_size)
        if engine.is_main:
            logs.info(f"msmoe-train: resuming from step {resumed.step} ({step_dir})")
    if resumed is None and engine.is_main and cfg.train.overwrite:
        for sub in ("checkpoints", "tensorboard"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    engine.barrier()
    resume_step = resumed.step if resumed is not None else None
    logger = None
    if engine.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        record_run_info(run_dir, runtime.world_size, resume_step)
        logger = MetricsLogger(
            run_dir,
            cfg.logging.tensorboard,
            resume_step=resume_step,
            resume_state=resumed.parts.get("metrics") if resumed is not None else None,
            wandb=WandbSink(run_dir, cfg.logging.wandb_project, cfg.logging.wandb_mode, config_to_dict(cfg))
            if cfg.logging.wandb
            else None,
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

    data_world = data_world_of(resumed, cfg, runtime.world_size)

    def meta_at(step: int) -> CheckpointMeta:
        parts = {"metrics": logger.state_dict()} if logger is not None else {}
        parts["data"] = {"world_size": data_world}
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
        data_world=data_world,
    )
    final = trainer.fit(resume_step or 0)
    final.update(
        {
            "run_dir": str(run_dir),
            "metrics": str(run_dir / "metrics.jsonl"),
            "tensorboard": str(run_dir / "tensorboard") if cfg.logging.tensorboard else None,
            "wandb": str(run_dir / "wandb") if cfg.logging.wandb else None,
        }
    )
    return final


__all__ = [
    "NonFiniteLoss",
    "TrainError",
    "build_engine",
    "build_initial_model",
    "local_expert_ids",
    "engine_kind",
    "pick_checkpoint",
    "prepare_run_dir",
    "restore",
    "resume_candidates",
    "run",
]
