"""Config reference generated from the dataclasses: each field's type, default and docstring.

``python -m megatron_lite.config_docs > docs/config.md`` regenerates it; a test keeps it current.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing

from megatron_lite import config_sections
from megatron_lite.config_sections import SECTIONS, public_name


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right after each field) of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _type_name(tp: object) -> str:
    name = str(tp).replace("typing.", "") if typing.get_origin(tp) else getattr(tp, "__name__", str(tp))
    return name.replace(" | ", " or ")  # a bare pipe would split the Markdown table cell


def render() -> str:
    """The whole reference as Markdown."""
    out = [
        "# Config reference",
        "",
        "Generated from `megatron_lite/config_sections.py` by `python -m megatron_lite.config_docs`; do not edit.",
        "Set keys in a YAML file (`section: {key: value}`) or on the command line as `section.key=value`.",
        "A path starting with `~` (`log.dir=~/runs/a`) is under the home directory. A list is `a,b` (spaces",
        "around items are dropped) or YAML's `[a, b]`; `null` leaves an optional key unset. Overrides apply in",
        "order after the file: a key given twice on the command line takes the last value, with a warning",
        "naming both (in a YAML file a key given twice is an error, and so is `--config` given twice). An",
        "integer may have an exponent (`train.steps=1e6`); integers, and sizes made of them",
        "(`model.vocab_size x model.hidden`, `train.steps x train.global_batch_size`), must fit int64 (2**63-1).",
        "",
    ]
    for name, section_field in SECTIONS.items():
        cls = section_field.default_factory
        hints, docs = typing.get_type_hints(cls, vars(config_sections)), field_docs(cls)
        out += [f"## `{name}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            key = public_name(f.name)
            out.append(f"| `{name}.{key}` | `{_type_name(hints[f.name])}` | `{default!r}` | {docs.get(f.name, '')} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render())
