"""Reading our checkpoints and HF directories, and writing HF safetensors shards tensor by tensor.

Every read of a megatron-lite checkpoint in the converter goes through :func:`open_checkpoint`: a
sharded checkpoint of any layout (``checkpoint/format.py``), whose global tensors it assembles one
at a time from the ranks' boxes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_lite import jsontext
from megatron_lite.checkpoint.format import DTYPE_CODES, LATEST, METADATA, STAGING_DIR, STEP_DIR
from megatron_lite.checkpoint.hf import Adapter, adapter_for
from megatron_lite.checkpoint.reader import (
    CheckpointReader,
    find_checkpoint,
    is_step_dir,
    iter_model_tensors,
    list_steps,
    steps_there,
)
from megatron_lite.checkpoint.shards import check_saved_config, check_saved_tokenizer
from megatron_lite.checkpoint.storage import is_url
from megatron_lite.config import Config
from megatron_lite.convert.tokenizer import piece_count, record_of_model
from megatron_lite.errors import UserError

Shape = tuple[int, ...]
_FROM_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass
class CheckpointSource:
    """What the converter needs of one of our checkpoints, without loading the model."""

    path: Path
    config: Config
    meta: dict[str, Any]
    specs: dict[str, tuple[Shape, torch.dtype]]
    """Tensor name -> (shape, dtype), read from headers only."""
    tokenizer: Path | None
    consumed_samples: int | None
    """Samples the run had trained on (None for a weights-only checkpoint)."""
    origin: dict[str, Any] | None
    """``origin.json`` of a checkpoint imported with ``convert from-hf``."""
    tokenizer_record: Any
    """The checkpoint's ``tokenizer.json`` (the record ``tokenizer train`` writes beside the model,
    which the run copied in), None when it has none."""

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` one at a time: memory holds one tensor, not the model."""
        return iter_model_tensors(self.path)


def _step_dir(checkpoint: str | Path, step: int | None) -> str | Path:
    """The step directory given, the ``step`` one under a run's checkpoint root, or the root itself
    (then the newest good checkpoint is taken)."""
    if step is None:
        return checkpoint
    if is_step_dir(checkpoint):
        parent = str(checkpoint).rstrip("/").rpartition("/")[0] or "."
        raise UserError(
            f"--checkpoint {checkpoint} is a step directory, and --step needs the run's checkpoint directory "
            f"holding the steps: use --checkpoint {parent} --step {step}, or drop --step to convert {checkpoint}"
        )
    found = dict(list_steps(checkpoint))
    if step not in found:
        raise UserError(f"no checkpoint of step {step} under {checkpoint} (steps there: {steps_there(checkpoint)})")
    return Path(checkpoint) / found[step]


def open_checkpoint(checkpoint: str | Path, step: int | None = None) -> CheckpointSource:
    """Open one of our checkpoints (a step directory, or a run's checkpoint root) for conversion:
    verified, with the model's specs in the dtype it trained in (the stored fp32 masters are cast
    to it as they stream)."""
    reader = find_checkpoint(_step_dir(checkpoint, step))
    meta = reader.meta
    dtype = getattr(torch, meta["layout"]["param_dtype"])
    specs = {name: (shape, dtype) for name, shape in reader.shapes("model").items()}
    check_saved_config(reader.location, reader.config, reader.shapes("model"))
    tokenizer = reader.local_file("tokenizer.model")
    if tokenizer is not None:
        check_saved_tokenizer(reader.location, reader.config, piece_count(tokenizer))
    trainer = meta["trainer"] or {}
    return CheckpointSource(
        path=reader.path,
        config=reader.config,
        meta=meta,
        specs=specs,
        tokenizer=tokenizer,
        consumed_samples=trainer.get("consumed_samples"),
        origin=_origin(reader),
        tokenizer_record=_tokenizer_record(reader),
    )


def _tokenizer_record(reader: CheckpointReader) -> Any:
    """The checkpoint's ``tokenizer.json`` when it is the record of its ``tokenizer.model`` (else None, with a
    warning), or one error naming it when it is not JSON (read before the export writes anything)."""
    path = reader.local_file("tokenizer.json")
    fix = (
        "the run copied it into the checkpoint from beside its tokenizer (data.tokenizer, PREFIX.json); "
        f"convert another checkpoint, or a copy of this one with that file valid JSON there and its sha256 and "
        f"bytes updated under files in {METADATA}"
    )
    return None if path is None else record_of_model(read_json(path, fix), path, reader.local_file("tokenizer.model"))


def _origin(reader: CheckpointReader) -> dict[str, Any] | None:
    """The checkpoint's ``origin.json`` (None when it has none), or one error when it is not a JSON object."""
    path = reader.local_file("origin.json")
    if path is None:
        return None
    try:
        origin = jsontext.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        origin = None
    if not isinstance(origin, dict):
        raise UserError(
            f"checkpoint {reader.location}: its origin.json is not a JSON object (edited or damaged); use another "
            "copy of the checkpoint"
        )
    return origin


