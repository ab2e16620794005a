"""The user's configuration mistakes: :class:`ConfigError` and the helpers that word its messages.

Every message names the dotted key(s) and where each value came from (a file path,
``command line`` or ``default``), so the loader and the validator word errors the same way.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from msmoe_dist.errors import UserError

COMMAND_LINE = "command line"
DEFAULT_SOURCE = "default"


class ConfigError(UserError):
    """A mistake in the user's configuration.

    ``str()`` is always a single line starting with ``config error:``, fit to be printed as is
    (``msmoe-train: config error: model.num_layers (configs/x.yaml): expected a positive
    integer, got 0``).  ``keys`` holds the dotted keys the error is about, when known.
    """

    def __init__(self, message: str, keys: Iterable[str] = ()):
        text = re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip()
        if not text.startswith("config error:"):
            text = f"config error: {text}"
        super().__init__(text)
        self.keys = tuple(keys)


def format_keys(keys: Iterable[str], sources: Mapping[str, str] | None = None) -> str:
    """``a.b, a.c (file.yaml), d.e (command line)``: the keys, each run followed by its source."""
    keys = list(keys)
    if not sources:
        return ", ".join(keys)
    parts: list[str] = []
    run: list[str] = []
    for i, key in enumerate(keys):
        run.append(key)
        src = sources.get(key, DEFAULT_SOURCE)
        nxt = sources.get(keys[i + 1], DEFAULT_SOURCE) if i + 1 < len(keys) else None
        if nxt != src:
            parts.append(f"{', '.join(run)} ({src})")
            run = []
    return ", ".join(parts)


def key_error(keys: str | Iterable[str], detail: str, sources: Mapping[str, str] | None = None) -> ConfigError:
    """A :class:`ConfigError` ``<keys with their sources>: <detail>``."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    return ConfigError(f"{format_keys(keys, sources)}: {detail}", keys)


def show(value: Any) -> str:
    """A value as the user wrote it in YAML: ``true``, ``null``, ``'text'``, ``4.5``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (int, float)):
        return repr(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or ``""`` when none is close."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""
