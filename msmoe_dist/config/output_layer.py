"""``model.adaptive_cutoffs``: parsing and checking the adaptive softmax's cluster boundaries.

Pure Python: the config validator checks the text, the trainer checks it against the vocabulary
it learns from the data, and ``models/output.py`` builds the adaptive head from the result.
"""

from __future__ import annotations


def parse_cutoffs(text: str) -> list[int]:
    """``"20000, 40000,200000"`` -> [20000, 40000, 200000]: positive, strictly increasing integers.
    Raises ValueError with what was expected (the config validator adds the key and its source)."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError(f'expected comma-separated positive integers such as "20000,40000,200000", got {text!r}')
    cutoffs = [int(p) for p in parts]
    if cutoffs[0] < 1 or any(b <= a for a, b in zip(cutoffs, cutoffs[1:])):
        raise ValueError(f"expected positive, strictly increasing cutoffs, got {text!r}")
    return cutoffs


def check_cutoffs(text: str, vocab_size: int) -> list[int]:
    """``model.adaptive_cutoffs`` as integers, checked against the vocabulary known at runtime."""
    try:
        cutoffs = parse_cutoffs(text)
    except ValueError as exc:
        raise ValueError(f"model.adaptive_cutoffs: {exc}") from None
    if cutoffs[-1] >= vocab_size:
        raise ValueError(
            f"model.adaptive_cutoffs={text!r}: every cutoff must be < the vocabulary size {vocab_size}, got "
            f"{cutoffs[-1]} (expected smaller cutoffs for this vocabulary, or model.output_layer=chunked)"
        )
    return cutoffs
