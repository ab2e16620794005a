"""Single-process training loop: model, optimiser, schedule, logging, evaluation, checkpoints.

Step numbering: `step` in metrics.jsonl and checkpoint names counts completed optimiser steps.
A checkpoint at step N resumes at step N; the data position is the step itself (batches are a
pure function of seed and step), so a resumed run reads exactly the tokens the uninterrupted
run would have read.
"""

from __future__ import annotations

import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from msmoe_dist.config.loader import config_to_dict, save_config
from msmoe_dist.config.schema import Config
from msmoe_dist.data import load_corpus, train_batch
from msmoe_dist.eval import autocast_ctx, evaluate_lm
from msmoe_dist.models import MoELanguageModel
from msmoe_dist.train.checkpoint import latest_checkpoint, load_state, save_checkpoint
from msmoe_dist.train.metrics import MetricsLogger
from msmoe_dist.train.optim import build_optimizer, build_scheduler

# Sections whose values define the network; a resume with different values would load
# weights into the wrong shapes or silently change the model.
ARCH_SECTIONS = ("model", "moe", "momentum")


class TrainError(ValueError):
    """A user-facing problem with the run (one line); the CLI exits with code 2."""


class NonFiniteLoss(RuntimeError):
    """Training hit a NaN/Inf loss; the CLI exits with code 3."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device=cuda but no CUDA device is visible (expected train.device=cpu or auto)")
    return torch.device(name)


def build_model(cfg: Config, vocab_size: int) -> MoELanguageModel:
    return MoELanguageModel(cfg.model, cfg.moe, cfg.momentum, vocab_size)


def resolve_vocab_size(cfg: Config, data_vocab: int) -> int:
    if cfg.model.vocab_size == 0:
        return data_vocab
    if cfg.model.vocab_size < data_vocab:
        raise TrainError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary ({data_vocab}); "
            "expected 0 (take it from the data) or >= the data's size"
        )
    return cfg.model.vocab_size


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """Checks the run directory against train.resume/overwrite; returns (run_dir, checkpoint to resume)."""
    run_dir = Path(cfg.train.run_dir)
    ckpt_root = run_dir / "checkpoints"
    latest = latest_checkpoint(ckpt_root)
    if cfg.train.resume:
        if latest is None:
            raise TrainError(
                f"train.resume=true but {ckpt_root} holds no complete checkpoint (check train.run_dir)"
            )
        return run_dir, latest
    if latest is not None:
        if not cfg.train.overwrite:
            raise TrainError(
                f"{run_dir} already holds checkpoints (latest {latest.name}); expected train.resume=true to "
                "continue it, train.overwrite=true to start over, or another train.run_dir"
            )
        for sub in ("checkpoints", "tensorboard"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, None


def check_resume_compatible(cfg: Config, saved: dict) -> None:
    now = config_to_dict(cfg)
    for section in ARCH_SECTIONS:
        for key, val in saved["config"][section].items():
            if now[section].get(key) != val:
                raise TrainError(
                    f"cannot resume: {section}.{key}={now[section].get(key)!r} differs from the checkpoint's "
                    f"{val!r} (expected the same model/moe/momentum settings)"
                )


def step_scalars(loss: float, aux: float, lr: float, tok_s: float, gnorm: float, stats: list | None) -> dict:
    row = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "aux_loss": aux, "lr": lr, "tokens_per_s": tok_s,
           "grad_norm": gnorm}
    for i, layer in enumerate(stats or []):
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


def run(cfg: Config) -> dict:
    """Trains according to `cfg`; returns a summary dict (final losses and file locations)."""
    if cfg.parallel.ep_size > 1:
        raise TrainError(
            f"parallel.ep_size={cfg.parallel.ep_size} needs expert parallelism across processes, which this "
            "single-process trainer does not provide yet (expected parallel.ep_size=1)"
        )
    run_dir, resume_from = prepare_run_dir(cfg)
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    corpus = load_corpus(cfg.data, splits=("train", "valid"))
    vocab_size = resolve_vocab_size(cfg, len(corpus.vocab))
    model = build_model(cfg, vocab_size).to(device)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.train.max_steps)
    start = 0
    if resume_from is not None:
        saved = load_state(resume_from)
        check_resume_compatible(cfg, saved)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        start = saved["step"]
        if start >= cfg.train.max_steps:
            raise TrainError(f"checkpoint is at step {start}, already >= train.max_steps={cfg.train.max_steps}")
    save_config(cfg, run_dir / "config.yaml")
    config_yaml = (run_dir / "config.yaml").read_text()
    logger = MetricsLogger(run_dir, cfg.logging.tensorboard, resume_step=start if resume_from else None)
    ckpt_root = run_dir / "checkpoints"

    def checkpoint(step: int) -> Path:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "rng": rng_state(), "step": step, "data_position": {"step": step},
                 "config": config_to_dict(cfg), "vocab_size": vocab_size, "vocab_sha256": corpus.vocab.sha256()}
        return save_checkpoint(ckpt_root, step, state, config_yaml, cfg.checkpoint.keep_last)

    def evaluate() -> dict:
        return evaluate_lm(model, corpus.valid, cfg.data.batch_size, cfg.data.seq_len, cfg.train.eval_batches,
                           device, cfg.train.dtype)

    tc, B, S = cfg.train, cfg.data.batch_size, cfg.data.seq_len
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    bar = _progress(start, tc.max_steps, tc.progress)
    last_log_time, tokens_since = time.perf_counter(), 0
    last_ckpt = latest_checkpoint(ckpt_root)
    model.train()
    final = {}
    try:
        for step in range(start, tc.max_steps):
            done = step + 1
            log_now = done % cfg.logging.log_every == 0 or done == tc.max_steps
            x, y = train_batch(corpus.train, step, B, S, tc.seed)
            x, y = x.to(device), y.to(device)
            with autocast_ctx(device, tc.dtype):
                out = model(x, y, collect_stats=log_now and cfg.logging.moe_stats)
            loss = out.loss + out.aux_loss
            if not torch.isfinite(loss):
                where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
                raise NonFiniteLoss(
                    f"loss became {float(loss)} at step {done}; stopped without saving ({where}); "
                    "try a lower optim.lr or optim.grad_clip>0, then train.resume=true"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            opt.step()
            sched.step()
            tokens_since += B * S
            if log_now:
                now = time.perf_counter()
                tok_s = tokens_since / max(now - last_log_time, 1e-9)
                last_log_time, tokens_since = now, 0
                row = step_scalars(float(out.loss), float(out.aux_loss), sched.get_last_lr()[0], tok_s, gnorm, out.stats)
                logger.log(done, row)
                final["train_loss"] = row["loss"]
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
            if tc.eval_every and done % tc.eval_every == 0 and done != tc.max_steps:
                ev = evaluate()
                logger.log(done, {"val.loss": ev["loss"], "val.ppl": ev["ppl"]})
            if cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0 and done != tc.max_steps:
                last_ckpt = checkpoint(done)
            bar.update(1)
        ev = evaluate()
        logger.log(tc.max_steps, {"val.loss": ev["loss"], "val.ppl": ev["ppl"]})
        last_ckpt = checkpoint(tc.max_steps)
    finally:
        bar.close()
        logger.close()
    final.update({"val_loss": ev["loss"], "val_ppl": ev["ppl"], "run_dir": str(run_dir),
                  "metrics": str(run_dir / "metrics.jsonl"), "tensorboard": str(run_dir / "tensorboard"),
                  "checkpoint": str(last_ckpt)})
    return final


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step", file=sys.stderr,
                dynamic_ncols=True)
