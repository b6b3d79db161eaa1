"""The sharded checkpoint format: one directory per step, per-rank tensor files, one metadata file.

Layout of ``<checkpoint.dir>/`` (a local directory or an fsspec URL such as ``s3://bucket/run``)::

    step_00000100/
        metadata.json              written last by rank 0: the commit record (schema below)
        rank_00000.safetensors     what rank 0 owns: boxes of global tensors, its RNG state
        rank_00001.safetensors     ... one file per rank that owns anything (every rank: RNG)
        tokenizer.model            copied in (and tokenizer.json, its record, and origin.json when
        tokenizer.json             present), so a checkpoint stands alone for eval and export
    latest                         "step_00000100\\n", replaced after the step directory is complete
    .tmp-step_00000200/            a save in progress (local storage): renamed when complete
                                   (one a crash left is removed by the next commit)

Tensors: every stored tensor is a BOX (hyper-rectangle) of one GLOBAL tensor, i.e. of the tensor
as the single-device model holds it, vocabulary padding excluded. Global tensor names are
``<kind>/<parameter name>`` with kind ``model`` (the fp32 master weights, or the weights as
imported for a weights-only checkpoint), ``exp_avg`` and ``exp_avg_sq`` (AdamW moments). A TP
shard is one box per contiguous row (or column) range: a fused qkv shard is three boxes, one per
part. A distributed-optimizer shard is a flat element range of the local parameter, split into
at most ``2 * ndim - 1`` boxes that are each contiguous in that order (``boxes.py``). A box held
by several ranks (replicated parameters, KV heads replicated over TP ranks, every data-parallel
replica, a tied embedding's pipeline copy) is written once, by the lowest rank holding it. In a
rank file a box is stored under ``<global name>[a:b,c:d]`` with the box's own shape, so a reader
takes any sub-box with safetensors' ``get_slice`` without reading the rest. Files are safetensors;
everything else is JSON: nothing in a checkpoint is ever unpickled.

``metadata.json`` (all keys always present; ``null`` where not applicable)::

    {
      "format": "megatron-lite/sharded-v1",
      "step": 100,                       # optimizer steps taken
      "weights_only": false,             # true: model weights only (e.g. `convert from-hf`)
      "config": {...},                   # the resolved run config (Config.to_dict())
      "layout": {"world_size": 4, "tp": 2, "pp": 1, "vp": 1, "dp": 2,
                 "distributed_optimizer": true, "param_dtype": "float32"},
      "tensors": {                       # every global tensor and where its boxes are
        "model/layers.0.attn.qkv.weight": {
          "shape": [192, 64], "dtype": "F32",
          "shards": [{"file": "rank_00000.safetensors",
                      "key": "model/layers.0.attn.qkv.weight[0:32,0:64]",
                      "box": [[0, 32], [0, 64]]}, ...]}, ...},
      "optimizer": {"step": 100},        # AdamW's step count (null when weights_only); the LR
                                         # schedule has no state of its own: it is a function of
                                         # this step and train.lr, min_lr, warmup, steps
      "trainer": {"skipped_steps": 0, "consumed_samples": 800,
                  "scaler": {"scale": 65536.0, "clean_steps": 3} | null},
      "ranks": [{"file": "rank_00000.safetensors", "coordinate": [0, 0, 0],   # (pp, dp, tp)
                 "rng": ["rng/torch"]}, ...],          # per-rank RNG state tensors in that file
      "lineage": {"git_commit": "ab1af7e...", "git_dirty": false, "python": "3.11.7",
                  "workdir": "/home/me/project",   # where the run started: its relative paths' base
                  "datasets": [{"prefix": "...", "weight": 1.0, "consumed_samples": 800,
                                "idx_sha256": "...", "bin_bytes": 123, "bin_mtime": 1.7e9}],
                  "tokenizer": {"path": "...", "sha256": "..."}},
      "files": {"rank_00000.safetensors": {"sha256": "...", "bytes": 1234}, ...}
    }

Atomicity: ranks write into the temporary directory; after every rank's file is complete rank 0
writes ``metadata.json`` (with every file's checksum), renames the directory into place, then
replaces ``latest``. Object stores have no rename: there the files go straight to ``step_*/`` and
``metadata.json``, written last in one PUT, is the commit. A step directory without a readable
``metadata.json``, with one that does not hold the schema above (:func:`metadata_problem`: a key
missing or of the wrong type, a value out of range such as a negative count, a box outside its
tensor or boxes not holding each of its elements exactly once, ``ranks`` not one entry per rank of
``layout.world_size``, a file name that is a path such as ``../x``), or with a file whose size or
sha256 differs, or a rank file without a key ``metadata.json`` lists for it in that box's shape and
dtype, its bytes inside the file (:func:`header_problem`: ``metadata.json`` has no checksum of its
own), or whose ``step`` is not its name's (``step_00000100``: copied or renamed), is corrupt.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch

from megatron_lite import jsontext
from megatron_lite.checkpoint.boxes import Box, box_numel, box_shape, tiles

FORMAT = "megatron-lite/sharded-v1"
METADATA = "metadata.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
STATE_KINDS = ("model", "exp_avg", "exp_avg_sq")
STEP_DIR = re.compile(r"^step_(\d{8})$")
STAGING_DIR = re.compile(r"^\.tmp-(replaced-)?step_\d{8}$")
"""What a local save stages in (``.tmp-step_*``) or sets aside while re-saving a step
(``.tmp-replaced-step_*``): the only hidden directories pruning may remove."""
SAVE_FILE = re.compile(r"^rank_\d{5,}\.safetensors$|^metadata\.json$|^\.metadata\.json\.tmp$")
"""Files a save writes into a step directory (besides :data:`EXTRA_FILES`)."""
EXTRA_FILES = ("tokenizer.model", "tokenizer.json", "origin.json")
# safetensors dtype codes (https://github.com/huggingface/safetensors, format description)
DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ITEMSIZE = {code: dtype.itemsize for dtype, code in DTYPE_CODES.items()}
PARAM_DTYPES = {str(d).removeprefix("torch.") for d in DTYPE_CODES if d.is_floating_point}
"""``layout.param_dtype``: the dtype a run trained in (``float32``, ``bfloat16``...)."""


def step_dir_name(step: int) -> str:
    """``step_00000100`` for step 100."""
    return f"step_{step:08d}"


def step_of(name: str) -> int:
    """100 for ``step_00000100``: the inverse of :func:`step_dir_name` (``name`` must match ``STEP_DIR``)."""
    return int(STEP_DIR.match(name).group(1))


def rank_file(rank: int) -> str:
    """``rank_00003.safetensors`` for rank 3."""
    return f"rank_{rank:05d}.safetensors"


def box_key(name: str, box: Box) -> str:
    """The key of a box of global tensor ``name`` in a rank file: ``name[0:32,0:64]``."""
    return f"{name}[{','.join(f'{a}:{b}' for a, b in box)}]"


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32`` (the spelling metadata uses)."""
    return str(dtype).removeprefix("torch.")


