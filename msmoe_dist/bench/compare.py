"""msmoe-bench compare: train every momentum variant x seed (x sweep point) and compare them.

Each cell of the grid is its own `msmoe-train` run in a child process (a crash or a leak stays in its
run; the trainer's own resume and exit codes apply), run one after another under
``OUT/runs/<name>/``. After training, the cell's final checkpoint is scored in this process by
msmoe-eval's library function (clean and word-attacked perplexity) into ``eval.json``. The grid is
resumable: a cell with its ``eval.json`` is not repeated, a cell whose final checkpoint exists is only
evaluated, a cell with an earlier sealed checkpoint continues with ``train.resume=true``, any other
cell starts afresh. Each cell records what it was asked to run (``request.json``); a cell asked for
something else is refused before anything runs, never overwritten. A runner claims a cell before it
trains it (`claim`), so several runners started on one grid share its cells.

Then `compare_report` writes results.md/results.json (or sweep.md/sweep.json with --sweep) and PNGs.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from msmoe_dist.bench.compare_report import BASELINE
from msmoe_dist.errors import UserError

VARIANTS = ("none", "heavy_ball", "adam", "robust")
# Keys the runner sets itself for every cell; a user override of them would be ambiguous.
RUNNER_KEYS = ("momentum.kind", "train.seed", "train.run_dir", "train.resume", "train.overwrite", "train.auto_resume")
EVAL_FILE = "eval.json"
REQUEST_FILE = "request.json"


class CompareError(UserError):
    """A bad `msmoe-bench compare` command line or an output directory that holds other runs."""


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    variant: str
    seed: int
    point: tuple[tuple[str, str], ...] = ()  # the sweep's key=value pairs applied to this cell
    name: str = ""
    overrides: tuple[str, ...] = field(default=())  # everything given to msmoe-train after --config

    @property
    def label(self) -> str:
        """The grid row this cell belongs to: the variant and its sweep point (seeds pooled)."""
        return "/".join([self.variant] + [f"{k}={v}" for k, v in self.point])


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if not names or bad:
        raise CompareError(
            f"--variants {text!r}: unknown variant {', '.join(bad) or '(none given)'}; "
            f"expected a comma-separated subset of {','.join(VARIANTS)}"
        )
    if len(set(names)) != len(names):
        raise CompareError(f"--variants {text!r}: a variant is named twice")
    return names


def parse_sweep(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``section.key=v1,v2,...`` specs -> [(key, [values])]; each key once, at least one value each."""
    out: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, vals = spec.partition("=")
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not sep or "." not in key.strip() or not values or len(values) != len(vals.split(",")):
            raise CompareError(f"--sweep {spec!r}: expected section.key=v1,v2,... (e.g. momentum.mu=0.3,0.5,0.7,0.9)")
        key = key.strip()
        if key in RUNNER_KEYS:
            raise CompareError(f"--sweep {spec!r}: {key} is set by the runner for every run; sweep another key")
        if any(k == key for k, _ in out):
            raise CompareError(f"--sweep: {key} is given twice; give each key once with all its values")
        if len(set(values)) != len(values):
            raise CompareError(f"--sweep {spec!r}: a value is repeated")
        out.append((key, values))
    return out


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def build_grid(variants: list[str], seeds: int, sweep: list[tuple[str, list[str]]], overrides: list[str]) -> list[Cell]:
    """Every cell in the order they run: seed by seed (so that a grid stopped early holds whole seeds of
    every variant), then variant (baseline first), then sweep point. Momentum keys of a sweep do not apply
    to the baseline `none` (they do not change it), so it runs once per seed; other swept keys apply to
    every variant."""
    cells: list[Cell] = []
    for seed in range(seeds):
        for variant in variants:
            keys = [(k, vals) for k, vals in sweep if not (variant == BASELINE and k.startswith("momentum."))]
            points = list(itertools.product(*[[(k, v) for v in vals] for k, vals in keys])) if keys else [()]
            for point in points:
                name = "-".join([variant] + [f"{_short(k)}{v}" for k, v in point] + [f"s{seed}"])
                ov = tuple(overrides) + tuple(f"{k}={v}" for k, v in point) + (f"momentum.kind={variant}",)
                cells.append(Cell(variant, seed, tuple(point), name, ov + (f"train.seed={seed}",)))
    if len({c.name for c in cells}) != len(cells):  # short key names collided: spell the keys out
        cells = [
            Cell(c.variant, c.seed, c.point, "-".join([c.variant] + [f"{k}={v}" for k, v in c.point] + [f"s{c.seed}"]),
                 c.overrides)
            for c in cells
        ]  # fmt: skip
    return cells


