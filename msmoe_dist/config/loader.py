"""Loading, saving and documenting the configuration tree.

Precedence: the dataclass defaults < a YAML file < command-line overrides ``section.key=value``.
Loading is strict: an unknown section or key, a value of the wrong type or a value outside a
field's ``choices`` is a :class:`ConfigError` naming the key and where the value came from
(the file path, or ``command line``).  Cross-field and range checks are in ``validate.py``;
:func:`load_config` and :func:`config_from_dict` run them before returning.

YAML is read with ``yaml.safe_load`` semantics plus two changes: floats written without a dot
(``1e-3``, ``5E+4``) are floats, as in YAML 1.2 (PyYAML would read them as strings), and a key
repeated in one mapping is an error rather than a silent overwrite.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import textwrap
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from msmoe_dist.config.errors import COMMAND_LINE, DEFAULT_SOURCE, ConfigError, did_you_mean, show
from msmoe_dist.config.fields import all_keys, check_value, default_of, schema_sections, section_fields, type_name
from msmoe_dist.config.schema import Config
from msmoe_dist.config.validate import validate
from msmoe_dist.io import atomic_write

# --------------------------------------------------------------------------------------------
# YAML dialect


_FLOAT_NO_DOT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader + YAML 1.2 exponent floats + duplicate keys rejected."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None,
                            None,
                            f"duplicate key {key!r} (first at line {seen[key].line + 1})",
                            key_node.start_mark,
                        )
                    seen[key] = key_node.start_mark
                except TypeError:  # unhashable key: SafeConstructor reports it
                    pass
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes every string the loader would read as something else."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_NO_DOT, list("-+0123456789"))


def _yaml_error_text(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    context_mark = getattr(err, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    detail = problem
    if context and context not in problem:
        started = ""
        if context_mark is not None and mark is not None and context_mark.line != mark.line:
            started = f" started at line {context_mark.line + 1}"
        detail = f"{problem} ({context}{started})"
    return f"invalid YAML{where}: {detail}"


def _parse_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file: {err.strerror or err}") from None
    try:
        return _parse_yaml_text(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {_yaml_error_text(err)}") from None


# --------------------------------------------------------------------------------------------
# Building a Config from layered values


class _Layers:
    """Section -> key -> checked value, with the source of each key."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {}
        self.sources: dict[str, str] = {}

    def _section(self, section: Any, source: str, key_for_msg: str | None = None) -> str:
        sections = schema_sections()
        if isinstance(section, str) and section in sections:
            return section
        name = str(section) if key_for_msg is None else key_for_msg
        hint = did_you_mean(str(section), sections)
        if not hint and isinstance(section, str):
            owners = [s for s in sections if section in section_fields(s)]
            if owners:
                hint = f"; did you mean '{owners[0]}.{section}'? (keys go under their section)"
        raise ConfigError(
            f"{name} ({source}): unknown section '{section}' (sections: {', '.join(sections)}){hint}", [name]
        )

    def set(self, section: Any, key: Any, value: Any, source: str, raw: str | None = None) -> None:
        section = self._section(section, source, None if raw is None else f"{section}.{key}")
        leaves = section_fields(section)
        name = f"{section}.{key}"
        if not isinstance(key, str) or key not in leaves:
            match = difflib.get_close_matches(str(key), list(leaves), n=1, cutoff=0.6)
            hint = f"; did you mean '{section}.{match[0]}'?" if match else ""
            if not hint:
                others = [f"{s}.{key}" for s in schema_sections() if s != section and key in section_fields(s)]
                if others:
                    hint = f"; did you mean '{others[0]}'?"
            raise ConfigError(f"{name} ({source}): unknown key '{key}' in section '{section}'{hint}", [name])
        f, tp = leaves[key]
        if raw is not None and tp is str and value is not None and not isinstance(value, (str, list, dict)):
            value = raw.strip()  # command line: data.path=2024 means the string "2024"
        checked = check_value(section, key, value, {name: source})
        self.values.setdefault(section, {})[key] = checked
        self.sources[name] = source

    def merge_mapping(self, data: Any, source: str) -> None:
        if data is None:  # an empty file: nothing to change
            return
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: expected a mapping of sections (model:, moe:, ...) at the top level, "
                f"got {type(data).__name__} {show(data)}"
            )
        for section, body in data.items():
            section_name = self._section(section, source)
            if body is None:  # "model:" with nothing under it
                continue
            if not isinstance(body, dict):
                raise ConfigError(
                    f"{section_name} ({source}): expected a mapping of keys under section '{section_name}', "
                    f"got {type(body).__name__} {show(body)}",
                    [section_name],
                )
            for key, value in body.items():
                self.set(section_name, key, value, source)

    def build(self) -> Config:
        kwargs = {s: cls(**self.values.get(s, {})) for s, cls in schema_sections().items()}
        return Config(**kwargs)

    def full_sources(self) -> dict[str, str]:
        return {k: self.sources.get(k, DEFAULT_SOURCE) for k in all_keys()}


