"""msmoe-bench prepare: time msmoe-prepare on a synthetic corpus the size of WikiText-103.

The generator writes train/valid/test in WikiText's layout (`` = Title = `` headings framed
by blank lines, paragraphs of ~110 space-separated tokens, one ``<eos>`` per line after
tokenisation) with a Zipf-distributed vocabulary of WikiText-103's size (267,735 types, so
ids need uint32 like the real corpus).  The text is not meant to be learnable, only to cost
what WikiText-103 costs: the same token count, vocabulary size and roughly the same bytes.

Everything is vectorised per chunk of lines: word ids come from one inverse-CDF draw,
newline tokens are inserted with ``np.insert``, and the bytes are gathered from a table of
all word spellings with one fancy index, so 103M tokens take seconds, not a Python loop per
token.  prepare then runs as a child process (the real ``msmoe-prepare`` command line), so
its peak RSS is that child's own high-water mark (VmHWM; see ``_run_measured`` for why not
getrusage), without the generator's arrays; ``imports_rss_mib`` is a child that only imports
the same modules (mostly torch), the floor under that peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from msmoe_dist.bench.common import machine_info, now_iso

WIKITEXT103_TRAIN_TOKENS = 103_227_021  # incl. one <eos> per line (Merity et al. 2016, reference tokenisation)
WIKITEXT103_VOCAB = 267_735  # incl. <eos>
_COMMON = [
    "the",
    ",",
    ".",
    "of",
    "and",
    "in",
    "to",
    "a",
    "=",
    "<unk>",
    "was",
    "@-@",
    "'s",
    "on",
    "as",
    "that",
    "for",
    "with",
    "by",
    "is",
    "his",
    "(",
    ")",
    "at",
    "from",
    "he",
    "it",
    "an",
    "were",
    '"',
    "had",
    "which",
]
_LINE_KINDS = np.array([0.35, 0.15, 0.50])  # blank, heading, paragraph (WikiText-103's mix, roughly)


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tokens",
        type=int,
        default=WIKITEXT103_TRAIN_TOKENS,
        help="train tokens to synthesise, <eos> included (default: WikiText-103's 103,227,021)",
    )
    p.add_argument("--vocab", type=int, default=WIKITEXT103_VOCAB - 1, help="word types in the text (default 267,734)")
    p.add_argument("--eval-tokens", type=int, default=230_000, help="tokens of each of valid and test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp-dir", default=None, help="where to make the temporary directory (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the generated corpus and its prepared copy")
    p.add_argument("--tokenizer", default="word", choices=("word", "sentencepiece"), help="passed to msmoe-prepare")
    p.add_argument("--json", action="store_true", help="accepted for symmetry; the result is always JSON")


def _serial(rank: int) -> str:
    """Bijective base 26 in lower case (a, ..., z, aa, ab, ...): unique, and short for small ranks."""
    out = ""
    rank += 1
    while rank:
        rank, digit = divmod(rank - 1, 26)
        out = chr(97 + digit) + out
    return out


def _spellings(vocab: int, rng: np.random.Generator) -> list[bytes]:
    """Unique spellings, frequent ones short: a few real words, then capitals + a lower-case serial.

    The capital-letter prefix (0-2 letters, longer for rarer words) cannot run into the serial,
    so spellings stay unique; the mix averages ~5.2 bytes per token with the separator, as
    WikiText-103 does (540 MB for 103M tokens).
    """
    words = [w.encode() for w in _COMMON[:vocab]]
    n = vocab - len(words)
    prefix_len = np.minimum(np.log2(np.arange(len(words), vocab) + 2).astype(int) // 5, 2)
    capitals = rng.integers(65, 91, size=(n, 2))
    for i in range(n):  # per vocabulary entry, not per token: ~0.5 s for 267k words
        words.append(bytes(capitals[i, : prefix_len[i]].tolist()) + _serial(i).encode())
    return words


class _TextMaker:
    def __init__(self, vocab: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        words = _spellings(vocab, self.rng) + [b"\n"]
        self.newline = len(words) - 1
        self.eq = words.index(b"=")
        pieces = [w + b" " for w in words]  # every token is followed by a space; "\n " starts the next line
        self.table = np.frombuffer(b"".join(pieces), dtype=np.uint8)
        self.length = np.array([len(p) for p in pieces], dtype=np.int64)
        self.offset = np.cumsum(self.length) - self.length
        weights = 1.0 / (np.arange(vocab) + 2.7)  # Zipf, exponent 1
        self.cdf = np.cumsum(weights) / weights.sum()

    def chunk(self, num_lines: int) -> tuple[bytes, int]:
        """``num_lines`` lines of text and their token count (words + one <eos> per line)."""
        rng = self.rng
        kind = rng.choice(3, size=num_lines, p=_LINE_KINDS)
        words = np.where(
            kind == 2,
            np.clip(rng.lognormal(np.log(90), 0.6, num_lines), 3, 600).astype(np.int64),
            np.where(kind == 1, rng.integers(3, 9, num_lines), 0),
        )
        ids = np.searchsorted(self.cdf, rng.random(int(words.sum())))
        ends = np.cumsum(words)
        heading = kind == 1
        ids[(ends - words)[heading]] = self.eq  # " = Title words = "
        ids[ends[heading] - 1] = self.eq
        tokens = np.insert(ids, ends, self.newline)
        lens = self.length[tokens]
        starts = np.cumsum(lens) - lens
        gather = np.arange(int(lens.sum())) - np.repeat(starts - self.offset[tokens], lens)
        return self.table[gather].tobytes(), len(tokens)


def write_split(path: Path, maker: _TextMaker, target_tokens: int, lines_per_chunk: int = 20_000) -> int:
    """Lines until ``target_tokens`` tokens are written (overshooting by less than one line)."""
    written = 0
    with open(path, "wb") as f:
        f.write(b" ")  # WikiText lines start with a space; every later line gets it from the "\n " token
        while written < target_tokens:
            # ~56 tokens per line on average; ask for a bit less than what is left, then top up.
            text, n = maker.chunk(max(1, min(lines_per_chunk, (target_tokens - written) // 60)))
            f.write(text)
            written += n
    return written


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), None)
    except OSError:  # exited between poll() and open(), or no /proc
        return None


def _run_measured(cmd: list[str]) -> tuple[int, float, float, int | None]:
    """(exit code, wall seconds, CPU seconds, peak RSS in KiB) of one child.

    Peak RSS is not rusage's ru_maxrss: Linux carries that across fork and exec, so every child
    of this benchmark (which has imported torch) would report at least this process's own RSS.
    VmHWM in /proc/<pid>/status is the high-water mark of the child's own address space; it only
    grows, so polling it every 0.1 s misses at most the last 0.1 s of the run.  CPU time (user +
    system, from os.wait4's rusage) is the figure that a busy shared machine disturbs least.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        hwm = _vm_hwm_kib(proc.pid)
        if hwm is not None:
            peak = max(peak or 0, hwm)
        time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait for it again
    return proc.returncode, time.perf_counter() - t0, usage.ru_utime + usage.ru_stime, peak


def run_prepare_bench(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="msmoe-bench-prepare-", dir=args.tmp_dir))
    try:
        src, out = tmp / "text", tmp / "prepared"
        src.mkdir()
        t0 = time.perf_counter()
        maker = _TextMaker(args.vocab, args.seed)
        sizes = {"train": write_split(src / "wiki.train.tokens", maker, args.tokens)}
        for split in ("valid", "test"):
            sizes[split] = write_split(src / f"wiki.{split}.tokens", maker, args.eval_tokens)
        gen_s = time.perf_counter() - t0
        text_bytes = sum(p.stat().st_size for p in src.iterdir())

        cmd = [sys.executable, "-m", "msmoe_dist.cli", "prepare", str(src), str(out), "--tokenizer", args.tokenizer]
        code, prep_s, prep_cpu_s, peak_kib = _run_measured(cmd)  # the progress bar passes through on stderr
        if code != 0:
            raise SystemExit(f"msmoe-bench: msmoe-prepare failed with exit code {code}")
        # What the interpreter and the same imports alone occupy (torch is most of it): the floor under the peak.
        _, _, _, baseline_kib = _run_measured([sys.executable, "-c", "import msmoe_dist.cli, msmoe_dist.data, tqdm"])
        meta = json.loads((out / "meta.json").read_text())
        total = sum(e["tokens"] for e in meta["splits"].values())
        return {
            "benchmark": "prepare",
            "date": now_iso(),
            "machine": machine_info(),
            "load_avg_1min": os.getloadavg()[0],
            "command": " ".join(cmd[2:]).replace("msmoe_dist.cli prepare", "msmoe-prepare"),
            "tokenizer": args.tokenizer,
            "text_bytes": text_bytes,
            "tokens": {s: e["tokens"] for s, e in meta["splits"].items()},
            "vocab_size": meta["vocab_size"],
            "dtype": meta["dtype"],
            "generate_seconds": round(gen_s, 2),
            "seconds": round(prep_s, 2),
            "cpu_seconds": round(prep_cpu_s, 2),
            "prepare_internal_seconds": meta["seconds"],
            "tokens_per_s": round(total / prep_s),
            "peak_rss_mib": _mib(peak_kib),
            "imports_rss_mib": _mib(baseline_kib),
        }
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