def _request(config: Path, cell: Cell) -> dict:
    """What a cell runs: its overrides and the digest of its resolved configuration (so an edited comment
    in the YAML file does not disown finished runs, but a changed value does)."""
    from msmoe_dist.config.loader import config_to_dict, load_config

    resolved = json.dumps(config_to_dict(load_config(config, list(cell.overrides))), sort_keys=True)
    return {
        "config": str(config),
        "config_sha256": hashlib.sha256(resolved.encode()).hexdigest(),
        "overrides": list(cell.overrides),
    }


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_out_dir(out: Path, config: Path, cells: list[Cell]) -> None:
    """Refuses (before anything runs) when a cell's directory holds a run of another request."""
    for cell in cells:
        rec = out / "runs" / cell.name / REQUEST_FILE
        if rec.exists():
            have, want = _read_json(rec) or {}, _request(config, cell)
            if have != want:
                digest = str(have.get("config_sha256"))[:12]
                raise CompareError(
                    f"{rec.parent} holds a run of another request (config or overrides differ: recorded "
                    f"{have.get('overrides')} with resolved-config sha256 {digest}); "
                    "expected the same request: use another --out or move that directory away"
                )


def max_steps_of(config: Path, cell: Cell) -> int:
    from msmoe_dist.config.loader import load_config

    return load_config(config, list(cell.overrides)).train.max_steps


def cell_state(run_dir: Path, max_steps: int) -> str:
    """done (evaluated), trained (final checkpoint, not evaluated), partial (an earlier checkpoint), fresh."""
    from msmoe_dist.checkpoint.layout import step_dir_name
    from msmoe_dist.checkpoint.manager import is_complete, latest_checkpoint

    ev = _read_json(run_dir / EVAL_FILE)
    if ev is not None and ev.get("step") == max_steps:
        return "done"
    if is_complete(run_dir / "checkpoints" / step_dir_name(max_steps)):
        return "trained"
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        return "partial"
    return "fresh"


def train_cell(config: Path, cell: Cell, run_dir: Path, resume: bool, threads: int = 0) -> int:
    """One `msmoe-train` child process; its output goes to run_dir/train.log. Returns its exit code.

    ``threads`` > 0 sets the child's OMP_NUM_THREADS: on a CPU shared with other work, one thread per run
    avoids the stalls of OpenMP threads spinning for a descheduled peer (50x faster at load 24 on 2 cores)."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads > 0 else None
    cmd = [sys.executable, "-m", "msmoe_dist.cli", "train", "--config", str(config), *cell.overrides]
    cmd += [f"train.run_dir={run_dir}", "train.progress=false"]
    cmd.append("train.resume=true" if resume else "train.overwrite=true")
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "train.log").open("a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {' '.join(cmd)}\n")
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False, env=env).returncode


def evaluate_cell(run_dir: Path, splits: tuple[str, ...], batches: int, attack_rate: float) -> dict:
    """Clean and word-attacked perplexity of the cell's final checkpoint (msmoe-eval --attack), to eval.json."""
    from msmoe_dist.eval.checkpoint_eval import evaluate_checkpoint
    from msmoe_dist.eval.request import EvalRequest
    from msmoe_dist.io import atomic_write

    req = EvalRequest(checkpoint=str(run_dir), splits=splits, batches=batches, attack=True, attack_rate=attack_rate)
    result = evaluate_checkpoint(req)
    result["attack_rate"] = attack_rate
    result["eval_batches"] = batches
    atomic_write(run_dir / EVAL_FILE, json.dumps(result, indent=1) + "\n")
    return result


