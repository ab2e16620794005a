"""Timing helpers shared by the benchmarks: interleaved repeats, medians, machine description."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from typing import Callable

import torch


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(fns: dict[str, Callable[[], None]], repeats: int, warmup: int, device) -> dict[str, float]:
    """Runs each fn `warmup` times, then `repeats` rounds of all fns in turn; median ms per fn.

    Interleaving spreads machine noise (other processes, frequency changes) evenly over the
    candidates instead of penalising whichever happened to run during a slow period; rotating
    the order each round removes the bias of a fixed position within the round.
    """
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        # Rotate the order every round: whoever runs first (or right after a given other
        # candidate) in a round gets a systematic advantage or penalty otherwise.
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step_fn(model: torch.nn.Module, x, y, device, bf16: bool = False) -> Callable[[], None]:
    """One AdamW training step of ``model`` on (x, y), for timing: forward (bf16 autocast if asked),
    loss + aux loss backward, optimiser step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device = torch.device(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x, y)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
