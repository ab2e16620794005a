"""The training loop: `Trainer.fit` reads top to bottom; everything it uses is built by `trainer.run`.

Step numbering: `step` in metrics.jsonl and checkpoint names counts completed optimiser steps.
A checkpoint at step N resumes at step N; the data position is the step itself (each rank's
micro-batches are a pure function of seed, step, micro-batch and rank), so a resumed run reads
exactly the samples the uninterrupted run would have read, neither repeating nor skipping any.

Preemption: SIGTERM or SIGUSR1 (SLURM's `--signal`) only sets a flag; the current step finishes,
then every rank agrees on whether to stop (one all-reduce of a one-element flag per step when the
world size is > 1: a signal may reach the ranks at different steps; on one process no collective),
writes a sealed checkpoint at that step and raises `Preempted` (the CLI exits with code 5).
`train.resume=true` then continues bit for bit as if the run had not been interrupted.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from msmoe_dist import logs
from msmoe_dist.checkpoint import Checkpointer, CheckpointMeta
from msmoe_dist.config.schema import CheckpointConfig, LoggingConfig, TrainConfig
from msmoe_dist.moe.stats import MoEStats
from msmoe_dist.parallel import comm
from msmoe_dist.train.engine import Engine, StepResult
from msmoe_dist.train.errors import NonFiniteLoss
from msmoe_dist.train.metrics import MetricsLogger
from msmoe_dist.train.routing_fluctuation import FluctuationRecorder
from msmoe_dist.train.tasks import Task


def step_scalars(res: StepResult, lr: float, rate: float, rate_key: str = "tokens_per_s") -> dict:
    """One metrics row; ``rate`` is tokens/s (language model) or images/s (vision) under ``rate_key``."""
    row = {"loss": res.loss, "aux_loss": res.aux_loss, "lr": lr, rate_key: rate, "grad_norm": res.grad_norm}
    if rate_key == "tokens_per_s":
        row["ppl"] = math.exp(min(res.loss, 700.0))
    for i, layer in enumerate(res.stats or []):
        moe: MoEStats = layer["moe"]
        row.update(moe.to_scalars(f"moe.layer{i}."))
        if "momentum_norm" in layer:
            row[f"momentum.layer{i}.norm"] = float(layer["momentum_norm"])  # device-to-host sync (logged steps)
    return row


PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after writing a sealed checkpoint; the CLI exits with code 5."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(
            f"preempted (SIGTERM/SIGUSR1): stopped after step {step} and wrote the checkpoint {checkpoint}; "
            "continue with train.resume=true"
        )
        self.step, self.checkpoint = step, checkpoint


class StopFlag:
    """Set by SIGTERM/SIGUSR1 while installed (main thread only; elsewhere the handlers stay as they are)."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: object) -> None:
        self.raised = True

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._previous.clear()

    def agreed(self, world_size: int) -> bool:
        """Whether any rank was signalled: one tiny all-reduce (max) per call when world_size > 1."""
        if world_size <= 1:
            return self.raised
        import torch

        flag = torch.tensor([1.0 if self.raised else 0.0])
        return bool(comm.all_reduce(flag, op="max", name="all_reduce (preemption stop flag)").item() > 0)


def peak_memory() -> dict:
    """This process's peak resident memory (GiB), and on CUDA torch.cuda.max_memory_allocated (GiB)."""
    import resource

    import torch

    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