LOCK_FILE = ".compare.lock"


def claim(run_dir: Path) -> Path | None:
    """Takes the cell for this process (``run_dir/.compare.lock`` with host and pid, created exclusively), so
    that several runners started on one grid share its cells; None when a live process on this host holds
    it. A lock left by a process that is gone is taken over."""
    import os
    import platform

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _read_json(path) or {}
            if holder.get("host") == platform.node() and _alive(holder.get("pid")):
                return None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"host": platform.node(), "pid": os.getpid()}))
        return path
    return None


def _alive(pid) -> bool:
    import os

    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run_cell(config: Path, cell: Cell, run_dir: Path, state: str, args, splits, entry: dict, tag: str, log) -> None:
    """Trains (or resumes) and evaluates one claimed cell, recording what it did in ``entry``."""
    if state in ("fresh", "partial"):
        (run_dir / REQUEST_FILE).write_text(json.dumps(_request(config, cell), indent=1) + "\n")
        log(f"{tag} {cell.name}: {'resume' if state == 'partial' else 'train'}", flush=True)
        t0 = time.perf_counter()
        rc = train_cell(config, cell, run_dir, resume=state == "partial", threads=args.threads)
        entry["actions"].append("resume" if state == "partial" else "train")
        entry["train_s"] = round(time.perf_counter() - t0, 1)
        if rc != 0:
            log(f"{tag} {cell.name}: msmoe-train exit code {rc} (see {run_dir}/train.log)", flush=True)
            entry["error"] = f"msmoe-train exit code {rc}"
            return
        state = "trained"
    if state == "trained":
        log(f"{tag} {cell.name}: evaluate", flush=True)
        evaluate_cell(run_dir, splits, args.eval_batches, args.attack_rate)
        entry["actions"].append("eval")


def run_grid(args: argparse.Namespace, log=print) -> dict:
    """Runs (or resumes) every cell, then writes the report. Returns {"cells": [...], "report": ...}."""
    from msmoe_dist.config.loader import ConfigError

    config = Path(args.config)
    if not config.is_file():
        raise CompareError(f"--config {config}: no such file; expected a YAML config (e.g. configs/quickstart.yaml)")
    variants = parse_variants(args.variants)
    if args.seeds < 1:
        raise CompareError(f"--seeds {args.seeds}: expected at least 1 seed")
    # After --sweep, a KEY=V with one value is an ordinary override (a sweep over one value is one).
    given = list(args.sweep or [])
    sweep = parse_sweep([s for s in given if "," in s.partition("=")[2]])
    args.overrides = [s for s in given if "," not in s.partition("=")[2]] + list(args.overrides)
    bad = [o for o in args.overrides if o.partition("=")[0] in RUNNER_KEYS]
    if bad:
        raise CompareError(f"{', '.join(bad)}: set by the runner for every run ({', '.join(RUNNER_KEYS)}); drop it")
    splits = tuple(s.strip() for s in args.eval_splits.split(",") if s.strip())
    if not splits or any(s not in ("valid", "test") for s in splits):
        raise CompareError(f"--eval-splits {args.eval_splits!r}: expected a comma-separated subset of valid,test")
    if args.eval_batches < 0 or not 0.0 <= args.attack_rate <= 1.0 or args.threads < 0:
        raise CompareError("--eval-batches and --threads must be >= 0 and --attack-rate in [0, 1]")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)  # the evaluations run in this process
    cells = build_grid(variants, args.seeds, sweep, list(args.overrides))
    try:
        steps = {c.name: max_steps_of(config, c) for c in cells}  # also checks every cell's config
    except ConfigError as exc:
        raise CompareError(f"config of the grid: {' '.join(str(exc).split())}") from None
    out = Path(args.out or f"runs/compare/{config.stem}")
    check_out_dir(out, config, cells)

    done: list[dict] = []
    for i, cell in enumerate([] if args.report_only else cells, 1):
        run_dir = out / "runs" / cell.name
        state = cell_state(run_dir, steps[cell.name])
        entry: dict = {"name": cell.name, "state": state, "actions": []}
        if state == "done":
            log(f"[{i}/{len(cells)}] {cell.name}: done already", flush=True)
            done.append(entry)
            continue
        lock = claim(run_dir)
        if lock is None:
            log(f"[{i}/{len(cells)}] {cell.name}: busy in another runner, skipped", flush=True)
            entry["state"] = "busy"
            done.append(entry)
            continue
        try:
            _run_cell(
                config,
                cell,
                run_dir,
                cell_state(run_dir, steps[cell.name]),
                args,
                splits,
                entry,
                f"[{i}/{len(cells)}]",
                log,
            )
        finally:
            lock.unlink(missing_ok=True)
        done.append(entry)
    from msmoe_dist.bench.compare_report import write_report

    report = write_report(out, cells, steps, sweep, command_line(args, out), plots=not args.no_plots, log=log)
    return {"out": str(out), "cells": done, "report": report}


