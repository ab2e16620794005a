"""Tokenizers: the reference's word-level one and a sentencepiece alternative.

Both turn WikiText-format text into ids with one ``<eos>`` per line (blank lines included)
and are built from the **train split only**:

- ``word``: whitespace tokens, ids from :class:`~msmoe_dist.data.vocab.Vocab` (frequency order).
  Words of valid/test that train never had encode to ``<unk>``; WikiText itself already
  replaced its rare words by the literal ``<unk>``, so on WikiText that only matters for
  text we change ourselves (the attack's ``AAA`` is such a word: see ``attack.py``).
- ``sentencepiece``: a unigram/bpe/char/word sentencepiece model trained on the train split
  (``data.sp_vocab_size``, ``data.sp_model_type``).  Its piece list doubles as the ``Vocab``
  (``<unk>`` is id 0, ``<eos>`` id 1), but the vocabulary hash covers the whole serialized
  model, because two models with the same pieces can segment differently.  WikiText's
  literal ``<unk>`` words are kept out of the training text and encoded as the ``<unk>`` id
  rather than spelled out as ``<``, ``unk``, ``>`` pieces.

Text is read in blocks of whole lines (:func:`read_text_blocks`) so that memory stays bounded
and the per-token work is a few C-level calls per block, not Python per line: WikiText-103's
103M tokens take seconds, not minutes.  The block path gives exactly the ids of
``iter_file_tokens`` (same universal-newline handling, same ``str.split``).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import DataError
from .vocab import EOS, UNK, Vocab

TOKENIZERS = ("word", "sentencepiece")
SP_MODEL_TYPES = ("unigram", "bpe", "char", "word")
# sentencepiece keeps its whole training input in memory: WikiText-103's ~0.9M non-empty
# lines fit, larger corpora are sampled down to this many lines (shuffled, seeded by sentencepiece).
SP_MAX_TRAIN_LINES = 2_000_000
BLOCK_BYTES = 4 << 20


def read_text_blocks(path, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[str, int]]:
    """(text, raw byte count) blocks of whole lines; every line of ``text`` ends with "\\n".

    Line breaks are \\n, \\r\\n and lone \\r, as in Python's universal-newline text mode.
    """
    path = Path(path)
    offset = 0
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed in finally; opening is what raises FileNotFoundError
    except FileNotFoundError:
        raise DataError(f"{path}: file not found, expected a text file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a text file") from None
    try:
        while True:
            lines = f.readlines(block_bytes)  # whole lines, so a block never splits a UTF-8 character
            if not lines:
                return
            raw = b"".join(lines)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}: not valid UTF-8 text at byte {offset + exc.start}, expected WikiText-format text"
                ) from None
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            if not text.endswith("\n"):  # last line without a newline still ends a line (and gets <eos>)
                text += "\n"
            offset += len(raw)
            yield text, len(raw)
    finally:
        f.close()


class _FirstSeenIds(dict):
    """token -> provisional id in order of first occurrence; only a new token costs a Python call."""

    def __missing__(self, key):
        value = self[key] = len(self)
        return value


def _words(text: str) -> list[str]:
    return text.replace("\n", f" {EOS} ").split()


def scan_words(path, progress=None, sink=None) -> tuple[list[str], np.ndarray, int]:
    """One pass over a file: (tokens in first-seen order, their counts, number of lines).

    Each block's tokens become provisional ids (their first-seen rank) through a C-level
    ``map`` over a dict, and ``np.bincount`` counts them: several times faster than a Counter
    of strings.  ``sink``, if given, receives each block's provisional ids (int64), which is
    how msmoe-prepare encodes the train split in the same pass that builds its vocabulary.
    """
    ids_of = _FirstSeenIds()
    counts = np.zeros(0, dtype=np.int64)
    lines = 0
    for text, nbytes in read_text_blocks(path):
        ids = np.array(list(map(ids_of.__getitem__, _words(text))), dtype=np.int64)
        block = np.bincount(ids, minlength=len(ids_of))
        block[: len(counts)] += counts
        counts = block
        lines += text.count("\n")
        if sink is not None:
            sink(ids)
        if progress is not None:
            progress.update(nbytes)
    return list(ids_of), counts, lines


def count_words(path, progress=None) -> Counter:
    """Counts of every token of a file under the reference tokenisation (``<eos>`` per line)."""
    words, counts, _ = scan_words(path, progress)
    return Counter(dict(zip(words, counts.tolist())))


class _Ids(dict):
    """token -> id, with unknown tokens mapping to the ``<unk>`` id (so a C-level map() can look up)."""

    def __init__(self, stoi: dict, unk: int) -> None:
        super().__init__(stoi)
        self.unk = unk

    def __missing__(self, key):
        return self.unk


class _TextEncoder:
    """What both tokenizers build on their own ``encode_text`` (whole lines in, int64 ids out)."""

    def encode_text(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_lines(self, lines: list[str]) -> np.ndarray:
        return self.encode_text("".join(line.rstrip("\n") + "\n" for line in lines))

    def encode_file(self, path, progress=None) -> np.ndarray:
        parts = []
        for text, nbytes in read_text_blocks(path):
            parts.append(self.encode_text(text))
            if progress is not None:
                progress.update(nbytes)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class WordTokenizer(_TextEncoder):
    """Whitespace tokens plus ``<eos>`` per line, ids from a word ``Vocab`` (train split only)."""

    kind = "word"

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        self._ids = _Ids(vocab.stoi, vocab.unk_id)

    @classmethod
    def train(cls, train_file, progress=None) -> WordTokenizer:
        counts = count_words(train_file, progress)
        if sum(counts.values()) == 0:
            raise DataError(f"train split {train_file} is empty, expected at least one line of text")
        return cls(Vocab.from_counts(counts))

    def settings(self) -> dict:
        return {"kind": self.kind}

    def sha256(self) -> str:
        return self.vocab.sha256()

    def encode_text(self, text: str) -> np.ndarray:
        """int64 ids of whole lines (each ending "\\n"); ``<eos>`` for every line break."""
        return np.array(list(map(self._ids.__getitem__, _words(text))), dtype=np.int64)


class PieceVocab(Vocab):
    """A sentencepiece model's pieces as a Vocab; the hash is the serialized model's (it fixes the ids)."""

    def __init__(self, pieces: list[str], model_sha256: str) -> None:
        super().__init__(pieces)
        self._sha256 = model_sha256


class SentencePieceTokenizer(_TextEncoder):
    """A sentencepiece model trained on the train split; ``<unk>`` = id 0, ``<eos>`` = id 1, no bos/pad."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, vocab_size: int, model_type: str) -> None:
        import sentencepiece as spm

        self.model_proto = bytes(model_proto)
        self.requested_vocab_size, self.model_type = vocab_size, model_type
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_proto)
        except (RuntimeError, OSError) as exc:
            raise DataError(f"unreadable sentencepiece model ({exc}); expected one written by msmoe_dist") from None
        pieces = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
        self.vocab = PieceVocab(pieces, hashlib.sha256(self.model_proto).hexdigest())
        if self.vocab.eos_id is None:
            raise DataError(f"sentencepiece model has no {EOS} piece, expected one trained by msmoe_dist")

    @classmethod
    def train(cls, train_file, vocab_size: int, model_type: str, progress=None) -> SentencePieceTokenizer:
        import sentencepiece as spm

        if model_type not in SP_MODEL_TYPES:
            raise DataError(f"sentencepiece model type {model_type!r}, expected one of {', '.join(SP_MODEL_TYPES)}")

        def sentences():
            for text, nbytes in read_text_blocks(train_file):
                for line in text.split("\n"):
                    # WikiText's literal <unk> words would otherwise be learnt as '<', 'unk', '>' pieces.
                    words = [w for w in line.split() if w != UNK]
                    if words:
                        yield " ".join(words)
                if progress is not None:
                    progress.update(nbytes)

        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                unk_id=0,
                eos_id=1,
                bos_id=-1,
                pad_id=-1,
                unk_piece=UNK,
                eos_piece=EOS,
                normalization_rule_name="identity",  # the text is already tokenised; keep it byte for byte
                hard_vocab_limit=False,  # a small corpus may hold fewer pieces than asked for
                input_sentence_size=SP_MAX_TRAIN_LINES,
                shuffle_input_sentence=True,
                num_threads=max(1, min(os.cpu_count() or 1, 8)),
                minloglevel=2,
            )
        except RuntimeError as exc:
            raise DataError(f"sentencepiece training on {train_file} failed: {' '.join(str(exc).split())}") from None
        if not model.getvalue():
            raise DataError(f"sentencepiece training on {train_file} produced no model (is the split empty?)")
        return cls(model.getvalue(), vocab_size, model_type)

    def settings(self) -> dict:
        return {"kind": self.kind, "sp_vocab_size": self.requested_vocab_size, "sp_model_type": self.model_type}

    def sha256(self) -> str:
        return self.vocab.sha256()

    def encode_text(self, text: str) -> np.ndarray:
        lines = text.split("\n")[:-1]
        segments, plan = [], []  # plan per line: list of segment indices, with -1 standing for <unk>
        for line in lines:
            if UNK not in line:
                plan.append([len(segments)])
                segments.append(line)
                continue
            parts, run = [], []
            for word in line.split():
                if word == UNK:
                    if run:
                        parts.append(len(segments))
                        segments.append(" ".join(run))
                        run = []
                    parts.append(-1)
                else:
                    run.append(word)
            if run:
                parts.append(len(segments))
                segments.append(" ".join(run))
            plan.append(parts)
        encoded = self.sp.encode(segments) if segments else []
        unk, eos = self.vocab.unk_id, self.vocab.eos_id
        out: list[int] = []
        for parts in plan:
            for i in parts:
                if i < 0:
                    out.append(unk)
                else:
                    out.extend(encoded[i])
            out.append(eos)
        return np.asarray(out, dtype=np.int64)


def train_tokenizer(kind: str, train_file, sp_vocab_size: int = 32000, sp_model_type: str = "unigram", progress=None):
    """A WordTokenizer or SentencePieceTokenizer built from ``train_file`` (the train split)."""
    if kind == "word":
        return WordTokenizer.train(train_file, progress)
    if kind == "sentencepiece":
        return SentencePieceTokenizer.train(train_file, sp_vocab_size, sp_model_type, progress)
    raise DataError(f"data.tokenizer is {kind!r}, expected one of {', '.join(TOKENIZERS)}")


def tokenizer_settings(data_cfg) -> dict:
    """The settings a DataConfig asks for, in the form ``Tokenizer.settings()`` reports them."""
    if data_cfg.tokenizer == "sentencepiece":
        return {
            "kind": "sentencepiece",
            "sp_vocab_size": data_cfg.sp_vocab_size,
            "sp_model_type": data_cfg.sp_model_type,
        }
    return {"kind": data_cfg.tokenizer}
