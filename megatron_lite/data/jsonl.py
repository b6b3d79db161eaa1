"""JSON Lines inputs, shared by ``preprocess`` and ``tokenizer train``: one JSON object per line, its
text under a key (``--json-key``, default ``text``). Files ending in ``.jsonl`` or ``.json`` are read
this way, compressed or not (``.jsonl.gz``, see ``inputs.py``); any other file is plain text."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

from megatron_lite import jsontext
from megatron_lite.data.inputs import text_suffix
from megatron_lite.errors import UserError

JSON_SUFFIXES = (".jsonl", ".json")
_FORMAT = 'a .jsonl/.json input holds one JSON object per line (JSON Lines), e.g. {"text": "..."}'


def json_kind(value: object) -> str:
    """What ``value``, as ``json.loads`` returns it, is in JSON's own words: ``a JSON array``, ``JSON null``."""
    if value is None:
        return "JSON null"
    kinds = ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"), (list, "array"), (dict, "object"))
    return f"a JSON {next(name for kind, name in kinds if isinstance(value, kind))}"


def is_jsonl(path: Path) -> bool:
    return text_suffix(path) in JSON_SUFFIXES


def decode(raw: bytes, stats: dict) -> str:
    """UTF-8 text of ``raw``; invalid bytes become U+FFFD and count in ``stats["decode_errors"]``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats["decode_errors"] = stats.get("decode_errors", 0) + 1
        return raw.decode("utf-8", errors="replace")


def _format(path: Path, lineno: int, raw: bytes, obj: object = None) -> str:
    """The JSON Lines format an error's fix names; for a first line that opens one JSON document
    (``[`` or ``{`` alone, or a whole array: a ``.json`` file as many tools save one), how to convert it."""
    head = raw.strip()
    if lineno == 1 and (head == b"[" or isinstance(obj, list)):
        return f"{_FORMAT}; {path} looks like one JSON array: convert it, e.g. jq -c '.[]' {path} > NEW.jsonl"
    if lineno == 1 and head == b"{":
        return f"{_FORMAT}; {path} looks like one JSON object over several lines: e.g. jq -c . {path} > NEW.jsonl"
    return _FORMAT


def json_text(raw: bytes, path: Path, lineno: int, json_key: str, stats: dict) -> str | None:
    """The ``json_key`` string of line ``lineno`` (``raw``) of ``path``, None for a blank line; one
    :class:`UserError` naming the line and the fix for anything else."""
    if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # a byte order mark is not text
        raw = raw[len(codecs.BOM_UTF8) :]
    if not raw.strip():
        return None
    try:
        obj = jsontext.loads(decode(raw, stats))
    except json.JSONDecodeError as e:
        why = e.msg.removesuffix(" at")  # "Invalid control character at" would read "at at column"
        raise UserError(
            f"{path}:{lineno}: invalid JSON ({why} at column {e.colno}); {_format(path, lineno, raw)}"
        ) from e
    except ValueError as e:  # jsontext's "nested too deeply": no column to name
        raise UserError(f"{path}:{lineno}: invalid JSON ({e}); {_FORMAT}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}:{lineno}: {json_kind(obj)}, not an object; {_format(path, lineno, raw, obj)}")
    if json_key not in obj:
        raise UserError(
            f"{path}:{lineno}: no key {json_key!r} (found {sorted(obj)[:8]}); "
            "name the key holding the text with --json-key"
        )
    value = obj.pop(json_key)
    if not isinstance(value, str):
        raise UserError(
            f"{path}:{lineno}: {json_key!r} holds {json_kind(value)}, not a string; give each document's text "
            "as a JSON string there, or name the key holding the text with --json-key"
        )
    return value
