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
                                         # this step less trainer.skipped_steps and the config's
                                         # optim.lr, min_lr, warmup, decay_steps, decay_style,
                                         # wsd_decay_steps, wsd_decay_shape
      "trainer": {"skipped_steps": 0, "consumed_samples": 800,
                  "scaler": {"scale": 65536.0, "clean_steps": 3} | null,
                  "skip_streak": {"in_a_row": 0, "since": 0}},   # skipped steps in a row, from step since
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
``metadata.json``, with one that does not hold the schema above (``integrity.metadata_problem``: a key
missing or of the wrong type, a value out of range such as a negative count, a box outside its
tensor or boxes not holding each of its elements exactly once, ``ranks`` not one entry per rank of
``layout.world_size``, a file name that is a path such as ``../x``), or with a file whose size or
sha256 differs, or a rank file without a key ``metadata.json`` lists for it in that box's shape and
dtype, its bytes inside the file (``integrity.header_problem``: ``metadata.json`` has no checksum of its
own), or whose ``step`` is not its name's (``step_00000100``: copied or renamed), is corrupt.

A step directory holding ``meta.json`` instead (:data:`OLDER_METADATA`) is a committed checkpoint of the
one-process format that came before this one (``meta.json``, ``model.safetensors``, ``state.pt``;
format ``megatron-lite/local-v1``): this format's readers do not read it, and count it as committed, so
that ``checkpoint.resume=auto`` refuses it rather than start the run over and save over it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from megatron_lite import jsontext
from megatron_lite.checkpoint.boxes import Box

FORMAT = "megatron-lite/sharded-v1"
METADATA = "metadata.json"
OLDER_METADATA = "meta.json"
"""The commit record of the one-process format before this one (see above)."""
LATEST = "latest"
TMP_PREFIX = ".tmp-"
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