def write_tensor_file(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[str, int]:
    """Write ``tensors`` as a safetensors file and fsync it; returns (sha256, bytes).

    Written here rather than with ``safetensors.torch.save_file``, which refuses tensors that share
    storage (our boxes are views of one flat optimizer shard) and would need a contiguous copy of
    each: this writes every tensor's bytes straight from its (contiguous) view and hashes them on
    the way, so a synchronous save costs no extra memory and no read-back.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t in tensors.items():
        end = offset + t.numel() * t.element_size()
        header[key] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte aligned data, as safetensors itself writes
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for chunk in (len(blob).to_bytes(8, "little"), blob):
            f.write(chunk)
            digest.update(chunk)
        for t in tensors.values():
            if t.numel():
                data = memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
                f.write(data)
                digest.update(data)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest(), 8 + len(blob) + offset


def read_tensor_header(path: Path) -> tuple[dict[str, dict], int]:
    """A safetensors file's header (key -> ``{"dtype", "shape", "data_offsets"}``, no ``__metadata__``)
    and the bytes of data after it, which ``data_offsets`` count in; ValueError when it is not one."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        data = path.stat().st_size - 8 - size
        if size <= 0 or data < 0:
            raise ValueError(f"its header length {size} does not fit the file")
        try:
            header = jsontext.loads(f.read(size))
        except ValueError as e:
            raise ValueError(f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    header.pop("__metadata__", None)
    return header, data


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- the structure of metadata.json (the schema above), checked before anything reads it -------
_NULL = type(None)
_TOP = {"step": int, "weights_only": bool, "layout": dict, "tensors": dict, "ranks": list, "files": dict}
_LAYOUT = {"world_size": int, "param_dtype": str}  # what readers index; tp, pp, dp are compared with .get
_TENSOR = {"shape": list, "dtype": str, "shards": list}
_SHARD = {"file": str, "key": str, "box": list}
_RANK = {"file": str, "coordinate": list, "rng": list}
_FILE = {"sha256": str, "bytes": int}
_OPTIMIZER = {"step": int}
_TRAINER = {"skipped_steps": int, "consumed_samples": int, "scaler": (dict, _NULL)}
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
        return f"format {got!r} is not {FORMAT!r} (written by another megatron-lite version)"
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