def command_line(args: argparse.Namespace, out: Path) -> str:
    """The command that reproduces this grid (the values it ran with, defaults spelled out)."""
    parts = ["msmoe-bench compare", f"--config {args.config}", f"--variants {args.variants}", f"--seeds {args.seeds}"]
    parts += [f"--out {out}", f"--eval-splits {args.eval_splits}", f"--eval-batches {args.eval_batches}"]
    parts += [f"--attack-rate {args.attack_rate}"] + ([f"--threads {args.threads}"] if args.threads else [])
    sweep = [s for s in (args.sweep or []) if "," in s.partition("=")[2]]
    if sweep:
        parts += ["--sweep", *sweep]
    return " ".join(parts + list(args.overrides))


def add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="YAML config of every run (a language model)")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated momentum.kind values to compare (default {','.join(VARIANTS)}; baseline: none)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant (train.seed; default 3)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/compare/<config name>)")
    p.add_argument(
        "--sweep",
        nargs="+",
        metavar="KEY=V1,V2",
        help="grid over config values, e.g. momentum.mu=0.3,0.5 momentum.gamma=0.5,1.0 (every combination; "
        "momentum.* keys do not apply to the baseline none; a KEY=V with one value is an ordinary override); "
        "writes sweep.md/sweep.json instead of results.*",
    )
    p.add_argument(
        "--eval-splits", default="valid,test", help="splits scored clean and attacked after training (valid,test)"
    )
    p.add_argument("--eval-batches", type=int, default=0, help="batches per split in that scoring (0 = all)")
    p.add_argument(
        "--attack-rate", type=float, default=0.025, help="word-swap attack rate (default 0.025, the paper's 2.5%%)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads of each run and evaluation (OMP_NUM_THREADS); 0 = the library default. "
        "On a shared CPU, 1 avoids OpenMP threads spinning for a descheduled peer",
    )
    p.add_argument("--no-plots", action="store_true", help="write no PNGs (they need matplotlib)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write the report from the runs already finished (the others are listed as missing)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every run")


def compare_main(args: argparse.Namespace) -> int:
    try:
        result = run_grid(args)
    except UserError as exc:
        print(f"msmoe-bench compare: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    failed = [c["name"] for c in result["cells"] if "error" in c]
    print(f"results: {result['report']['markdown']}")
    if failed:
        print(f"msmoe-bench compare: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
