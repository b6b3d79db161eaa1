"""Run configuration: typed dataclass sections, YAML files, dotted overrides, validation.

A config is one :class:`Config` of sections (``model``, ``parallel``, ``optim``, ``train``, ``data``,
``checkpoint``, ``log``, ``kernels``), defined with each field's docstring in ``config_sections.py``
and re-exported here; ``docs/config.md`` is generated from them by ``python -m megatron_lite.config_docs``.

Loading order: dataclass defaults <- YAML file <- ``section.key=value`` overrides, in order: a key
given twice on the command line takes the last value (a base list of overrides plus a changed one is
how scripts vary a run), and :func:`config_warnings` names it with both values. Unknown sections or
keys are a :class:`UserError` naming the key and the closest valid one.

Resolving and checking a loaded config (:func:`fill_defaults`, :func:`validate`, :func:`config_warnings`,
:func:`accumulation_steps`) lives in ``config_validate.py`` and is re-exported here; reading a YAML
file in ``config_yaml.py``; converting one value to its field's type in ``config_values.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

from megatron_lite.config_sections import (  # noqa: F401  re-exported
    SECTIONS,
    CheckpointConfig,
    Config,
    DataConfig,
    KernelsConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    public_name,
    section_fields,
)
from megatron_lite.config_validate import (  # noqa: F401  re-exported
    accumulation_steps,
    check_vocab_covers,
    fill_defaults,
    validate,
)
from megatron_lite.config_values import coerce, expand_home
from megatron_lite.config_warnings import config_warnings  # noqa: F401  re-exported
from megatron_lite.config_yaml import read_config_file, verbatim, yaml_scalar
from megatron_lite.errors import UserError


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(options))}"


def _field_of(section: str, key: str) -> dataclasses.Field:
    if section not in SECTIONS:
        raise UserError(f"unknown config section {section!r}{_suggest(section, list(SECTIONS))}")
    by_name = {public_name(f.name): f for f in section_fields(SECTIONS[section])}
    if key not in by_name:
        names = [f"{section}.{k}" for k in by_name]
        raise UserError(f"unknown config key '{section}.{key}'{_suggest(f'{section}.{key}', names)}")
    return by_name[key]


def _field_types(section: str) -> dict[str, Any]:
    return typing.get_type_hints(SECTIONS[section].default_factory)


def _set(cfg: Config, section: str, key: str, value: Any) -> None:
    f = _field_of(section, key)
    value = coerce(value, _field_types(section)[f.name], f"{section}.{key}")
    setattr(getattr(cfg, section), f.name, expand_home(section, key, value))


def _is_text(section: str, key: str) -> bool:
    """Whether ``section.key`` holds a string (or an optional one): its override is taken verbatim."""
    name = _field_of(section, key).name  # first: an unknown section or key is named
    tp = _field_types(section)[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp is str


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars or comma lists), in order: a
    key given twice takes the last value, and one that changes is recorded in ``cfg.replaced_overrides``."""
    given: dict[tuple[str, str], tuple[str, Any]] = {}  # (section, field) -> (the override, its value)
    for i, item in enumerate(overrides):
        if "=" not in item or "." not in item.split("=", 1)[0]:
            split = i > 0 and overrides[i - 1].endswith(",")  # `data.path=a, b` unquoted: the shell split it
            hint = f"; quote a list with spaces ('{overrides[i - 1]} {item}') or drop them" if split else ""
            raise UserError(f"override {item!r} is not of the form section.key=value (e.g. train.steps=100){hint}")
        dotted, raw = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if raw == "" and typing.get_origin(_field_types(section)[_field_of(section, key).name]) is list:
            raise UserError(  # most likely an unset shell variable: `data.path=$DATA`
                f"override {item!r} gives {dotted} no value; leave it out for its default (for data.path: the "
                f"embedded corpus), or write {dotted}=[] for an empty list"
            )
        # a name or path as typed: not YAML's 1_000 -> 1000, on -> True, 017 -> 15
        _set(cfg, section, key, verbatim(raw) if _is_text(section, key) else yaml_scalar(raw))
        name = _field_of(section, key).name
        value = getattr(getattr(cfg, section), name)
        if (section, name) in given and given[section, name][1] != value:
            cfg.replaced_overrides.append(
                f"{dotted} is given more than once on the command line, {given[section, name][0]} and then {item}: "
                f"the last one counts ({item}); drop the others"
            )
        given[section, name] = (item, value)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then the overrides; returns an unvalidated Config."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        data, written = read_config_file(path)
        for section, values in data.items():
            if str(section).split(".")[0] in SECTIONS and "." in str(section):  # `model.layers: 4`
                top, key = str(section).split(".", 1)
                raise UserError(
                    f"config file {str(p)!r} has the key '{section}' at the top level: a YAML file nests keys "
                    f"under their section (a line `{top}:`, then `  {key}: {values}` indented below it); "
                    "the dotted form is for command-line overrides"
                )
            if str(section) not in SECTIONS:
                raise UserError(
                    f"unknown config section {str(section)!r} in {str(p)!r}{_suggest(str(section), list(SECTIONS))}"
                )
            if values is None:  # `model:` with every key commented out
                continue
            if not isinstance(values, dict):
                raise UserError(
                    f"config section {section!r} in {str(p)!r} must be a mapping of keys (indented "
                    f"`key: value` lines under `{section}:`), not {type(values).__name__} {values!r}"
                )
            as_written = written.get(str(section)) or {}
            for key, value in values.items():
                raw = as_written.get(str(key))
                try:  # an error names the file that says it: a run may read one of several configs
                    if isinstance(raw, str) and _is_text(str(section), str(key)):  # `dir: 2024_01` is not 202401
                        value = verbatim(raw)
                    _set(cfg, str(section), str(key), value)
                except UserError as e:
                    raise UserError(f"config file {str(p)!r}: {e}") from None
    return apply_overrides(cfg, overrides or [])


def config_from_dict(data: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (e.g. a checkpoint's saved config)."""
    cfg = Config()
    for section, values in data.items():
        for key, value in values.items():
            _set(cfg, section, key, value)
    return cfg


def dumps(cfg: Config) -> str:
    """Compact JSON of the resolved config, for logs and checkpoint metadata."""
    return json.dumps(cfg.to_dict(), sort_keys=True)
