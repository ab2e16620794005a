"""What the schema says about its own fields: sections, leaf keys, types, defaults, flags.

Everything here reads ``schema.py`` through ``dataclasses.fields`` and the metadata that
:func:`~msmoe_dist.config.schema.opt` attaches; nothing here knows a key by name.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Mapping
from typing import Any

from msmoe_dist.config.errors import did_you_mean, key_error, show
from msmoe_dist.config.schema import Config


@functools.cache
def schema_sections() -> dict[str, type]:
    """Section name -> its dataclass, in schema order."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


@functools.cache
def section_fields(section: str) -> dict[str, tuple[dataclasses.Field, Any]]:
    """Key -> (its dataclass field, its type annotation) of one section, in schema order."""
    cls = schema_sections()[section]
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def all_keys() -> list[str]:
    """Every leaf key of the schema as ``section.key``, in schema order."""
    return [f"{s}.{k}" for s in schema_sections() for k in section_fields(s)]


def arch_keys(section: str) -> tuple[str, ...]:
    """The keys of ``section`` marked ``arch=True`` in the schema (they shape the network), in schema order."""
    return tuple(k for k, (f, _) in section_fields(section).items() if f.metadata.get("arch"))


def type_name(tp: Any) -> str:
    """``int``, ``str or null``, ...: a field's type as the manual names it."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(type_name(a) for a in inner) + " or null"
    return getattr(tp, "__name__", str(tp))


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value (``dataclasses.MISSING`` for a required one)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def coerce(tp: Any, value: Any, choices: tuple[str, ...] | None) -> tuple[bool, Any, str]:
    """(ok, converted value, what was expected) for one value against one annotation."""
    args = typing.get_args(tp)
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return True, None, ""
        inner = [a for a in args if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else tp
    if tp is bool:
        return (type(value) is bool), value, "true or false"
    if tp is int:
        return (type(value) is int), value, "an integer"
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                as_float = float(value)
            except OverflowError:
                return False, value, "a finite number"
            return math.isfinite(as_float), as_float, "a finite number"
        return False, value, "a number"
    if tp is str:
        if not isinstance(value, str):
            return False, value, "a string"
        if choices is not None and value not in choices:
            return False, value, "one of " + "|".join(choices)
        return True, value, ""
    raise TypeError(f"msmoe_dist.config: unsupported field type {tp!r} in the schema")


def check_value(section: str, key: str, value: Any, sources: Mapping[str, str] | None = None) -> Any:
    """Type-check one leaf value; returns it converted (int -> float for float fields)."""
    f, tp = section_fields(section)[key]
    choices = f.metadata.get("choices")
    ok, converted, expected = coerce(tp, value, choices)
    if ok:
        return converted
    name = f"{section}.{key}"
    got = show(value)
    if value is not None and not isinstance(value, str):
        got += f" ({type(value).__name__})"
    detail = f"expected {expected}, got {got}"
    if isinstance(value, str) and choices is not None and coerce(tp, value, None)[0]:
        detail += did_you_mean(value, choices)
    elif tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        detail += " (quote it to make it a string)"
    raise key_error(name, detail, sources)
