"""The training loop, for one process (native engine) or many (DeepSpeed engine).

Step numbering: `step` in metrics.jsonl and checkpoint names counts completed optimiser steps.
A checkpoint at step N resumes at step N; the data position is the step itself (each rank's
micro-batches are a pure function of seed, step, micro-batch and rank), so a resumed run reads
exactly the tokens the uninterrupted run would have read, neither repeating nor skipping any.
Rank and world size come from the environment (torchrun, the deepspeed launcher), else 1.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import torch

from msmoe_dist.config.loader import config_to_dict, config_to_yaml
from msmoe_dist.config.schema import Config
from msmoe_dist.models import MoELanguageModel
from msmoe_dist.moe.fluctuation import FluctuationRecorder
from msmoe_dist.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    read_seal,
    resolve_checkpoint,
    save_checkpoint,
)
from msmoe_dist.train.engine_base import NonFiniteLoss, rng_state, set_rng_state  # noqa: F401 (re-export)
from msmoe_dist.train.metrics import MetricsLogger
from msmoe_dist.train.tasks import make_task

# Sections whose values define the network; a resume with different values would load
# weights into the wrong shapes or silently change the model.
ARCH_SECTIONS = ("model", "moe", "momentum")
VISION_ARCH_KEYS = ("image_size", "patch_size", "num_classes", "pooling", "moe_layout", "moe_every", "moe_last")


class TrainError(ValueError):
    """A user-facing problem with the run (one line); the CLI exits with code 2."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device=cuda but no CUDA device is visible (expected train.device=cpu or auto)")
    return torch.device(name)


def build_model(cfg: Config, vocab_size: int, dispatcher=None) -> MoELanguageModel:
    return MoELanguageModel(cfg.model, cfg.moe, cfg.momentum, vocab_size, dispatcher=dispatcher)


def resolve_vocab_size(cfg: Config, data_vocab: int) -> int:
    if cfg.model.output_layer == "adaptive":  # the config check could not know the data's vocabulary
        from msmoe_dist.models.output import check_cutoffs

        try:
            check_cutoffs(cfg.model.adaptive_cutoffs, cfg.model.vocab_size or data_vocab)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
    if cfg.model.vocab_size == 0:
        return data_vocab
    if cfg.model.vocab_size < data_vocab:
        raise TrainError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary ({data_vocab}); "
            "expected 0 (take it from the data) or >= the data's size"
        )
    return cfg.model.vocab_size


def _same_weights(key: str, saved, now) -> bool:
    """model.output_layer full <-> chunked computes the same function of the same weights, so a run
    may switch between them (say, to chunked after running out of memory); adaptive is another model."""
    if key == "output_chunk_tokens":
        return True
    return key == "output_layer" and {saved, now} <= {"full", "chunked"}


def check_resume_compatible(cfg: Config, saved_config: dict) -> None:
    now = config_to_dict(cfg)
    for section in ARCH_SECTIONS:
        for key, val in saved_config[section].items():
            if section == "model" and _same_weights(key, val, now[section].get(key)):
                continue
            if now[section].get(key) != val:
                raise TrainError(
                    f"cannot resume: {section}.{key}={now[section].get(key)!r} differs from the checkpoint's "
                    f"{val!r} (expected the same model/moe/momentum settings)"
                )
    for key in VISION_ARCH_KEYS:  # the vision keys that shape the network (not the augmentation)
        val = saved_config.get("vision", {}).get(key, now["vision"][key])
        if now["model"]["kind"] == "vit" and now["vision"][key] != val:
            raise TrainError(f"cannot resume: vision.{key}={now['vision'][key]!r} differs from the checkpoint's "
                             f"{val!r} (expected the same network; augmentation keys may change)")


def find_resume_point(cfg: Config) -> Path | None:
    """Checks the run directory against train.resume/overwrite (read-only; every rank may call it)."""
    run_dir = Path(cfg.train.run_dir)
    latest = latest_checkpoint(run_dir / "checkpoints")
    if cfg.train.resume:
        if latest is None:
            raise TrainError(f"train.resume=true but {run_dir / 'checkpoints'} holds no complete checkpoint "
                             "(check train.run_dir)")
        return latest
    if cfg.train.auto_resume:
        return latest
    if latest is not None and not cfg.train.overwrite:
        raise TrainError(
            f"{run_dir} already holds checkpoints (latest {latest.name}); expected train.resume=true to "
            "continue it, train.overwrite=true to start over, or another train.run_dir"
        )
    return None