def refuse_used_out(out: Path) -> None:
    """``--out`` must be new or an empty directory: nothing a user saved there is ever overwritten."""
    if out.exists() and not out.is_dir():
        what = "a file" if out.is_file() else "not a directory"
        raise UserError(f"--out {out} is {what}; choose a new directory to write to (the file was not changed)")
    if out.exists() and any(out.iterdir()):
        raise UserError(
            f"--out {out} already exists and is not an empty directory; choose a new one (nothing there was changed)"
        )


def _checkpoint_root_of(path: Path) -> Path | None:
    """The checkpoint directory (a run's ``checkpoint.dir``) that ``path`` is or lies in, else None."""
    for p in (path, *path.parents):
        if STEP_DIR.match(p.name) and (p / METADATA).is_file():
            return p.parent
        latest = p / LATEST
        try:
            if latest.is_file() and STEP_DIR.match(latest.read_text().strip()):
                return p
            if p.is_dir() and any(STEP_DIR.match(c.name) or STAGING_DIR.match(c.name) for c in p.iterdir()):
                return p
        except OSError:  # unreadable: not one we can tell apart, and not ours to write into anyway
            continue
    return None


def refuse_out_in_checkpoints(out: Path, source: str | Path | None = None) -> None:
    """``--out`` must lie outside every checkpoint directory and outside ``source`` (the checkpoint
    being converted, whatever its name): a training run's saves prune and replace step directories
    and their staging directories, which would delete or replace the export."""
    dest = Path(os.path.realpath(out))
    root = _checkpoint_root_of(dest)
    if root is None and source is not None and not is_url(source):
        src = Path(os.path.realpath(source))
        root = src if dest == src or src in dest.parents else None
    if root is not None:
        name = dest.name if dest != root and not STEP_DIR.match(dest.name) else "hf"
        raise UserError(
            f"--out {out} {'is' if dest == root else 'lies inside'} the checkpoint directory {root}, where a "
            "training run's saves remove and replace directories (the export could be deleted); choose a "
            f"directory outside it, e.g. --out {root.parent / name}"
        )


def read_json(path: Path, fix: str = "restore it from the model's source") -> Any:
    """The JSON in ``path``, or a :class:`UserError` naming the file, what is wrong with it and ``fix``."""
    try:
        return jsontext.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path} is not valid JSON ({e}); {fix}") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read: {e}") from None


def read_export_record(hf_dir: Path) -> dict[str, Any]:
    """``megatron_lite.json`` of an HF directory (what ``to-hf`` records of an export; ``{}`` when
    absent), or one :class:`UserError` naming it when it is not a JSON object."""
    path = hf_dir / "megatron_lite.json"
    if not path.is_file():
        return {}
    record = read_json(path)
    if not isinstance(record, dict):
        raise UserError(
            f"{path} is not a JSON object (what `convert to-hf` writes); restore it from the model's source"
        )
    return record


def hf_load_error(what: str, hf_dir: Path, e: Exception) -> UserError:
    """One line for transformers failing to load ``what`` from ``hf_dir`` (a damaged file, a bad field)."""
    reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return UserError(f"transformers cannot load the {what} in {hf_dir}: {type(e).__name__}: {reason[:400]}")


