"""Command-line entry points: msmoe-train, msmoe-eval, msmoe-prepare, msmoe-bench.

User mistakes (bad config, missing data, unusable checkpoint) end with one line on stderr
and exit code 2, never a traceback. A run stopped by a NaN/Inf loss exits with code 3, a failed
collective with 4, and a run preempted by SIGTERM/SIGUSR1 (after writing a sealed checkpoint) with 5.
Also runnable as `python -m msmoe_dist.cli {train,eval,prepare,bench} ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from msmoe_dist.logs import setup_logging

EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_COLLECTIVE = 4
EXIT_PREEMPTED = 5


def _fail(prog: str, exc: BaseException, code: int = EXIT_USAGE) -> int:
    msg = " ".join(str(exc).split())  # guarantee one line
    if " error: " not in f" {msg}"[:40]:
        msg = f"error: {msg}"
    print(f"{prog}: {msg}", file=sys.stderr)
    return code


def _valid_options(parser: argparse.ArgumentParser) -> str:
    """The parser's options and subcommands, in one line: what a mistyped flag should have been."""
    names: list[str] = []
    for action in parser._actions:
        if action.option_strings:
            names.append(max(action.option_strings, key=len))
        elif isinstance(action, argparse._SubParsersAction):
            names.extend(action.choices)
        elif action.dest != argparse.SUPPRESS:
            names.append(action.metavar if isinstance(action.metavar, str) else action.dest.upper())
    return ", ".join(names)


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` (and its subcommands) report a bad command line as one line naming the valid options."""

    def error(message: str, parser: argparse.ArgumentParser = parser):
        msg = " ".join(message.split())
        print(f"{parser.prog}: error: {msg}; valid: {_valid_options(parser)} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    parser.error = error  # type: ignore[method-assign]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                one_line_errors(sub)
    return parser


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drops the `--local_rank=N` the deepspeed launcher appends (LOCAL_RANK is in the environment too)."""
    import os

    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        for flag in ("--local_rank", "--local-rank"):
            if arg == flag and i + 1 < len(argv):
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
                skip = True
                break
            if arg.startswith(flag + "="):
                os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
                break
        else:
            out.append(arg)
    return out


def _user_errors() -> tuple[type[BaseException], ...]:
    """Every error a user can fix (ConfigError, DataError, CheckpointError, ...): one line, exit code 2."""
    from msmoe_dist.errors import UserError

    return (UserError,)


class _OverridesOnce(argparse.Action):
    """The key=value overrides; a key typed twice is refused rather than the last one silently winning."""

    def __call__(self, parser, namespace, values, option_string=None):
        from msmoe_dist.config.loader import ConfigError, refuse_repeated_overrides

        try:
            refuse_repeated_overrides(values)
        except ConfigError as exc:
            sys.exit(_fail(parser.prog, exc))
        setattr(namespace, self.dest, values)


def build_train_parser() -> argparse.ArgumentParser:
    from msmoe_dist.config.loader import config_help_text

    parser = argparse.ArgumentParser(
        prog="msmoe-train",
        description="Train a (momentum) sparse mixture-of-experts language model. Values come from the "
        "defaults, then the YAML file, then key=value overrides (highest precedence). Exit codes: 0 done; "
        "2 bad input (one line on stderr); 3 non-finite loss, gradient norm or weights (the last good "
        "checkpoint is kept); 4 a collective failed or timed out; 5 preempted by SIGTERM/SIGUSR1 after "
        "writing a checkpoint (continue with train.resume=true).",
        epilog=config_help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file with values for the configuration tree")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        action=_OverridesOnce,
        help="dot-overrides, e.g. model.num_layers=4 (each key once)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    return one_line_errors(parser)


def train_main(argv: list[str] | None = None) -> int:
    setup_logging()
    import os

    args = build_train_parser().parse_args(strip_launcher_args(sys.argv[1:] if argv is None else argv))
    from msmoe_dist.config.loader import ConfigError, config_to_yaml, load_config

    def elastic_record(exc: BaseException, code: int | None = None) -> None:
        """Under torchrun, writes the error file torch.distributed.elastic reads, so that its failure
        summary shows this rank's one-line message and exit code (torchrun itself exits 1 whatever the
        worker's code); code=None (a bug): the exception with its traceback."""
        path = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if not path:
            return
        if code is None:
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler

            get_error_handler().record_exception(exc)
            return
        import time

        line = f"msmoe-train: {' '.join(str(exc).split())} (exit code {code})"
        info = {"py_callstack": line, "timestamp": str(int(time.time()))}
        Path(path).write_text(json.dumps({"message": {"message": line, "extraInfo": info}}))

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        elastic_record(exc, EXIT_USAGE)
        sys.exit(_fail("msmoe-train", exc))
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    from msmoe_dist.parallel.collectives import CollectiveError
    from msmoe_dist.train.errors import NonFiniteLoss
    from msmoe_dist.train.loop import Preempted
    from msmoe_dist.train.trainer import run

    try:
        summary = run(cfg)
    except Preempted as exc:
        elastic_record(exc, EXIT_PREEMPTED)
        print(f"msmoe-train: {exc}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except _user_errors() as exc:
        elastic_record(exc, EXIT_USAGE)
        sys.exit(_fail("msmoe-train", exc))
    except NonFiniteLoss as exc:
        elastic_record(exc, EXIT_NONFINITE)
        sys.exit(_fail("msmoe-train", exc, EXIT_NONFINITE))
    except CollectiveError as exc:
        elastic_record(exc, EXIT_COLLECTIVE)
        sys.exit(_fail("msmoe-train", exc, EXIT_COLLECTIVE))
    except Exception as exc:  # a bug: the traceback as usual, and its message in torchrun's summary
        elastic_record(exc)
        raise
    if summary.get("rank", 0) != 0:
        return 0
    score = f"valid top-1 {summary['val_top1']:.2%}" if "val_top1" in summary else f"valid ppl {summary['val_ppl']:.2f}"
    tb, wb = summary.get("tensorboard"), summary.get("wandb")
    print(
        f"done: train loss {summary.get('train_loss', float('nan')):.4f}, {score}\n"
        f"  run directory: {summary['run_dir']}\n  metrics:       {summary['metrics']}  (plot: msmoe-plot "
        f"{summary['run_dir']})\n"
        + (f"  tensorboard:   {tb}  (view: tensorboard --logdir {tb})\n" if tb else "")
        + (f"  wandb:         {wb}  (offline runs: wandb sync {wb}/offline-run-*)\n" if wb else "")
        + f"  checkpoint:    {summary['checkpoint']}  (evaluate: msmoe-eval --checkpoint {summary['run_dir']})"
    )
    return 0


def build_eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msmoe-eval",
        description="Evaluate a checkpoint (any engine, any expert-parallel degree) in one process. Language "
        "models: perplexity over the full validation and test token streams (and, with --attack, under the word "
        "attack); `ppl` is the validation perplexity. V-MoE: top-1/top-5 on the run's validation folder (or "
        "--imagenet-val), on ImageNet-A/-R with the 200-class masks, and on ImageNet-C with mCE normalised by "
        "AlexNet's published errors. Prints one JSON line on stdout and a table on stderr.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="run directory, its checkpoints/ directory, or one step_* checkpoint directory",
    )
    parser.add_argument("--splits", default="valid,test", help="comma-separated splits to score (default valid,test)")
    parser.add_argument(
        "--data-path",
        metavar="DIR|FILE",
        help="language models: read the splits from corpus directory DIR instead of the checkpoint's data.path "
        "(text files with the same training split, a copy of a generated corpus included, or a prepared "
        "directory for a model trained on prepared data); or score one text FILE with the training corpus's "
        "vocabulary (result keys file_ppl/file_loss/file_tokens; --splits does not apply). V-MoE: the image "
        "folder with train/ and val/",
    )
    parser.add_argument(
        "--batches", type=int, default=0, help="score at most N batches per split (0 = the whole stream)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=0, help="sequences per batch (0 = the checkpoint's data.batch_size)"
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device to evaluate on")
    parser.add_argument(
        "--attack",
        action="store_true",
        help="also score an attacked copy of each split (the paper's robustness test): in every line "
        "each non-stopword word is replaced by AAA with probability --attack-rate, seeded per "
        "(--attack-seed, line index). Adds valid_attacked_ppl/test_attacked_ppl to the JSON and "
        "prints a clean/attacked table on stderr. AAA is out of the word vocabulary, so it reads "
        "as <unk>",
    )
    parser.add_argument(
        "--attack-rate",
        type=float,
        default=0.025,
        metavar="P",
        help="probability that a non-stopword word is replaced (default 0.025)",
    )
    parser.add_argument("--attack-seed", type=int, default=0, metavar="N", help="seed of the attack (default 0)")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON result to FILE")
    vis = parser.add_argument_group("V-MoE checkpoints (model.kind=vit)")
    vis.add_argument(
        "--imagenet-val", metavar="DIR", help="ImageNet-1K val folder <wnid>/*.JPEG (default: the run's data.path/val)"
    )
    vis.add_argument("--imagenet-a", metavar="DIR", help="ImageNet-A folder <wnid>/*.jpg (200 classes)")
    vis.add_argument("--imagenet-r", metavar="DIR", help="ImageNet-R folder <wnid>/*.jpg (200 classes)")
    vis.add_argument(
        "--imagenet-c",
        metavar="DIR",
        help="ImageNet-C root <corruption>/<severity 1-5>/<wnid>/*.JPEG: per-corruption error and mCE",
    )
    vis.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images (default 2)")
    parser.add_argument(
        "--text-path",
        metavar="DIR",
        help="--attack on a prepared corpus: read valid/test text from DIR instead of the directory "
        "recorded in its meta.json",
    )
    return parser


def eval_request(args: argparse.Namespace):
    from msmoe_dist.eval.request import EvalRequest

    return EvalRequest(
        checkpoint=args.checkpoint,
        splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
        data_path=args.data_path,
        batches=args.batches,
        batch_size=args.batch_size,
        device=args.device,
        attack=args.attack,
        attack_rate=args.attack_rate,
        attack_seed=args.attack_seed,
        text_path=args.text_path,
        imagenet_val=args.imagenet_val,
        imagenet_a=args.imagenet_a,
        imagenet_r=args.imagenet_r,
        imagenet_c=args.imagenet_c,
        workers=args.workers,
    )


def eval_main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = one_line_errors(build_eval_parser()).parse_args(argv)
    from msmoe_dist.eval.checkpoint_eval import evaluate_checkpoint
    from msmoe_dist.io import atomic_write

    try:
        result = evaluate_checkpoint(eval_request(args))
        if args.json:
            atomic_write(Path(args.json), json.dumps(result, indent=1) + "\n")
    except _user_errors() as exc:
        sys.exit(_fail("msmoe-eval", exc))
    except OSError as exc:
        sys.exit(_fail("msmoe-eval", ValueError(f"cannot write --json {args.json}: {exc.strerror or exc}")))
    if args.attack:
        from msmoe_dist.eval.attack_eval import attack_table

        print(attack_table(result), file=sys.stderr)
    if "val" in result or "imagenet_c" in result or "imagenet_a" in result or "imagenet_r" in result:
        from msmoe_dist.eval.vision_eval import vision_table

        print(vision_table(result), file=sys.stderr)
    print(json.dumps(result))
    return 0


def build_prepare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msmoe-prepare",
        description="Tokenize a text corpus once into memory-mapped token-id files that training reads with "
        "data.kind=prepared data.path=OUTPUT. Writes OUTPUT/<split>.bin (uint16 ids when the vocabulary has at "
        "most 65,536 entries, else uint32), OUTPUT/vocab.json, OUTPUT/meta.json (header: format, dtype, "
        "vocabulary sha256, token/line/<unk> counts) and, for sentencepiece, OUTPUT/tokenizer.model. The "
        "vocabulary is built from the train split only. Streams the text: memory stays bounded.",
    )
    parser.add_argument(
        "input",
        metavar="INPUT",
        help="corpus directory: train.txt/valid.txt/test.txt or wiki.{train,valid,test}.tokens",
    )
    parser.add_argument("output", metavar="OUTPUT", help="directory to write (created if missing)")
    parser.add_argument(
        "--splits",
        default="train,valid,test",
        help="comma-separated splits to write (default train,valid,test); train builds the "
        "vocabulary whether written or not",
    )
    parser.add_argument(
        "--tokenizer",
        default="word",
        choices=("word", "sentencepiece"),
        help="word: whitespace words + <eos> per line (the reference); sentencepiece: train a "
        "model on the train split (default word). Training must use the same data.tokenizer",
    )
    parser.add_argument(
        "--sp-vocab-size",
        type=int,
        default=32000,
        metavar="N",
        help="sentencepiece vocabulary size (default 32000; data.sp_vocab_size)",
    )
    parser.add_argument(
        "--sp-model-type",
        default="unigram",
        choices=("unigram", "bpe", "char", "word"),
        help="sentencepiece model type (default unigram; data.sp_model_type)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a prepared corpus already in OUTPUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def prepare_main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = one_line_errors(build_prepare_parser()).parse_args(argv)
    from msmoe_dist.data import DataError, prepare_corpus

    if args.sp_vocab_size < 3:
        sys.exit(_fail("msmoe-prepare", DataError(f"--sp-vocab-size must be >= 3, got {args.sp_vocab_size}")))
    try:
        meta = prepare_corpus(
            args.input,
            args.output,
            [s.strip() for s in args.splits.split(",") if s.strip()],
            args.tokenizer,
            args.sp_vocab_size,
            args.sp_model_type,
            args.overwrite,
            progress=not args.no_progress,
        )
    except DataError as exc:
        sys.exit(_fail("msmoe-prepare", exc))
    except OSError as exc:  # a full disk or an unwritable output directory is the user's to fix
        sys.exit(_fail("msmoe-prepare", DataError(f"cannot write {args.output}: {exc.strerror or exc}")))
    counts = ", ".join(f"{s} {e['tokens']:,}" for s, e in meta["splits"].items())
    print(
        f"prepared {args.output}: {counts} tokens ({meta['dtype']}, vocabulary {meta['vocab_size']:,}) "
        f"in {meta['seconds']:.1f} s\n  train with: data.kind=prepared data.path={args.output}"
        + (
            f" data.tokenizer=sentencepiece data.sp_vocab_size={args.sp_vocab_size} "
            f"data.sp_model_type={args.sp_model_type}"
            if args.tokenizer == "sentencepiece"
            else ""
        )
    )
    return 0


def bench_main(argv: list[str] | None = None) -> int:
    setup_logging()
    from msmoe_dist.bench.cli import bench_main as _bench
    from msmoe_dist.bench.cli import build_parser

    one_line_errors(build_parser()).parse_args(argv)  # a bad command line: one line, before any work
    try:
        return _bench(argv)
    except _user_errors() as exc:  # e.g. a bad config given to `memory --ep-size`: one line, exit 2
        return _fail("msmoe-bench", exc)


def build_plot_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msmoe-plot",
        description="PNGs of training runs' metrics.jsonl: the training loss and every validation metric with "
        "one curve per run (give several run directories to compare them), and per run a heatmap of each "
        "MoE layer's expert load over steps.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="msmoe-train run directories")
    parser.add_argument(
        "--out", metavar="DIR", help="where to write the PNGs (default RUN_DIR/plots for one run, ./plots for several)"
    )
    return parser


def plot_main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = one_line_errors(build_plot_parser()).parse_args(argv)
    from msmoe_dist.plots import PlotError, plot_runs

    runs = [Path(d) for d in args.run_dirs]
    out = Path(args.out) if args.out else (runs[0] / "plots" if len(runs) == 1 else Path("plots"))
    try:
        written = plot_runs(runs, out)
    except PlotError as exc:
        sys.exit(_fail("msmoe-plot", exc))
    except OSError as exc:
        sys.exit(_fail("msmoe-plot", PlotError(f"cannot write {out}: {exc.strerror or exc}")))
    for path in written:
        print(path)
    return 0


def main() -> None:
    commands = {"train": train_main, "eval": eval_main, "prepare": prepare_main, "bench": bench_main, "plot": plot_main}
    argv = strip_launcher_args(sys.argv[1:])
    if not argv or argv[0] not in commands:
        print("usage: python -m msmoe_dist.cli {train,eval,prepare,bench,plot} [args...]", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(commands[argv[0]](argv[1:]))


if __name__ == "__main__":
    main()