def step_scalars(res, lr: float, rate: float, rate_key: str = "tokens_per_s") -> dict:
    """One metrics row; ``rate`` is tokens/s (language model) or images/s (vision) under ``rate_key``."""
    row = {"loss": res.loss, "aux_loss": res.aux_loss, "lr": lr, rate_key: rate, "grad_norm": res.grad_norm}
    if rate_key == "tokens_per_s":
        row["ppl"] = math.exp(min(res.loss, 700.0))
    for i, layer in enumerate(res.stats or []):
        moe, pre = layer["moe"], f"moe.layer{i}."
        row[pre + "load_imbalance"] = float(moe.load_imbalance)
        row[pre + "drop_fraction"] = float(moe.drop_fraction)
        row[pre + "dropped"] = int(moe.num_dropped)
        row[pre + "router_entropy"] = float(moe.router_entropy)
        row[pre + "tokens_per_expert"] = [int(c) for c in moe.tokens_per_expert]
        row[pre + "selection_by_norm"] = [int(c) for c in moe.selection_by_norm]
        if "momentum_norm" in layer:
            row[f"momentum.layer{i}.norm"] = layer["momentum_norm"]
    return row


def _engine_kind(cfg: Config, world_size: int) -> str:
    kind = cfg.parallel.engine
    if kind == "auto":
        kind = "deepspeed" if world_size > 1 else "native"
    if kind == "native" and world_size > 1:
        raise TrainError(f"parallel.engine=native runs one process, but WORLD_SIZE={world_size} "
                         "(expected parallel.engine=deepspeed or auto)")
    if kind == "native" and cfg.parallel.ep_size > 1:
        raise TrainError(f"parallel.ep_size={cfg.parallel.ep_size} needs several processes (launch with torchrun "
                         "or the deepspeed launcher); expected parallel.ep_size=1 for one process")
    return kind


def _init_weights(cfg: Config) -> dict | None:
    if not cfg.checkpoint.init_from:
        return None
    from msmoe_dist.train.weights import load_full_weights

    step_dir = resolve_checkpoint(cfg.checkpoint.init_from)
    weights, seal = load_full_weights(step_dir)
    check_resume_compatible(cfg, seal["config"])
    return weights


def make_engine(cfg: Config, vocab_size: int, builder=None):
    """The engine for this launch; ``builder(cfg, size, dispatcher)`` builds the model (default: the LM),
    ``vocab_size`` is the size it takes (vocabulary, or classes for vision)."""
    builder = builder or build_model
    from msmoe_dist.parallel import env_rank_world

    rank, world, local_rank = env_rank_world()
    kind = _engine_kind(cfg, world)
    init = _init_weights(cfg)
    if kind == "native":
        from msmoe_dist.train.native_engine import NativeEngine

        torch.manual_seed(cfg.train.seed)
        model = builder(cfg, vocab_size)
        if init is not None:
            model.load_state_dict(init)
        return NativeEngine(model, cfg, pick_device(cfg.train.device))
    from msmoe_dist.parallel import LayoutError, ParallelLayout, build_process_groups
    from msmoe_dist.parallel.startup import init_for_deepspeed
    from msmoe_dist.train.ds_engine import DeepSpeedEngine

    try:
        layout = ParallelLayout(world, cfg.parallel.ep_size)
        layout.check_experts(cfg.moe.num_experts)
    except LayoutError as exc:
        raise TrainError(str(exc)) from exc
    init_for_deepspeed(cfg.parallel, cfg.train.device, local_rank)
    pg = build_process_groups(layout, rank, cfg.parallel.timeout_s)
    return DeepSpeedEngine(cfg, builder, vocab_size, pg, init)


