"""msmoe-ckpt: look at, check and convert checkpoints without training.

    msmoe-ckpt inspect RUN_OR_STEP_DIR [--config FILE] [--world-size N] [key=value ...]
        the step, layout, files and sizes; with a config (a file, or the checkpoint's own config.yaml,
        plus overrides): which settings differ from the checkpoint's, and whether a resume with them
        at --world-size ranks (default: the checkpoint's) would be refused
    msmoe-ckpt verify RUN_OR_STEP_DIR
        every file against the size and BLAKE2b digest recorded at save (what a resume checks)
    msmoe-ckpt convert RUN_OR_STEP_DIR --to-full OUT.pt
        one file, readable with plain torch.load (no DeepSpeed, no msmoe_dist): every weight and buffer in
        full (all experts), the optimiser state by parameter name, the LR schedule and the step
        (checkpoint/full_state.py describes the format; RNG streams are left out)

A run directory means its newest sealed checkpoint. Errors: one line, exit code 2; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    from msmoe_dist.cli import one_line_errors

    parser = argparse.ArgumentParser(
        prog="msmoe-ckpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="step, layout, files, sizes; config differences with --config/overrides")
    p.add_argument("path", help="a run directory or one step_* checkpoint")
    p.add_argument("--config", default=None, help="a YAML config to compare with the checkpoint's")
    p.add_argument("--world-size", type=int, default=None, help="the launch's world size (default: as saved)")
    p.epilog = "Further arguments: key=value overrides on top of --config (or the checkpoint's config.yaml)."
    p = sub.add_parser("verify", help="check every file against the digests recorded at save")
    p.add_argument("path", help="a run directory or one step_* checkpoint")
    p = sub.add_parser("convert", help="write one layout-free file (full weights, optimiser state by name)")
    p.add_argument("path", help="a run directory or one step_* checkpoint")
    p.add_argument("--to-full", required=True, metavar="OUT.pt", help="the file to write")
    return one_line_errors(parser)


def _verified(step_dir: Path):
    from msmoe_dist.checkpoint import CheckpointError, read_meta, verify_files

    meta = read_meta(step_dir)
    if not verify_files(step_dir, meta):
        raise CheckpointError(f"{step_dir} records no checksums (saved before they were kept): cannot verify it")
    return meta


def _flat(tree: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def inspect(args: argparse.Namespace) -> list[str]:
    from msmoe_dist.checkpoint import read_meta, resolve_checkpoint
    from msmoe_dist.checkpoint.layout import PORTABLE_DENSE

    step_dir = resolve_checkpoint(args.path)
    meta = read_meta(step_dir)
    lay = meta.layout
    files = sorted(p for p in step_dir.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    portable = lay.get("engine") == "native" or (step_dir / PORTABLE_DENSE).is_file()
    lines = [
        f"checkpoint: {step_dir}",
        f"step: {meta.step}",
        "layout: " + ", ".join(f"{k}={lay.get(k)}" for k in lay),
        f"resumable at another layout: {'yes' if portable else 'no (no state by parameter name)'}",
        f"checksums: {len(meta.files)} files recorded" if meta.files else "checksums: none recorded",
        f"files: {len(files)}, {total / 2**20:.2f} MiB",
        *(f"  {p.relative_to(step_dir).as_posix()}  {p.stat().st_size:,} bytes" for p in files),
    ]
    if args.config is not None or args.overrides or args.world_size is not None:
        lines += _config_diff(meta, step_dir, args.config, args.overrides, args.world_size)
    return lines


def _config_diff(meta, step_dir: Path, config: str | None, overrides: list[str], world: int | None) -> list[str]:
    from msmoe_dist.checkpoint import CheckpointError, resume_changes
    from msmoe_dist.checkpoint.layout import CONFIG
    from msmoe_dist.config import load_config
    from msmoe_dist.config.fields import arch_keys
    from msmoe_dist.config.loader import config_to_dict
    from msmoe_dist.config.model_spec import ModelSpec

    cfg = load_config(config if config is not None else str(step_dir / CONFIG), overrides)
    now, saved = _flat(config_to_dict(cfg)), _flat(meta.config)
    diff = [f"  {k}: {saved[k]!r} -> {now[k]!r}" for k in sorted(now) if k in saved and saved[k] != now[k]]
    verdict = "a resume with this config is allowed"
    try:
        world = world or meta.layout.get("world_size") or 1
        batch = {"batch_size": cfg.data.batch_size, "grad_accum_steps": cfg.train.grad_accum_steps, "world_size": world}
        layout = {**meta.layout, "world_size": world, "ep_size": cfg.parallel.ep_size}
        meta.check_resume(step_dir, layout, ModelSpec.of(cfg), batch, cfg.train.allow_batch_change)
        resume_changes(step_dir, meta.config, config_to_dict(cfg), arch_keys("vision"))
    except CheckpointError as exc:
        verdict = f"a resume with this config is refused: {exc}"
    return [f"config differences ({len(diff)}):", *diff, verdict]


def convert(args: argparse.Namespace) -> list[str]:
    import torch

    from msmoe_dist.checkpoint import CheckpointError, resolve_checkpoint
    from msmoe_dist.checkpoint.full_state import assemble_full_state

    step_dir = resolve_checkpoint(args.path)
    out = Path(args.to_full)
    if not out.parent.is_dir():
        raise CheckpointError(f"--to-full {out}: the directory {out.parent} does not exist")
    meta = _verified(step_dir)
    full = assemble_full_state(step_dir, meta)
    full.pop("rng")  # numpy/python objects: the file stays loadable with torch.load(weights_only=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(full, tmp)
    os.replace(tmp, out)
    n = sum(t.numel() for t in full["model"].values() if torch.is_tensor(t))
    return [
        f"wrote {out}: step {meta.step}, {len(full['model'])} tensors ({n:,} numbers), "
        f"optimiser state of {len(full['optimizer'])} parameters"
    ]


def verify(args: argparse.Namespace) -> list[str]:
    from msmoe_dist.checkpoint import resolve_checkpoint

    step_dir = resolve_checkpoint(args.path)
    meta = _verified(step_dir)
    return [f"ok: {step_dir} (step {meta.step}): {len(meta.files)} files match their recorded digests"]


def main(argv: list[str] | None = None) -> int:
    from msmoe_dist.cli import _fail
    from msmoe_dist.errors import UserError

    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra and (args.command != "inspect" or any("=" not in a or a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        lines = {"inspect": inspect, "verify": verify, "convert": convert}[args.command](args)
    except UserError as exc:
        return _fail("msmoe-ckpt", exc)
    except OSError as exc:
        return _fail("msmoe-ckpt", ValueError(f"{exc.strerror or exc}: {exc.filename or ''}"))
    print("\n".join(lines))
    return 0


def console() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console()
