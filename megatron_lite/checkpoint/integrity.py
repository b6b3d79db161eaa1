"""The checks that a checkpoint is what ``format.py`` describes, before anything reads it.

:func:`metadata_problem` checks a parsed ``metadata.json`` against the schema in ``format.py``'s
docstring (keys and their types, values in range, boxes tiling their tensors, one ``ranks`` entry per
rank, plain file names, a checksum for every file). :func:`header_problem` checks that a rank file
whose checksum matched holds each key ``metadata.json`` lists for it (:func:`listed_keys`) in its box's
shape and dtype, in bytes of its own inside the file: ``metadata.json`` has no checksum of its own.
Verification (``step_dir.py``) asks both before reading a checkpoint: a damaged one is a named problem.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from megatron_lite.checkpoint.boxes import box_numel, box_shape, tiles
from megatron_lite.checkpoint.format import DTYPE_CODES, FORMAT, METADATA, PARAM_DTYPES, read_tensor_header

_ITEMSIZE = {code: dtype.itemsize for dtype, code in DTYPE_CODES.items()}

# ---- the structure of metadata.json (format.py's schema), checked before anything reads it -------
_NULL = type(None)
_TOP = {"step": int, "weights_only": bool, "layout": dict, "tensors": dict, "ranks": list, "files": dict}
_LAYOUT = {"world_size": int, "param_dtype": str}  # what readers index; tp, pp, dp are compared with .get
_TENSOR = {"shape": list, "dtype": str, "shards": list}
_SHARD = {"file": str, "key": str, "box": list}
_RANK = {"file": str, "coordinate": list, "rng": list}
_FILE = {"sha256": str, "bytes": int}
_OPTIMIZER = {"step": int}
_TRAINER = {"skipped_steps": int, "consumed_samples": int, "scaler": (dict, _NULL)}
_STREAK = {"in_a_row": int, "since": int}  # trainer.skip_streak, optional (absent: no streak)
_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "a boolean"}


def _json_name(kind: type) -> str:
    return _JSON_NAMES.get(kind, "null" if kind is _NULL else kind.__name__)


def _fields(obj: object, where: str, fields: dict[str, type | tuple[type, ...]]) -> str | None:
    """Why ``obj`` (called ``where``; "" for the top level) is not an object holding ``fields`` of
    their types, or None."""
    if not isinstance(obj, dict):
        return f"{where} is {_json_name(type(obj))}, not an object"
    for key, kind in fields.items():
        if key not in obj:
            return f"{where or 'it'} has no {key!r} key"
        kinds = kind if isinstance(kind, tuple) else (kind,)
        value = obj[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # true is not a count
            return f"{where + '.' if where else ''}{key} is {_json_name(type(value))}, not " + " or ".join(
                map(_json_name, kinds)
            )
    return None


def _each(items: dict | list, where: str, fields: dict[str, type | tuple[type, ...]]) -> str | None:
    """The first entry of ``items`` that :func:`_fields` finds a problem in."""
    pairs = items.items() if isinstance(items, dict) else enumerate(items)
    return next((problem for k, v in pairs if (problem := _fields(v, f"{where}[{k!r}]", fields))), None)


def _section(meta: dict, key: str, fields: dict[str, type | tuple[type, ...]]) -> str | None:
    """``trainer`` / ``optimizer``: always present; null only in a weights-only checkpoint."""
    if key not in meta:
        return f"it has no {key!r} key"
    if meta[key] is None and meta["weights_only"]:
        return None
    return _fields(meta[key], key, fields)


def _streak_problem(trainer: dict | None, step: int) -> str | None:
    """``trainer.skip_streak`` (the streak of skipped steps a checkpoint was saved in), where present:
    two counts, a streak no longer than the skipped steps, begun at or before the checkpoint's step."""
    streak = (trainer or {}).get("skip_streak")
    if streak is None:
        return None
    if problem := _fields(streak, "trainer.skip_streak", _STREAK):
        return problem
    if not all(_count(streak[k]) for k in _STREAK):
        return f"trainer.skip_streak {streak} holds a negative count"
    if streak["in_a_row"] > trainer["skipped_steps"] or streak["since"] > step:
        skipped = trainer["skipped_steps"]
        return f"trainer.skip_streak {streak} does not fit trainer.skipped_steps={skipped} and step {step}"
    return None


