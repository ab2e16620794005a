"""Word-level vocabulary with the reference's WikiText tokenisation.

Tokenisation follows Transformer-XL / MomentumSMoE: each line is whitespace-split and
gets ``<eos>`` appended, blank lines included (a blank line is a single ``<eos>``).
This is what makes the published token counts come out exactly (WikiText-2 valid
217,646, test 245,569), and hence comparable perplexities.

The vocabulary is built from the train split only, ordered by frequency (descending)
then by token, so ids are reproducible.  ``<unk>`` is always present (WikiText already
contains it; if the training text does not, it is appended last); words unseen in train
encode to ``<unk>``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from msmoe_dist.io import atomic_write

from .errors import DataError

EOS = "<eos>"
UNK = "<unk>"
_FORMAT = "msmoe_vocab"
_FORMAT_VERSION = 1


def tokenize_line(line: str) -> list[str]:
    """Whitespace tokens of one line plus ``<eos>`` (an empty line is just ``[<eos>]``)."""
    return line.split() + [EOS]


def iter_file_tokens(path) -> Iterator[list[str]]:
    """The tokens of each line of a UTF-8 text file, ``<eos>`` appended to every line."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield tokenize_line(line)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text at byte {exc.start}, expected WikiText-format text") from None
    except FileNotFoundError:
        raise DataError(f"{path}: file not found, expected a text file") from None


class Vocab:
    """A fixed list of tokens; the id of a token is its position in that list."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self.itos: list[str] = list(tokens)
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            dup = next(t for t in self.itos if self.itos.count(t) > 1)
            raise DataError(f"vocabulary lists token {dup!r} twice, expected unique tokens")
        if UNK not in self.stoi:
            raise DataError(f"vocabulary has no {UNK} token, expected it to be present")
        self.unk_id = self.stoi[UNK]
        # <eos> is present for any corpus tokenised here, but not required of a hand-made vocab.
        self.eos_id = self.stoi.get(EOS)

    @classmethod
    def build(cls, token_streams: Iterable[Iterable[str]]) -> Vocab:
        """Vocabulary of the tokens in ``token_streams`` (e.g. ``iter_file_tokens(train)``)."""
        counts: Counter[str] = Counter()
        for stream in token_streams:
            counts.update(stream)
        return cls.from_counts(counts)

    @classmethod
    def from_counts(cls, counts: dict[str, int]) -> Vocab:
        """Tokens by count descending, ties by token; ``<unk>`` appended if the counts lack it."""
        tokens = sorted(counts, key=lambda t: (-counts[t], t))
        if UNK not in counts:
            tokens.append(UNK)
        return cls(tokens)

    @classmethod
    def from_file(cls, path) -> Vocab:
        return cls.build(iter_file_tokens(path))

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, sha256={self.sha256()[:12]})"

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Ids of ``tokens``; unknown tokens become the ``<unk>`` id."""
        get, unk = self.stoi.get, self.unk_id
        return [get(t, unk) for t in tokens]

    def encode_file(self, path) -> list[int]:
        """Ids of a whole text file, with the ``<eos>`` per line of the reference tokenisation."""
        get, unk = self.stoi.get, self.unk_id
        return [get(t, unk) for line in iter_file_tokens(path) for t in line]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of ``ids`` (ints or a 1-D tensor/array)."""
        itos = self.itos
        try:
            return [itos[int(i)] for i in ids]
        except IndexError:
            bad = next(int(i) for i in ids if not 0 <= int(i) < len(itos))
            raise DataError(f"token id {bad} is out of range, expected 0 <= id < {len(itos)}") from None

    def sha256(self) -> str:
        """Hash of the ordered token list: equal hashes mean identical id assignments."""
        if not hasattr(self, "_sha256"):
            payload = json.dumps(self.itos, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            self._sha256 = hashlib.sha256(payload).hexdigest()
        return self._sha256

    def save(self, path) -> None:
        """Write as JSON (tokens in id order), atomically, so it is never half-written."""
        data = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "size": len(self),
            "sha256": self.sha256(),
            "tokens": self.itos,
        }
        atomic_write(path, json.dumps(data, ensure_ascii=False, indent=0))

    @classmethod
    def load(cls, path) -> Vocab:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"vocabulary file {path} not found, expected a file written by Vocab.save") from None
        except (OSError, ValueError) as exc:
            raise DataError(
                f"vocabulary file {path} is unreadable ({exc.__class__.__name__}), expected JSON written by Vocab.save"
            ) from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("tokens"), list):
            raise DataError(
                f"vocabulary file {path} is not in the {_FORMAT} format, expected a file written by Vocab.save"
            )
        vocab = cls(data["tokens"])
        if data.get("sha256") not in (None, vocab.sha256()):
            raise DataError(f"vocabulary file {path} fails its sha256 check, expected an unmodified Vocab.save file")
        return vocab