def run(cfg: Config) -> dict:
    """Trains according to `cfg`; returns a summary dict (final losses and file locations)."""
    from msmoe_dist.parallel import env_rank_world

    rank, world, local_rank = env_rank_world()
    _engine_kind(cfg, world)  # refuse impossible launches before touching anything
    resume_from = find_resume_point(cfg)
    run_dir = Path(cfg.train.run_dir)
    if world > 1:
        from msmoe_dist.parallel.startup import init_for_deepspeed

        init_for_deepspeed(cfg.parallel, cfg.train.device, local_rank)
    task = make_task(cfg)
    # Rank 0 generates/caches the data first; the others then read its cache.
    if rank == 0:
        task.load_data()
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        task.load_data()
    size = task.model_size()
    engine = make_engine(cfg, size, task.build_model)
    start = 0
    if resume_from is not None:
        seal = read_seal(resume_from)
        check_resume_compatible(cfg, seal["config"])
        start = engine.load(resume_from, seal)
        if start >= cfg.train.max_steps:
            raise TrainError(f"checkpoint is at step {start}, already >= train.max_steps={cfg.train.max_steps}")
    elif engine.is_main and cfg.train.overwrite:
        for sub in ("checkpoints", "tensorboard"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    engine.barrier()
    config_yaml = config_to_yaml(cfg)
    logger = None
    if engine.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
        logger = MetricsLogger(run_dir, cfg.logging.tensorboard, resume_step=start if resume_from else None)
    fluct = FluctuationRecorder.from_config(cfg, task.valid_stream, run_dir, engine.is_main,
                                            start if resume_from else None)
    ckpt_root = run_dir / "checkpoints"
    seal_extra = {"config": config_to_dict(cfg), **task.seal_extra(size)}

    def checkpoint(step: int) -> Path:
        return save_checkpoint(ckpt_root, step, lambda d: engine.write_rank_files(d, step),
                               {**engine.seal(), **seal_extra}, config_yaml, cfg.checkpoint.keep_last,
                               engine.is_main, engine.barrier)

    def log(step: int, row: dict) -> None:
        if logger is not None:
            logger.log(step, row)

    tc = cfg.train
    task.start(start, engine.rank, engine.world_size)
    bar = _progress(start, tc.max_steps, tc.progress and engine.is_main)
    last_log_time, units_since = time.perf_counter(), 0
    last_ckpt = latest_checkpoint(ckpt_root)
    final: dict = {}
    try:
        for step in range(start, tc.max_steps):
            done = step + 1
            log_now = done % cfg.logging.log_every == 0 or done == tc.max_steps
            micro, units = task.micro_batches(step)
            engine.model.set_step(step)  # StableMoE's stage is a function of the step alone
            try:
                res = engine.train_step(micro, collect_stats=log_now and cfg.logging.moe_stats)
            except NonFiniteLoss as exc:
                where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
                raise NonFiniteLoss(
                    f"{exc} at step {done}; stopped before updating the weights ({where}); "
                    "try a lower optim.lr or optim.grad_clip>0, then train.resume=true"
                ) from None
            units_since += units
            if log_now:
                now = time.perf_counter()
                rate = units_since / max(now - last_log_time, 1e-9)
                last_log_time, units_since = now, 0
                row = {**step_scalars(res, engine.lr(), rate, task.rate_key), **task.extra_scalars()}
                log(done, row)
                final["train_loss"] = row["loss"]
                bar.set_postfix({"loss": f"{row['loss']:.3f}", task.rate_key: f"{rate:,.0f}"})
            fluct.maybe_record(done, engine.model)  # a forward on every rank when due, before any checkpoint
            if tc.eval_every and done % tc.eval_every == 0 and done != tc.max_steps:
                log(done, task.evaluate(engine))
            if cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0 and done != tc.max_steps:
                last_ckpt = checkpoint(done)
            bar.update(1)
        ev = task.evaluate(engine)
        log(tc.max_steps, ev)
        fluct.finish(logger, f"routing fluctuation, moe.router={cfg.moe.router}")
        last_ckpt = checkpoint(tc.max_steps)
    finally:
        bar.close()
        task.close()
        if logger is not None:
            logger.close()
    final.update({k.replace("val.", "val_"): v for k, v in ev.items()})
    final.update({**task.extra_scalars(), "run_dir": str(run_dir),
                  "metrics": str(run_dir / "metrics.jsonl"), "tensorboard": str(run_dir / "tensorboard"),
                  "checkpoint": str(last_ckpt), "rank": engine.rank, "world_size": engine.world_size})
    return final


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step", file=sys.stderr,
                dynamic_ncols=True)


__all__ = ["run", "TrainError", "NonFiniteLoss", "CheckpointError", "build_model", "pick_device", "rng_state"]