def _structure_problem(meta: dict) -> str | None:
    """The first key missing or of the wrong type; each check relies on those before it."""
    checks = (
        lambda: _fields(meta, "", _TOP),
        lambda: _fields(meta["layout"], "layout", _LAYOUT),
        lambda: _each(meta["tensors"], "tensors", _TENSOR),
        lambda: next(
            (p for n, t in meta["tensors"].items() if (p := _each(t["shards"], f"tensors[{n!r}].shards", _SHARD))),
            None,
        ),
        lambda: _each(meta["ranks"], "ranks", _RANK),
        lambda: _each(meta["files"], "files", _FILE),
        lambda: _section(meta, "optimizer", _OPTIMIZER),
        lambda: _section(meta, "trainer", _TRAINER),
        lambda: _streak_problem(meta["trainer"], meta["step"]),
        lambda: (
            None if isinstance(config := meta.get("config"), (dict, _NULL)) else f"config is {_json_name(type(config))}"
        ),
    )
    return next((problem for check in checks if (problem := check())), None)


def metadata_problem(meta: object) -> str | None:
    """Why a parsed ``metadata.json`` is unusable, or None: another format version; a key missing
    or of the wrong type; a value out of range (:func:`_value_problem`); ``ranks`` not one entry per
    rank of the saved world; a file name that is a path (``../x``, ``/x``); a file referred to
    without a checksum. The one check of the structure
    documented above: the reader's verification asks it before anything indexes into the metadata,
    so a damaged file is a named problem and ``resume=auto`` falls back to an older checkpoint, as
    for any corrupt one."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        return (
            f"format {got!r} is not {FORMAT!r}: written by another megatron-lite version, which this one cannot "
            "read; train on from it with the megatron-lite version that saved it"
        )
    problem = _structure_problem(meta) or _value_problem(meta) or _consistency_problem(meta)
    return f"{METADATA} is damaged: {problem}" if problem else None


def _box_problem(shape: list, box: list) -> str | None:
    """Why ``box`` (``[[start, stop], ...]``) is not a box of a tensor of ``shape``, or None."""
    if len(box) != len(shape) or not all(isinstance(r, list) and len(r) == 2 for r in box):
        return f"box {box} is not {len(shape)} [start, stop] pairs"
    if not all(_count(a) and _count(b) and a <= b <= n for (a, b), n in zip(box, shape)):
        return f"box {box} is not inside the shape {shape}"
    return None


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _value_problem(meta: dict) -> str | None:
    """The first value out of its range (the structure is sound): a negative count, an optimizer
    step past the checkpoint's step, an unknown dtype, a box outside its tensor's shape, boxes
    holding fewer or more elements than their tensor's shape, or overlapping boxes."""
    step, opt, trainer = meta["step"], meta["optimizer"], meta["trainer"]
    counts = {"step": step, **{f"files[{k!r}].bytes": f["bytes"] for k, f in meta["files"].items()}}
    if opt is not None:
        counts["optimizer.step"] = opt["step"]
    if trainer is not None:
        counts.update({f"trainer.{k}": trainer[k] for k in ("skipped_steps", "consumed_samples")})
    if bad := next((k for k, v in counts.items() if v < 0), None):
        return f"{bad} is {counts[bad]}, not a count >= 0"
    for key in ("optimizer.step", "trainer.skipped_steps"):
        if counts.get(key, 0) > step:
            return f"{key} is {counts[key]}, past the checkpoint's step {step}"
    if meta["layout"]["param_dtype"] not in PARAM_DTYPES:
        return f"layout.param_dtype {meta['layout']['param_dtype']!r} is not one of {sorted(PARAM_DTYPES)}"
    for name, t in meta["tensors"].items():
        if t["dtype"] not in DTYPE_CODES.values():
            return f"tensors[{name!r}].dtype {t['dtype']!r} is not a safetensors dtype"
        if not all(_count(n) for n in t["shape"]):
            return f"tensors[{name!r}].shape {t['shape']} is not a list of sizes"
        for i, s in enumerate(t["shards"]):
            if why := _box_problem(t["shape"], s["box"]):
                return f"tensors[{name!r}].shards[{i}]: {why}"
        # a save stores every element once: a shape larger than its boxes would be allocated whole on read
        stored, numel = sum(box_numel(s["box"]) for s in t["shards"]), math.prod(t["shape"])
        if stored != numel:
            return f"tensors[{name!r}] has shape {t['shape']} ({numel} elements) but its shards hold {stored}"
        if not tiles(t["shape"], [s["box"] for s in t["shards"]]):  # read_box allocates with torch.empty
            return f"tensors[{name!r}] has shards whose boxes overlap, leaving other elements unstored"
    return None


