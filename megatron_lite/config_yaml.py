"""Reading a config YAML file: one error naming the file and line for anything unreadable, a key
given twice refused (PyYAML would keep the last), and each scalar also as the text written; an override's
value as YAML reads it (``yaml_scalar``) or, for a text key, as typed (``verbatim``)."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml

from megatron_lite.errors import UserError


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently), and a
    list or mapping as a key, which is no name of a section or key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):  # `? [a]` or `[a]: 1`: a list or mapping as the key
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    "a key is a list or mapping, not a name; write `name: value`",
                    key_node.start_mark,
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | Path) -> tuple[dict[Any, Any], Any]:
    """``(sections, as_written)``: the file as YAML values, and as text (``yaml.BaseLoader``: every
    scalar the string written, so that a name such as ``2024_01`` is not the number 202401)."""
    if str(path) == "":  # Path("") is ".", the current directory
        raise UserError("--config is given an empty file name (an unset shell variable?); give a YAML file")
    p = Path(path)
    if p.is_dir():
        raise UserError(f"config file {str(p)!r} is a directory, not a YAML file (see configs/ for examples)")
    if not p.exists():
        raise UserError(f"config file {str(p)!r} does not exist (see configs/ for examples)")
    if not p.is_file():  # /dev/null, a FIFO: nothing a run could record or read again
        raise UserError(f"config file {str(p)!r} is not a regular file; give a YAML file (see configs/ for examples)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line, byte = e.object[: e.start].count(b"\n") + 1, e.object[e.start]
        raise UserError(f"config file {str(p)!r} is not UTF-8 text (line {line}: byte {byte:#x})") from None
    except OSError as e:
        raise UserError(f"config file {str(p)!r} cannot be read: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        written = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as e:
        where = f" (line {e.problem_mark.line + 1})" if getattr(e, "problem_mark", None) else ""
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"config file {str(p)!r} is not valid YAML{where}: {why}") from None
    except RecursionError:  # PyYAML composes recursively: lists or mappings nested past Python's stack
        raise UserError(f"config file {str(p)!r} is not valid YAML: lists or mappings nested too deeply") from None
    if not isinstance(data, dict):
        raise UserError(
            f"config file {str(p)!r} holds a YAML {type(data).__name__}, not a mapping of sections: write each "
            "section as `model:`, `train:`, ... with its keys indented below it (see configs/ for examples)"
        )
    return data, written


YAML_NULLS = ("", "~", "null", "Null", "NULL")


def verbatim(raw: str) -> str | None:
    """A string key's value as written (YAML's null spellings: nothing)."""
    return None if raw in YAML_NULLS else raw


def yaml_scalar(raw: str) -> Any:
    """An override's value as a YAML scalar (``1e3``, ``true``, ``null``); text that YAML reads as a
    mapping or list, or cannot read at all (``{``, ``'4``, ``@``), stays text, which the field's type
    then accepts (a comma list) or refuses, naming the key."""
    if not raw or raw.startswith("["):
        return raw
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError):  # RecursionError: `{{{...` nested past Python's stack
        return raw
    return raw if isinstance(value, (dict, list)) else value
