"""The benchmark harness every `msmoe-bench` subcommand shares: what machine, when, and one timing loop.

``timed_rounds`` is the only timing loop of the benchmarks. Each round times every case once, in an
order that rotates from round to round; with a process group every call starts after a barrier and a
(round, case) time is the maximum over ranks, because a distributed step is as slow as its slowest
rank. The figures the benchmarks print are medians over those rounds.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import sys
import time
from collections.abc import Callable

import torch

from msmoe_dist.parallel import comm as collective


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What the figures were measured on: CPU, cores, threads, versions, load, and the GPU of ``device``."""
    device = torch.device(device)
    info: dict[str, object] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        # Per-expert paths pay a scheduling delay per parallel op when other processes compete for
        # the cores, one-call GEMMs much less: a loaded machine distorts every ratio. Record it.
        info["load_avg_1min_before"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def header(name: str, shapes: dict, machine: dict) -> dict:
    """The keys every benchmark result starts with."""
    return {"benchmark": name, "machine": machine, "date": now_iso(), "shapes": shapes}


def max_over_ranks(values: list[float], group, device: torch.device | str) -> list[float]:
    """Element-wise maximum of ``values`` over the ranks of ``group`` (``values`` itself without one).
    The tensor lives on ``device`` because NCCL reduces only CUDA tensors."""
    if group is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    return collective.all_reduce(t, op="max", group=group, name="all_reduce (benchmark times, max over ranks)").tolist()


def timed_rounds(
    cases: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int,
    device: torch.device | str,
    group=None,
    *,
    reset: Callable[[], None] | None = None,
    own: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Milliseconds of each case in each of ``repeats`` rounds, after ``warmup`` untimed rounds.

    Interleaving spreads machine noise (other processes, frequency changes) evenly over the cases
    instead of penalising whichever ran during a slow period; rotating the order each round removes
    the bias of a fixed position within the round. The order depends only on the round number, so
    every rank runs the same case at the same time (the cases may hold collectives).

    ``reset`` runs, untimed, before every call (e.g. to clear gradients: a training step starts from
    none). With ``group``: a barrier before every call, and each time becomes the maximum over the
    group's ranks; ``own``, if given, receives this rank's times before that maximum. On CUDA every
    call is timed by events on the current stream and waited for; NCCL work is queued on its own
    streams, but the compute stream waits for it, so the end event comes after the communication.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(warmup + repeats):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            if reset is not None:
                reset()
            if cuda:
                torch.cuda.synchronize(device)  # start from an idle GPU, as the previous case left it
            if group is not None:
                collective.barrier(group, name="barrier (benchmark round)")
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                cases[name]()
                end.record()
                end.synchronize()  # a host wait: the elapsed time is known only once the GPU is done
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                cases[name]()
                ms = (time.perf_counter() - t0) * 1e3
            if rnd >= warmup:
                times[name].append(ms)
    if own is not None:
        own.update({n: list(v) for n, v in times.items()})
    if group is not None:
        # One reduction after the loop instead of one per round: the maximum is element-wise, so the
        # result is the same, and no collective runs between the timed calls.
        flat = max_over_ranks([ms for n in names for ms in times[n]], group, device)
        times = {n: flat[i * repeats : (i + 1) * repeats] for i, n in enumerate(names)}
    return times


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


@contextlib.contextmanager
def stdout_to_stderr():
    """Sends everything written to file descriptor 1 (print, logging handlers bound to sys.stdout,
    compiler subprocesses) to stderr for the duration, so that `--json` keeps stdout to one line.

    DeepSpeed logs to stdout and prints while it sets up its groups and builds its CPU comm op.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def silence_stdout_for_good() -> None:
    """Non-zero ranks print nothing: point fd 1 and sys.stdout at /dev/null for the process."""
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