def _file_name_problem(name: str) -> str | None:
    """Why ``name`` is not the name of a file directly inside the step directory (every file a save
    writes is): a path such as ``../x`` or ``/etc/x`` would make the reader open a file outside it."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        return f"file name {name!r} is not a file directly inside the step directory (a path, or empty)"
    return None


def _consistency_problem(meta: dict) -> str | None:
    """``ranks`` holds one entry per rank of the saved world; every file referred to is a plain file
    name (:func:`_file_name_problem`) and has a checksum; no stored key is listed for two boxes."""
    world = meta["layout"]["world_size"]
    if len(meta["ranks"]) != world:
        return f"ranks has {len(meta['ranks'])} entries but the checkpoint's world (layout.world_size) is {world}"
    referred = {s["file"] for t in meta["tensors"].values() for s in t["shards"]} | {r["file"] for r in meta["ranks"]}
    if bad := next((p for n in sorted(referred | set(meta["files"])) if (p := _file_name_problem(n))), None):
        return bad
    stored = Counter((s["file"], s["key"]) for t in meta["tensors"].values() for s in t["shards"])
    if twice := next((fk for fk, n in stored.items() if n > 1), None):
        return f"{twice[0]} key {twice[1]!r} is listed for more than one box"
    unlisted = sorted(referred - set(meta["files"]))
    return f"{unlisted[0]} is referred to but has no checksum in files" if unlisted else None


def listed_keys(meta: dict) -> dict[str, dict[str, tuple[tuple[int, ...], str] | None]]:
    """file -> key -> (shape, dtype code) of each box ``metadata.json`` says the file holds (None for
    the per-rank RNG tensors, whose shapes it does not record)."""
    keys: dict[str, dict[str, tuple[tuple[int, ...], str] | None]] = {}
    for t in meta["tensors"].values():
        for s in t["shards"]:
            keys.setdefault(s["file"], {})[s["key"]] = (box_shape(s["box"]), t["dtype"])
    for r in meta["ranks"]:
        keys.setdefault(r["file"], {}).update(dict.fromkeys(r["rng"]))
    return keys


def _span_problem(have: dict, shape: tuple[int, ...], code: str, data: int) -> str | None:
    """Why the bytes ``have["data_offsets"]`` gives a tensor of ``shape`` and dtype ``code`` are not
    exactly its bytes within the ``data`` bytes of its file (the reader allocates the box before
    safetensors reads the file: a header claiming more than the file holds would be allocated)."""
    span, want = have.get("data_offsets"), math.prod(shape) * _ITEMSIZE[code]
    if not (isinstance(span, list) and len(span) == 2 and all(_count(x) for x in span)):
        return f"data_offsets {span!r}, not [start, stop]"
    if span[1] - span[0] != want or span[1] > data:
        return f"data_offsets {span}, not its {want} bytes within the file's {data} bytes of data"
    return None


def header_problem(path: Path, rel: str, listed: dict[str, tuple[tuple[int, ...], str] | None]) -> str | None:
    """Why the tensors of rank file ``rel`` (its checksum matched) are not those ``metadata.json``
    lists for it: a key missing, another shape or dtype than its box (an edited metadata.json
    would otherwise load the wrong elements), or bytes not its own inside the file (:func:`_span_problem`)."""
    try:
        header, data = read_tensor_header(path)
    except (OSError, ValueError) as e:
        return f"{rel} is not a safetensors file: {e}"
    for key, want in listed.items():
        have = header.get(key)
        if not isinstance(have, dict):
            return f"{rel} has no tensor {key!r}, which {METADATA} lists"
        if want is not None and [list(want[0]), want[1]] != [have.get("shape"), have.get("dtype")]:
            return (
                f"{rel} holds {key!r} as {have.get('dtype')} {have.get('shape')}, but {METADATA} lists it as "
                f"{want[1]} {list(want[0])}"
            )
        if want is not None and (why := _span_problem(have, want[0], want[1], data)):
            return f"{rel} holds {key!r} with {why}"
    spans = sorted((header[k]["data_offsets"], k) for k, want in listed.items() if want is not None)
    shared = next((k for (a, _), (b, k) in zip(spans, spans[1:]) if b[0] < a[1]), None)
    return f"{rel} holds {shared!r} in bytes another listed tensor holds too" if shared else None
