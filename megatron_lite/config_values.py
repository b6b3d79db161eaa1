"""One config value, from a YAML file or a ``section.key=value`` override, converted to its field's
declared type (``int``, ``float``, ``bool``, ``str``, an optional one, or a list of one), or one
:class:`UserError` naming the key, what it expects and what it got.

A list is a YAML list, a flow list written as text (``[a, b]``) or a comma list (``a,b``, ``a, b``:
each item stripped of the spaces around it, empty items dropped).

An integer may be written with an exponent (``train.steps=1e6``), read exactly. Integers beyond
int64 are refused (:func:`beyond_int64`): here those too large to read (``1e400``), the rest by
``config_validate``, after each key's own range.
"""

from __future__ import annotations

import os
import types
import typing
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml

from megatron_lite.errors import UserError

INT64_MAX = 2**63 - 1
"""The largest integer a config key, or a size or count made of keys, may be: torch's int64."""


def beyond_int64(key: str, shown: str) -> UserError:
    """The error for integer key ``key``, whose value is ``shown``, outside int64."""
    return UserError(
        f"{key}={shown} is outside int64 (at most 2**63-1 = {INT64_MAX:,} in size), in which torch counts "
        "sizes and steps: no run can use it"
    )


def _exponent_int(text: str) -> int:
    """``1e6`` as the integer 1000000, exactly (through a float, 1e30 was 1000000000000000019884624838656);
    ValueError when it is no integer, OverflowError when it is far beyond int64 (``1e400``)."""
    try:
        d = Decimal(text)
    except InvalidOperation:
        raise ValueError(text) from None
    if not d.is_finite() or d != d.to_integral_value():
        raise ValueError(text)
    if d.adjusted() > 19:  # 20 digits or more: not worth building (1e999999999 has a billion)
        raise OverflowError(text)
    return int(d)


def split_list(text: str, where: str) -> list[Any]:
    """A list value written as text: ``[a, b]`` (YAML flow) or the comma list ``a, b``."""
    if not text.startswith("["):
        return [item.strip() for item in text.split(",") if item.strip()]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(
            f"config key '{where}' got {text!r}, which is not a YAML list ({why}); "
            f"write {where}=a,b or {where}='[a, b]'"
        ) from None
    return value if isinstance(value, list) else [value]


def _scalar(value: Any, tp: Any) -> Any:
    """``value`` as ``tp`` (bool, int, float or str); ValueError or TypeError when it is not one."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return _exponent_int(value) if isinstance(value, str) and "e" in value.lower() else int(value)
    if tp is float:
        return float(value)
    if tp is str:
        if value is None or value == "":  # str(None) would be the path or name 'None'
            raise ValueError
        return str(value)
    return value


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the declared type ``tp`` of config key ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            return None
        return coerce(value, args[0], where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if value is None:  # `path:` with its items commented out, or `data.path=null`: empty
            return []
        if isinstance(value, str):
            value = split_list(value, where)
        if not isinstance(value, list):
            value = [value]
        return [coerce(v, item, where) for v in value]
    try:
        return _scalar(value, tp)
    except OverflowError:
        raise beyond_int64(where, str(value)) from None
    except (TypeError, ValueError):
        pass
    got = "nothing (null or empty)" if value is None or value == "" else repr(value)
    raise UserError(
        f"config key '{where}' expects {getattr(tp, '__name__', tp)}, got {got}"
        + ("; give a value, or leave the key out to keep its default" if got.startswith("nothing") else "")
    )


# Keys that name files or directories. A leading ``~`` is the home directory, as in a shell, which
# does not expand it inside ``log.dir=~/runs`` (not a shell assignment: the name has a dot).
PATH_KEYS = {
    ("data", "path"),
    ("data", "tokenizer"),
    ("data", "cache_dir"),
    ("data", "index_cache"),
    ("checkpoint", "dir"),
    ("checkpoint", "resume"),
    ("checkpoint", "init_from"),
    ("log", "dir"),
}


def expand_home(section: str, key: str, value: Any) -> Any:
    """``value`` of ``section.key`` with a leading ``~`` made the home directory where the key names a
    path (:data:`PATH_KEYS`; each item of a list)."""
    if (section, key) not in PATH_KEYS:
        return value
    if isinstance(value, list):
        return [expand_home(section, key, v) for v in value]
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value