@dataclass
class Trainer:
    engine: Engine
    task: Task
    checkpointer: Checkpointer
    logger: MetricsLogger | None  # main rank only
    recorder: FluctuationRecorder
    train: TrainConfig
    logging: LoggingConfig
    checkpoint: CheckpointConfig
    meta_at: Callable[[int], CheckpointMeta]  # the metadata a checkpoint at that step gets
    config_yaml: str
    recorder_title: str = ""  # moe.router, for the fluctuation plot
    data_world: int = 0  # the run's data layout (world size it started with; data.batches.data_slot); 0: this one

    def fit(self, start: int) -> dict:
        """Trains from optimiser step `start` to train.max_steps; returns the last scalars and files."""
        engine, task, tc = self.engine, self.task, self.train
        task.start(start, engine.rank, engine.world_size, self.data_world)
        bar = _progress(start, tc.max_steps, tc.progress and engine.is_main, self.logging.log_every)
        last_log_time, units_since = time.perf_counter(), 0
        last_ckpt = self.checkpointer.latest()
        final: dict = {}
        stop = StopFlag()
        try:
            stop.__enter__()
            for step in range(start, tc.max_steps):
                done = step + 1
                log_now = done % self.logging.log_every == 0 or done == tc.max_steps
                micro, units = task.micro_batches(step)
                engine.set_step(step)  # StableMoE's stage is a function of the step alone
                try:
                    res = engine.train_step(micro, collect_stats=log_now and self.logging.moe_stats)
                except NonFiniteLoss as exc:
                    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
                    raise NonFiniteLoss(
                        f"{exc} at step {done}; stopped without writing a checkpoint of those weights ({where}); "
                        "try a lower optim.lr or optim.grad_clip>0, then train.resume=true"
                    ) from None
                units_since += units
                if log_now:
                    now = time.perf_counter()
                    rate = units_since / max(now - last_log_time, 1e-9)
                    last_log_time, units_since = now, 0
                    row = {
                        **step_scalars(res, engine.lr(), rate, task.rate_key),
                        **task.extra_scalars(),
                        **peak_memory(),
                    }
                    self._log(done, row)
                    final["train_loss"] = row["loss"]
                    bar.set_postfix({"loss": f"{row['loss']:.3f}", task.rate_key: f"{rate:,.0f}"})
                self.recorder.maybe_record(done, engine.model)  # a forward on every rank when due, before any save
                if tc.eval_every and done % tc.eval_every == 0 and done != tc.max_steps:
                    self._log(done, task.evaluate(engine))
                every = self.checkpoint.every_steps
                saved = bool(every and done % every == 0 and done != tc.max_steps)
                if saved:
                    last_ckpt = self._save(done)
                bar.update(1)
                if done != tc.max_steps and stop.agreed(engine.world_size):
                    ckpt = last_ckpt if saved and last_ckpt is not None else self._save(done)
                    raise Preempted(done, ckpt)
            ev = task.evaluate(engine)
            self._log(tc.max_steps, ev)
            self.recorder.finish(self.logger, f"routing fluctuation, moe.router={self.recorder_title}")
            last_ckpt = self._save(tc.max_steps)
        finally:
            stop.__exit__()
            bar.close()
            task.close()
            if self.logger is not None:
                self.logger.close()
        final.update({k.replace("val.", "val_"): v for k, v in ev.items()})
        final.update(
            {**task.extra_scalars(), "checkpoint": str(last_ckpt), "rank": engine.rank, "world_size": engine.world_size}
        )
        return final

    def _log(self, step: int, row: dict) -> None:
        if self.logger is not None:
            self.logger.log(step, {**row, "time": round(time.time(), 3)})  # wall clock, Unix seconds

    def _save(self, step: int) -> Path:
        return self.checkpointer.save(self.meta_at(step), self.engine, self.config_yaml)


def _progress(start: int, total: int, enabled: bool, every: int):
    """tqdm on a terminal; elsewhere (SLURM logs, files) one plain line every `every` steps."""
    if enabled and not sys.stderr.isatty():
        return _LineProgress(start, total, every)
    from tqdm import tqdm

    return tqdm(
        total=total, initial=start, disable=not enabled, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True
    )


class _LineProgress:
    """The progress bar's stand-in when stderr is not a terminal: no carriage returns."""

    def __init__(self, start: int, total: int, every: int):
        self.n, self.total, self.every, self.postfix = start, total, max(every, 1), ""
        self.t0, self.n0 = time.perf_counter(), start

    def set_postfix(self, values: dict) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.n % self.every == 0 or self.n == self.total:
            rate = (self.n - self.n0) / max(time.perf_counter() - self.t0, 1e-9)
            logs.info(f"train: step {self.n}/{self.total} ({rate:.2f} steps/s) {self.postfix}")

    def close(self) -> None:
        pass
