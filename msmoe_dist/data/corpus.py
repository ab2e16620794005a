"""Loading a corpus directory into a vocabulary and encoded token streams.

A text corpus directory (data.kind=text or synthetic) holds one text file per split, named
either ``train.txt`` / ``valid.txt`` / ``test.txt`` or the WikiText release names
``wiki.train.tokens`` / ... .  The tokenizer (data.tokenizer: the word vocabulary or a
sentencepiece model) is always built from the train split alone, so every split is encoded
with the same ids whichever subset is requested; valid/test words unseen in train become
``<unk>``.  A prepared directory (data.kind=prepared, written once by ``msmoe-prepare``)
already holds the ids: its splits are memory-mapped, not copied (``prepared.py``), and come
back as uint16/uint32 tensors that the batch functions convert window by window.

Encoding WikiText-scale text takes seconds, so text results are cached in
``<path>/.msmoe_cache/``: ``vocab.pt`` (``sp-<type>-<size>.pt`` for sentencepiece) keyed by
the train file's name, size and mtime, and ``<split>.pt`` keyed by the tokenizer hash plus
that split file's name, size and mtime.  Any mismatch (edited file, new vocabulary,
unreadable cache) rebuilds the entry.  Caching is best effort: a read-only corpus directory
(a shared dataset) still loads, just without the speed-up.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from msmoe_dist.io import atomic_output

from .errors import DataError
from .prepared import load_tokenizer, map_split, read_meta
from .splits import SPLITS, find_split_files
from .synthetic import CACHE_DIR, generate_corpus
from .tokenizer import SentencePieceTokenizer, WordTokenizer, count_words, tokenizer_settings
from .vocab import Vocab

log = logging.getLogger(__name__)

_CACHE_VERSION = 1


@dataclass
class Corpus:
    """A vocabulary (always from train) and the requested splits as 1-D integer token-id tensors.

    Streams are int64 for text corpora and uint16/uint32 memory maps for prepared ones.
    ``files`` are the splits' text files (for a prepared corpus: those it was prepared from,
    which may since have moved); ``tokenizer`` encodes new text with the same ids.
    """

    vocab: Vocab
    train: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    test: torch.Tensor | None = None
    files: dict[str, Path] = field(default_factory=dict)
    tokenizer: object = None

    def text_file(self, name: str) -> Path:
        """The text of split ``name`` (the attack re-reads it); DataError if it is not there."""
        path = self.files.get(name)
        if path is None or not Path(path).is_file():
            raise DataError(
                f"the text of the {name} split ({path or 'unknown'}) is not available; expected the "
                "text corpus the data was prepared from (pass its directory with --text-path)"
            )
        return Path(path)

    def split(self, name: str) -> torch.Tensor:
        stream = getattr(self, name, None) if name in SPLITS else None
        if stream is None:
            raise DataError(
                f"split {name!r} was not loaded, expected one of the requested splits "
                f"({', '.join(s for s in SPLITS if getattr(self, s) is not None)})"
            )
        return stream


def load_corpus(cfg, splits=SPLITS) -> Corpus:
    """Load the corpus described by a ``DataConfig`` (generating it first when kind=synthetic)."""
    splits = tuple(splits)
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise DataError(f"unknown split {bad[0]!r}, expected some of {', '.join(SPLITS)}")
    if cfg.kind == "prepared":
        return _load_prepared(cfg, splits)
    if cfg.kind == "synthetic":
        generate_corpus(cfg.path, cfg.synthetic_lines, cfg.synthetic_seed)
    elif cfg.kind != "text":
        raise DataError(f"data.kind is {cfg.kind!r}, expected 'synthetic', 'text' or 'prepared'")
    files = find_split_files(cfg.path, ("train",) + tuple(s for s in splits if s != "train"))
    cache = Path(cfg.path) / CACHE_DIR
    tokenizer = _load_tokenizer(cfg, files["train"], cache)
    corpus = Corpus(vocab=tokenizer.vocab, files={s: files[s] for s in splits}, tokenizer=tokenizer)
    for split in splits:
        setattr(corpus, split, _load_split(split, files[split], tokenizer, cache))
    return corpus


def _load_prepared(cfg, splits) -> Corpus:
    meta = read_meta(cfg.path)
    wanted, have = tokenizer_settings(cfg), meta.get("tokenizer")
    if wanted != have:
        raise DataError(
            f"prepared corpus {cfg.path} was tokenized with {have}, but the config asks for {wanted}; "
            "expected matching data.tokenizer/data.sp_* (or prepare the corpus again)"
        )
    tokenizer = load_tokenizer(cfg.path, meta)
    source = Path(str(meta.get("source_dir", "")))
    files = {s: source / str(e.get("source", "")) for s, e in meta["splits"].items() if isinstance(e, dict)}
    corpus = Corpus(vocab=tokenizer.vocab, files=files, tokenizer=tokenizer)
    for split in splits:
        setattr(corpus, split, map_split(cfg.path, meta, split))
    return corpus


def _source_key(path: Path) -> dict:
    st = path.stat()
    return {"name": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_cache(path: Path, expected: dict) -> dict | None:
    """The cached payload if it exists and its key fields equal ``expected``; None otherwise."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable cache is just rebuilt
        log.warning("ignoring unreadable cache %s (%s); rebuilding it", path, exc.__class__.__name__)
        return None
    if not isinstance(payload, dict) or any(payload.get(k) != v for k, v in expected.items()):
        return None
    return payload