def _apply_overrides(layers: _Layers, overrides: Iterable[str] | None) -> None:
    """Apply overrides in order (a later one wins: programs build lists by appending)."""
    for item in overrides or ():
        _apply_override(layers, item)


def refuse_repeated_overrides(overrides: Iterable[str]) -> None:
    """Raise ConfigError naming a ``section.key`` given twice on a command line (which one was meant?).

    Only for what a person typed: :func:`load_config` lets a later override win, because programs
    (benchmarks, tests) build override lists by appending to a base list.
    """
    seen: dict[str, str] = {}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            continue  # malformed: load_config names it
        key = item.partition("=")[0].strip()
        if key in seen:
            raise ConfigError(
                f"{key} ({COMMAND_LINE}): given twice ('{seen[key]}' and '{item}'); expected each key once",
                [key],
            )
        seen[key] = item


def _apply_override(layers: _Layers, item: str) -> None:
    if not isinstance(item, str):
        raise ConfigError(f"{COMMAND_LINE}: override {show(item)} is not a string of the form section.key=value")
    if "=" not in item:
        raise ConfigError(f"{COMMAND_LINE}: override '{item}' is not of the form section.key=value")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"{COMMAND_LINE}: override '{item}' has an empty key; expected section.key=value")
    section, dot, leaf = key.partition(".")
    if not dot or not section or not leaf:
        owners = [s for s in schema_sections() if key in section_fields(s)] if not dot else []
        hint = f"; did you mean '{owners[0]}.{key}={text}'?" if owners else ""
        raise ConfigError(f"{COMMAND_LINE}: override key '{key}' is not of the form section.key{hint}", [key])
    try:
        value = _parse_yaml_text(text)
    except yaml.YAMLError as err:
        detail = _yaml_error_text(err)
        raise ConfigError(f"{key} ({COMMAND_LINE}): cannot parse value '{text}': {detail}", [key]) from None
    layers.set(section, leaf, value, COMMAND_LINE, raw=text)


def _validated(layers: _Layers) -> Config:
    cfg = layers.build()
    validate(cfg, layers.full_sources())
    return cfg


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] | None = ()) -> Config:
    """The configuration from defaults < the YAML file at ``path`` (if any) < ``overrides``.

    ``overrides`` are ``section.key=value`` strings; each value is read as YAML, so ``true``,
    ``1e-3``, ``4`` and ``relu`` mean what they look like.  Raises :class:`ConfigError`.
    """
    layers = _Layers()
    if path is not None:
        source = os.fspath(path)
        layers.merge_mapping(_read_yaml(source), source)
    _apply_overrides(layers, overrides)
    return _validated(layers)


def load_config_with_sources(
    path: str | os.PathLike | None, overrides: Iterable[str] | None = ()
) -> tuple[Config, dict[str, str]]:
    """Like :func:`load_config`, also returning ``section.key -> source`` for every key."""
    layers = _Layers()
    if path is not None:
        source = os.fspath(path)
        layers.merge_mapping(_read_yaml(source), source)
    _apply_overrides(layers, overrides)
    return _validated(layers), layers.full_sources()


def config_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> Config:
    """A validated Config from a (possibly partial) nested ``{section: {key: value}}`` dict."""
    layers = _Layers()
    layers.merge_mapping(dict(d) if isinstance(d, Mapping) else d, source)
    return _validated(layers)


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The full nested ``{section: {key: value}}`` dict of a Config (plain Python values)."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    """YAML text that :func:`load_config` reads back into an equal Config."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML to ``path`` atomically (creating its folder), so it is never half-written."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, "# msmoe_dist configuration (complete; load with --config)\n" + config_to_yaml(cfg))


# --------------------------------------------------------------------------------------------
# Manual


def _show_default(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, str):
        return value if value else '""'
    return show(value)


def config_help_text(width: int = 100) -> str:
    """A manual of every key, grouped by section, for an argparse epilog (use RawDescriptionHelpFormatter)."""
    lines = [
        "configuration keys (set them in the YAML file given with --config, under their section,",
        "or on the command line as section.key=value; precedence: defaults < YAML < command line):",
    ]
    for section in schema_sections():
        lines.append("")
        lines.append(f"{section}:")
        for key, (f, tp) in section_fields(section).items():
            meta = [type_name(tp), f"default {_show_default(default_of(f))}"]
            if f.metadata.get("choices"):
                meta.append("one of " + "|".join(f.metadata["choices"]))
            head = f"{section}.{key} ({', '.join(meta)}): {f.metadata.get('help', '')}".rstrip()
            lines.extend(
                textwrap.wrap(
                    head,
                    width=width,
                    initial_indent="  ",
                    subsequent_indent="      ",
                    break_long_words=False,
                    break_on_hyphens=False,
                )
            )
    return "\n".join(lines) + "\n"