def read_hf_config(hf_dir: Path) -> tuple[dict[str, Any], Adapter, Any, HFWeights]:
    """(raw ``config.json``, its adapter, the ``transformers`` config object, the weights), or one
    :class:`UserError` naming what is missing, damaged or unsupported (that one before transformers
    reads anything: it builds per-layer state, so a crafted layer count alone would exhaust memory)."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir} is not a Hugging Face model directory: config.json is missing")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a Hugging Face config (a JSON object); restore it from the model's source")
    adapter = adapter_for(raw.get("model_type"))
    weights = HFWeights(hf_dir)  # opens every weights file: missing, truncated or unlisted ones are named
    key = "n_layer" if adapter.arch == "gpt2" else "num_hidden_layers"
    layers, tensors = raw.get(key), len(weights.where)
    if isinstance(layers, int) and layers > tensors:  # each layer holds several tensors
        raise UserError(
            f"{path} does not match the weights in {hf_dir}: it says {key}={layers}, more layers than its "
            f"{tensors} tensors can hold; correct config.json to describe the weights (or restore both from the "
            "model's source)"
        )
    from transformers import AutoConfig

    try:
        return raw, adapter, AutoConfig.from_pretrained(str(hf_dir)), weights
    except Exception as e:  # transformers raises OSError, ValueError, TypeError, its validation errors...
        raise hf_load_error("config", hf_dir, e) from None


def _open_safetensors(path: Path) -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:  # a cut-short copy or download fails the header check
        raise UserError(f"{path} is not a readable safetensors file ({e}); copy or download it again") from None


def _refuse_outside(index: Path, hf_dir: Path, files: list[str]) -> None:
    """Shards are files in the model directory: a name in ``index`` that is absolute or climbs out of
    it (``../x``) would read weights from elsewhere. Lexical, so that a Hugging Face cache snapshot
    (shards symlinked to ``../../blobs/``) stays readable."""
    bad = next((f for f in files if not f or Path(f).is_absolute() or ".." in Path(f).parts), None)
    if bad is not None:
        raise UserError(
            f"{index} names {bad!r} as a shard, which is not a file inside {hf_dir}; restore the index from the "
            "model's source"
        )


class HFWeights:
    """Lazy access to the tensors of an HF directory (``model.safetensors`` or an indexed set of shards).
    Every file is opened (headers read) up front, so a missing or damaged one is reported before any work.
    ``unlisted``: the directory's other ``*.safetensors`` files, which an index leaves out (as transformers does)."""

    def __init__(self, hf_dir: Path) -> None:
        index = hf_dir / "model.safetensors.index.json"
        self.unlisted: list[str] = []
        if index.is_file():
            weight_map = read_json(index)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise UserError(
                    f"{index} has no weight_map of tensor names to files; restore it from the model's source"
                )
            files = sorted(set(weight_map.values()))
            _refuse_outside(index, hf_dir, files)
            missing = [f for f in files if not (hf_dir / f).is_file()]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise UserError(f"{index} lists {missing[0]}{more}, which is not in {hf_dir}; copy every shard")
            self.unlisted = sorted(p.name for p in hf_dir.glob("*.safetensors") if p.name not in files)
        elif (hf_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            bins = sorted(p.name for p in hf_dir.glob("*.bin"))
            shards = sorted(p.name for p in hf_dir.glob("*.safetensors"))
            if bins:
                fix = f"found {', '.join(bins)}: re-save with save_pretrained(safe_serialization=True)"
            elif shards:  # shards without their index: which tensor is in which file is unknown
                more = f" (and {len(shards) - 1} more)" if len(shards) > 1 else ""
                fix = f"found {shards[0]}{more}: copy in the model.safetensors.index.json that maps tensors to them"
            else:
                fix = "copy the model's weights (its *.safetensors files) into it"
            raise UserError(f"no model.safetensors or model.safetensors.index.json in {hf_dir}: {fix}")
        handles = [_open_safetensors(hf_dir / f) for f in files]
        self.where = {name: h for h in handles for name in h.keys()}  # noqa: SIM118 (not a dict)

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)

    def shape(self, name: str) -> Shape:
        """The stored tensor's shape, from its file's header (no data is read)."""
        return tuple(self.where[name].get_slice(name).get_shape())

    def full_names(self, adapter: Adapter) -> dict[str, str]:
        """Full HF name -> stored name (a base-model file leaves out the prefix, :meth:`Adapter.hf_name`)."""
        return {adapter.hf_name(name): name for name in self.where}


class ShardedWriter:
    """Writes planned tensors into safetensors shards in any arrival order, one tensor in memory at a time.

    The ``safetensors`` library can only save a whole dict at once. Since every output shape and
    dtype is known before any data is read, each shard's header is written up front (8-byte
    little-endian length, then JSON with byte offsets) and each tensor is written at its offset
    when it arrives.
    """

    def __init__(self, out: Path, plan: list[tuple[str, Shape, torch.dtype]], max_shard_bytes: int) -> None:
        shards: list[list[tuple[str, Shape, torch.dtype]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = _nbytes(entry[1], entry[2])
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.total_bytes = sum(_nbytes(s, d) for _, s, d in plan)
        self.files = {name: out / fname for fname, shard in zip(names, shards) for name, _, _ in shard}
        self._slots: dict[str, tuple[Any, int, Shape, torch.dtype]] = {}
        self._handles = []
        for fname, shard in zip(names, shards):
            self._open_shard(out / fname, shard)
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {k: p.name for k, p in self.files.items()},
            }
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def _open_shard(self, path: Path, shard: list[tuple[str, Shape, torch.dtype]]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in shard:
            end = offset + _nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keeps the data 8-byte aligned, as safetensors itself does
        f = path.open("wb")
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)
        self._handles.append(f)
        for name, shape, dtype in shard:
            self._slots[name] = (f, 8 + len(blob) + header[name]["data_offsets"][0], shape, dtype)

    def write(self, name: str, t: torch.Tensor) -> None:
        """Write one planned tensor (shape and dtype must match the plan)."""
        f, offset, shape, dtype = self._slots.pop(name)
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise RuntimeError(f"{name}: planned {shape} {dtype}, got {tuple(t.shape)} {t.dtype}")
        f.seek(offset)
        f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        """Flush every shard to disk; an unwritten planned tensor is a bug in the caller."""
        for f in self._handles:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        if self._slots:
            raise RuntimeError(f"tensors planned but never written: {sorted(self._slots)[:5]}")

    def abort(self) -> None:
        """Close every shard after a failure, raising nothing: the caller reports its own error."""
        for f in self._handles:
            with contextlib.suppress(OSError):
                f.close()


def _nbytes(shape: Shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