def _write_cache(path: Path, payload: dict) -> None:
    """torch.save, atomically; failures only cost speed, so they are logged, not raised.

    No fsync: a cache entry lost or torn by a power cut fails its key or its load and is rebuilt."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, fsync=False) as f:
            torch.save(payload, f)
    except OSError as exc:
        log.warning("could not write cache %s (%s); continuing without it", path, exc)


def _load_tokenizer(cfg, train_file: Path, cache: Path):
    if cfg.tokenizer == "sentencepiece":
        return _load_sentencepiece(cfg, train_file, cache)
    if cfg.tokenizer != "word":
        raise DataError(f"data.tokenizer is {cfg.tokenizer!r}, expected 'word' or 'sentencepiece'")
    return WordTokenizer(_load_vocab(train_file, cache))


def _load_vocab(train_file: Path, cache: Path) -> Vocab:
    key = {"version": _CACHE_VERSION, "source": _source_key(train_file)}
    payload = _read_cache(cache / "vocab.pt", key)
    if payload is not None and isinstance(payload.get("tokens"), list):
        tokens, num_tokens = payload["tokens"], payload.get("num_tokens")
    else:
        counts: Counter[str] = count_words(train_file)
        vocab = Vocab.from_counts(counts)
        tokens, num_tokens = vocab.itos, sum(counts.values())
        _write_cache(cache / "vocab.pt", {**key, "tokens": tokens, "num_tokens": num_tokens})
    if not num_tokens:
        raise DataError(f"train split {train_file} is empty, expected at least one line of text")
    return Vocab(tokens)


def _load_sentencepiece(cfg, train_file: Path, cache: Path) -> SentencePieceTokenizer:
    key = {"version": _CACHE_VERSION, "source": _source_key(train_file), "tokenizer": tokenizer_settings(cfg)}
    name = f"sp-{cfg.sp_model_type}-{cfg.sp_vocab_size}.pt"
    payload = _read_cache(cache / name, key)
    if payload is not None and isinstance(payload.get("model"), bytes):
        return SentencePieceTokenizer(payload["model"], cfg.sp_vocab_size, cfg.sp_model_type)
    tokenizer = SentencePieceTokenizer.train(train_file, cfg.sp_vocab_size, cfg.sp_model_type)
    _write_cache(cache / name, {**key, "model": tokenizer.model_proto})
    return tokenizer


def _load_split(split: str, file: Path, tokenizer, cache: Path) -> torch.Tensor:
    key = {"version": _CACHE_VERSION, "split": split, "vocab_sha256": tokenizer.sha256(), "source": _source_key(file)}
    payload = _read_cache(cache / f"{split}.pt", key)
    ids = payload.get("ids") if payload is not None else None
    if isinstance(ids, torch.Tensor) and ids.dtype == torch.int64 and ids.dim() == 1:
        return ids
    ids = torch.from_numpy(tokenizer.encode_file(file))
    _write_cache(cache / f"{split}.pt", {**key, "ids": ids})
    return ids
