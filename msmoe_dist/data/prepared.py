"""Prepared corpora: token ids written once, read as memory maps by every run and every rank.

``msmoe-prepare`` turns a text corpus directory (train.txt/... or wiki.*.tokens) into::

    <out>/meta.json        the header: magic, version, dtype, tokenizer settings, vocabulary
                           size and sha256, per split its .bin name, token, line and <unk> counts,
                           and where the text came from (the attack re-reads valid/test text)
    <out>/vocab.json       the token list in id order (Vocab.save); for sentencepiece the pieces
    <out>/tokenizer.model  sentencepiece only: the serialized model
    <out>/<split>.bin      the split's ids, raw little-endian uint16 (vocabulary <= 65,536) or
                           uint32, no header, so ``np.memmap`` maps it directly

Preparing streams each file in blocks of whole lines and writes ids in chunks, so memory is
bounded by the block size plus the vocabulary.  With the word tokenizer the train split is
read once: the pass that counts its words also writes them as provisional ids (rank of first
occurrence) to a temporary file, which a vectorised remap then turns into the final
frequency-ordered ids.  Every file is written under a temporary name and renamed; meta.json
goes last, so a directory with a meta.json is complete.

Loading maps each .bin without copying (``torch.from_numpy(np.memmap(...))``); batches are
cut from the map and converted to int64 one window at a time (``batches.py``).  A missing
file, a vocabulary whose hash differs from the header's, or a .bin whose size is not the
header's token count raises ``DataError``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from msmoe_dist.io import atomic_output, atomic_write, temp_path_for

from .errors import DataError
from .splits import SPLITS, find_split_files
from .tokenizer import SentencePieceTokenizer, WordTokenizer, read_text_blocks, scan_words, train_tokenizer
from .vocab import UNK, Vocab

MAGIC = "msmoe_prepared"
VERSION = 1
META, VOCAB, SP_MODEL = "meta.json", "vocab.json", "tokenizer.model"
_CHUNK_TOKENS = 1 << 22  # ids buffered before each write


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _encode_split(tokenizer, src: Path, dst: Path, dtype: np.dtype, progress) -> dict:
    """Stream ``src`` through the tokenizer into ``dst``; returns the split's counts."""
    tokens = lines = unk = 0
    pending, pending_len = [], 0
    unk_id = tokenizer.vocab.unk_id
    with atomic_output(dst) as out:
        for text, nbytes in read_text_blocks(src):
            ids = tokenizer.encode_text(text)
            lines += text.count("\n")
            unk += int(np.count_nonzero(ids == unk_id))
            pending.append(ids.astype(dtype))
            pending_len += len(ids)
            if pending_len >= _CHUNK_TOKENS:
                out.write(np.concatenate(pending).tobytes())
                tokens += pending_len
                pending, pending_len = [], 0
            progress.update(nbytes)
        if pending:
            out.write(np.concatenate(pending).tobytes())
            tokens += pending_len
    return {
        "file": dst.name,
        "tokens": tokens,
        "lines": lines,
        "unk": unk,
        "source": src.name,
        "source_bytes": src.stat().st_size,
    }


def _word_train_pass(src: Path, dst: Path | None, progress) -> tuple[WordTokenizer, dict | None]:
    """The word vocabulary of ``src`` and, if ``dst`` is given, its ids written there: one read of the text."""
    provisional = temp_path_for(dst) if dst is not None else None  # scratch file, always deleted
    try:
        if provisional is None:
            words, counts, lines = scan_words(src, progress)
        else:
            with open(provisional, "wb") as f:
                words, counts, lines = scan_words(src, progress, lambda ids: f.write(ids.astype("<u4").tobytes()))
        total = int(counts.sum())
        if total == 0:
            raise DataError(f"train split {src} is empty, expected at least one line of text")
        vocab = Vocab.from_counts(dict(zip(words, counts.tolist())))
        if dst is None:
            return WordTokenizer(vocab), None
        remap = np.array([vocab.stoi[w] for w in words], dtype=np.int64)  # provisional id -> final id
        dtype = _dtype_for(len(vocab))
        # Plain chunked reads, not a memmap: mapped pages would count toward (and inflate) our RSS.
        with open(provisional, "rb") as f, atomic_output(dst) as out:
            for _ in range(0, total, _CHUNK_TOKENS):
                out.write(remap[np.fromfile(f, dtype="<u4", count=_CHUNK_TOKENS)].astype(dtype).tobytes())
        unk = int(counts[words.index(UNK)]) if UNK in words else 0
        return WordTokenizer(vocab), {
            "file": dst.name,
            "tokens": total,
            "lines": lines,
            "unk": unk,
            "source": src.name,
            "source_bytes": src.stat().st_size,
        }
    finally:
        if provisional is not None:
            provisional.unlink(missing_ok=True)


