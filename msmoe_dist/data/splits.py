"""The splits of a text corpus directory and the files that hold them.

Each split is one text file, named ``train.txt`` / ``valid.txt`` / ``test.txt`` or with the
WikiText release names ``wiki.train.tokens`` / ...; either layout is accepted per split.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DataError

SPLITS = ("train", "valid", "test")


def candidate_names(split: str) -> tuple[str, str]:
    """The two file names a split may have: ``<split>.txt`` or WikiText's ``wiki.<split>.tokens``."""
    return f"{split}.txt", f"wiki.{split}.tokens"


def find_split_files(path, splits=SPLITS) -> dict[str, Path]:
    """Map each requested split to its file in ``path``; either naming layout is accepted per split."""
    root = Path(path)
    layouts = "train.txt/valid.txt/test.txt or wiki.train.tokens/wiki.valid.tokens/wiki.test.tokens"
    if not root.exists():
        raise DataError(f"data directory {root} does not exist, expected a directory with {layouts}")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a directory, expected a directory with {layouts}")
    found, missing = {}, []
    for split in splits:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}, expected one of {', '.join(SPLITS)}")
        hit = next((root / n for n in candidate_names(split) if (root / n).is_file()), None)
        if hit is None:
            missing.append(split)
        else:
            found[split] = hit
    if missing:
        looked = ", ".join(n for s in missing for n in candidate_names(s))
        raise DataError(f"data directory {root} has no {'/'.join(missing)} split: looked for {looked}")
    return found
