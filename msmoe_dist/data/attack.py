"""The paper's evaluation-time attack: replace 2.5% of the non-stopword words by a junk token.

MomentumSMoE reports robustness as perplexity on a corrupted copy of the validation and test
text ("Attacked WikiText-103"), the model having been trained on clean text.  How this
implementation corrupts, so that the numbers can be reproduced and compared:

- A *candidate* is a whitespace token that holds at least one letter or digit, is not a
  stopword (``stopwords_en.txt``, compared in lower case) and is not the literal ``<unk>``
  (WikiText's placeholder for a word it already removed; replacing it would change nothing
  under the word vocabulary).  Punctuation and WikiText's ``@-@``/``@,@``/``@.@`` are not words.
- Each candidate is replaced independently with probability ``rate`` (a Bernoulli draw per
  candidate, in order), so the expected replaced fraction is exactly ``rate`` for lines of any
  length.  (The alternative, round(rate * candidates) per line, would never touch a line of
  fewer than 20 candidates, biasing the attack toward long paragraphs.)
- The draws of line i come from a generator seeded by sha256(seed, i): the attacked text is a
  pure function of (text, seed, rate), identical across runs and machines, and a line's
  corruption does not depend on the lines around it.
- Lines with no replacement are kept byte for byte; corrupted lines are re-joined with single
  spaces (both tokenizers split on whitespace, so nothing else changes).

The junk token is ``AAA``.  With the word tokenizer it is not in WikiText's vocabulary (built
from train), so it encodes to ``<unk>``: the attack then turns 2.5% of the content words into
``<unk>`` and the token count stays the same.  Were ``AAA`` in the training vocabulary it would
keep its own id.  With sentencepiece ``AAA`` is spelled out in pieces (``▁AAA`` or ``▁A``, ``AA``),
so the attacked stream may have a few more tokens than the clean one.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from .errors import DataError
from .vocab import UNK

JUNK_TOKEN = "AAA"
ATTACK_RATE = 0.025
STOPWORDS_FILE = "stopwords_en.txt"


@cache
def _packaged_stopwords() -> frozenset[str]:
    text = resources.files(__package__).joinpath(STOPWORDS_FILE).read_text(encoding="utf-8")
    return _parse_stopwords(text)


def _parse_stopwords(text: str) -> frozenset[str]:
    return frozenset(w.strip().lower() for w in text.splitlines() if w.strip() and not w.lstrip().startswith("#"))


def load_stopwords(path=None) -> frozenset[str]:
    """The shipped English list, or one word per line from ``path`` ('#' starts a comment line)."""
    if path is None:
        return _packaged_stopwords()
    try:
        return _parse_stopwords(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"stopword file {path} is unreadable ({exc.__class__.__name__}), expected UTF-8 text with one word per line"
        ) from None


def is_candidate(word: str, stopwords: frozenset[str]) -> bool:
    """Whether the attack may replace ``word``: a non-stopword word (see the module docstring)."""
    return word != UNK and any(c.isalnum() for c in word) and word.lower() not in stopwords


def line_seed(seed: int, line_index: int) -> int:
    digest = hashlib.sha256(f"msmoe_dist.attack/{seed}/{line_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class AttackStats:
    lines: int
    words: int  # whitespace tokens
    candidates: int  # non-stopword words
    replaced: int

    @property
    def fraction(self) -> float:
        """Replaced share of the candidates (the quantity the attack rate targets)."""
        return self.replaced / max(self.candidates, 1)


def attack_line(
    line: str,
    line_index: int,
    seed: int,
    rate: float = ATTACK_RATE,
    stopwords: frozenset[str] | None = None,
    junk: str = JUNK_TOKEN,
) -> tuple[str, int, int]:
    """(attacked line, candidates, replaced) for line number ``line_index`` of a split."""
    stop = _packaged_stopwords() if stopwords is None else stopwords
    words = line.split()
    rng = random.Random(line_seed(seed, line_index))
    candidates = replaced = 0
    for i, word in enumerate(words):
        if is_candidate(word, stop):
            candidates += 1
            if rng.random() < rate:
                words[i] = junk
                replaced += 1
    if not replaced:
        return line, candidates, 0
    return " " + " ".join(words) + (" \n" if line.endswith("\n") else " "), candidates, replaced


def attack_lines(
    lines: Iterable[str],
    seed: int = 0,
    rate: float = ATTACK_RATE,
    stopwords: frozenset[str] | None = None,
    junk: str = JUNK_TOKEN,
) -> tuple[list[str], AttackStats]:
    """Every line attacked (line indices count from 0 in the order given), and what was done."""
    if not 0.0 <= rate <= 1.0:
        raise DataError(f"attack rate must be in [0, 1], got {rate!r}")
    if not junk or any(c.isspace() for c in junk):
        raise DataError(f"attack junk token must be one non-empty word without spaces, got {junk!r}")
    stop = _packaged_stopwords() if stopwords is None else stopwords
    out, words, candidates, replaced = [], 0, 0, 0
    for i, line in enumerate(lines):
        new, c, r = attack_line(line, i, seed, rate, stop, junk)
        out.append(new)
        words += len(line.split())
        candidates += c
        replaced += r
    return out, AttackStats(len(out), words, candidates, replaced)


def read_lines(path) -> list[str]:
    """A split's lines as the tokenizers see them (universal newlines; UTF-8)."""
    try:
        with open(path, encoding="utf-8") as f:
            return list(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found, expected the split's text file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text at byte {exc.start}, expected WikiText-format text") from None