def _has_text(path: Path, block: int = 1 << 20) -> bool:
    """Whether ``path`` holds anything but whitespace; reads only up to the first such byte."""
    with open(path, "rb") as f:
        while chunk := f.read(block):
            if chunk.strip():
                return True
    return False


def _check_sources(files: dict[str, Path], out: Path) -> None:
    """Refuse an empty split (train, or one asked for) before the output directory is changed."""
    for split, path in files.items():
        if not _has_text(path):
            raise DataError(
                f"{split} split {path} is empty, expected at least one line of text ({out} was not changed)"
            )


def prepare_corpus(
    src_dir,
    out_dir,
    splits=("train", "valid", "test"),
    tokenizer: str = "word",
    sp_vocab_size: int = 32000,
    sp_model_type: str = "unigram",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write ``out_dir`` as described in the module docstring from the text corpus in ``src_dir``.

    The tokenizer is always built from the train split (which must exist), whichever splits
    are written.  Returns the header (meta.json's content).
    """
    from tqdm import tqdm

    splits = tuple(dict.fromkeys(splits))
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise DataError(f"splits {','.join(splits)!r}: expected a comma-separated subset of {','.join(SPLITS)}")
    files = find_split_files(src_dir, ("train",) + tuple(s for s in splits if s != "train"))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} is a file, expected a directory (or a path that does not exist)")
    if (out / META).exists() and not overwrite:
        raise DataError(
            f"{out} already holds a prepared corpus ({META}); pass --overwrite to replace it "
            "or choose another output directory"
        )
    if out.resolve() == Path(src_dir).resolve():
        raise DataError(f"output directory {out} is the input directory, expected a separate directory")
    _check_sources(files, out)  # before anything in the output is touched
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # from here on the directory is incomplete until meta.json is back

    t0 = time.perf_counter()
    sizes = {s: files[s].stat().st_size for s in files}
    counts = {}
    first = "train: vocabulary + ids" if tokenizer == "word" and "train" in splits else "train: vocabulary"
    with tqdm(
        total=sizes["train"], unit="B", unit_scale=True, desc=first, disable=not progress, dynamic_ncols=True
    ) as bar:
        if tokenizer == "word":
            tok, train_entry = _word_train_pass(files["train"], out / "train.bin" if "train" in splits else None, bar)
            if train_entry is not None:
                counts["train"] = train_entry
        else:
            tok = train_tokenizer(tokenizer, files["train"], sp_vocab_size, sp_model_type, bar)
    vocab = tok.vocab
    dtype = _dtype_for(len(vocab))
    vocab.save(out / VOCAB)
    if isinstance(tok, SentencePieceTokenizer):
        atomic_write(out / SP_MODEL, tok.model_proto)
    else:
        (out / SP_MODEL).unlink(missing_ok=True)

    todo = [s for s in splits if s not in counts]
    with tqdm(
        total=sum(sizes[s] for s in todo),
        unit="B",
        unit_scale=True,
        desc="encode",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for split in todo:
            bar.set_postfix(split=split)
            counts[split] = _encode_split(tok, files[split], out / f"{split}.bin", dtype, bar)
    counts = {s: counts[s] for s in splits}
    meta = {
        "magic": MAGIC,
        "version": VERSION,
        "dtype": dtype.name,
        "byteorder": "little",
        "tokenizer": tok.settings(),
        "vocab_size": len(vocab),
        "vocab_sha256": tok.sha256(),
        "splits": counts,
        "source_dir": str(Path(src_dir).resolve()),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write(out / META, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return meta


def read_meta(path) -> dict:
    """The header of a prepared directory, checked for magic and version."""
    root = Path(path)
    meta_path = root / META
    if not meta_path.is_file():
        what = "does not exist" if not root.exists() else f"has no {META}"
        raise DataError(
            f"prepared corpus {root} {what}; expected a directory written by msmoe-prepare "
            "(or data.kind=text for a directory of text files)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{meta_path} is unreadable ({exc.__class__.__name__}), expected JSON written by msmoe-prepare"
        ) from None
    magic = meta.get("magic") if isinstance(meta, dict) else None
    if magic != MAGIC:
        raise DataError(f"{meta_path} is not a msmoe-prepare header (magic {magic!r}), expected magic {MAGIC!r}")
    if meta.get("version") != VERSION:
        raise DataError(
            f"{meta_path} has format version {meta.get('version')!r}, expected {VERSION}; "
            "prepare the corpus again with this version of msmoe-prepare"
        )
    if meta.get("dtype") not in ("uint16", "uint32") or not isinstance(meta.get("splits"), dict):
        raise DataError(
            f"{meta_path} has dtype {meta.get('dtype')!r} or no splits table, expected uint16/uint32 "
            "and a splits table written by msmoe-prepare"
        )
    return meta


def load_tokenizer(path, meta: dict):
    """The tokenizer saved beside a prepared corpus, checked against the header's vocabulary hash."""
    root = Path(path)
    settings = meta.get("tokenizer") or {}
    if settings.get("kind") == "sentencepiece":
        model = root / SP_MODEL
        if not model.is_file():
            raise DataError(
                f"prepared corpus {root} has no {SP_MODEL}, expected the sentencepiece model msmoe-prepare wrote"
            )
        tok = SentencePieceTokenizer(model.read_bytes(), settings.get("sp_vocab_size"), settings.get("sp_model_type"))
    else:
        tok = WordTokenizer(Vocab.load(root / VOCAB))
    if tok.sha256() != meta.get("vocab_sha256"):
        raise DataError(
            f"vocabulary of {root} has sha256 {tok.sha256()[:12]}..., but its {META} header says "
            f"{str(meta.get('vocab_sha256'))[:12]}...; expected the files msmoe-prepare wrote together"
        )
    if len(tok.vocab) != meta.get("vocab_size"):
        raise DataError(f"vocabulary of {root} has {len(tok.vocab)} tokens, header says {meta.get('vocab_size')}")
    return tok


def map_split(path, meta: dict, split: str) -> torch.Tensor:
    """A 1-D uint16/uint32 tensor over the split's memory-mapped ids (no copy; read-only on disk)."""
    root = Path(path)
    entry = meta["splits"].get(split)
    if not isinstance(entry, dict):
        raise DataError(
            f"prepared corpus {root} has no {split} split (it has {', '.join(meta['splits']) or 'none'}); "
            f"expected msmoe-prepare --splits to include {split}"
        )
    bin_path = root / str(entry.get("file", f"{split}.bin"))
    if not bin_path.is_file():
        raise DataError(f"prepared corpus {root} lacks {bin_path.name}, which its {META} lists; prepare it again")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    tokens = entry.get("tokens")
    size = bin_path.stat().st_size
    if not isinstance(tokens, int) or size != tokens * dtype.itemsize:
        raise DataError(
            f"{bin_path} has {size} bytes, but its header promises {tokens} {meta['dtype']} tokens "
            f"({tokens * dtype.itemsize if isinstance(tokens, int) else '?'} bytes): truncated or "
            "modified; prepare it again"
        )
    if tokens == 0:
        return torch.zeros(0, dtype=torch.int64)
    # mode "c" (copy-on-write) gives a writable view, which torch.from_numpy wants, without ever writing the file.
    return torch.from_numpy(np.memmap(bin_path, dtype=dtype, mode="c", shape=(tokens,)))
