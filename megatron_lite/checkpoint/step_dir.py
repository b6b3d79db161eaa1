"""One step directory of a sharded checkpoint (the format: ``format.py``): verifying it, reading it.

Verification is collective and its verdict identical on every rank: rank 0 reads
``metadata.json``, checks its structure (``integrity.metadata_problem``) and broadcasts it, the files
are checked round-robin (file i by rank i % world: present, of the recorded size, of the recorded
sha256, a rank file holding every key ``metadata.json`` lists for it in its box's shape), and every
rank receives every rank's findings.

Reading is by box: :meth:`CheckpointReader.read_box` assembles any box of a global tensor from
the boxes that overlap it, each read with safetensors' ``get_slice`` (only the overlap is read).
Loading never unpickles anything: tensors come from safetensors, the rest from JSON.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_lite import jsontext
from megatron_lite.checkpoint import collectives
from megatron_lite.checkpoint.boxes import Box, box_numel, box_shape, full_box, intersect, relative
from megatron_lite.checkpoint.format import METADATA, OLDER_METADATA, STEP_DIR
from megatron_lite.checkpoint.integrity import header_problem, listed_keys, metadata_problem
from megatron_lite.checkpoint.storage import Storage
from megatron_lite.config import Config, config_from_dict
from megatron_lite.errors import UserError

OLDER_FORMAT = (
    f"it holds {OLDER_METADATA}, not {METADATA}: a checkpoint of the older one-process format "
    "(megatron-lite/local-v1), which this version cannot read; train on from it with the megatron-lite "
    "version that saved it"
)
"""The problem of a step directory of that format (``format.py``): committed, so never a fresh start."""


class CheckpointReader:
    """One verified checkpoint: its metadata, and its tensors box by box."""

    def __init__(self, storage: Storage, name: str, meta: dict[str, Any]) -> None:
        self.storage, self.name, self.meta = storage, name, meta
        self._handles: dict[str, Any] = {}
        self._shards = {
            tensor: [(tuple(map(tuple, s["box"])), s["file"], s["key"]) for s in info["shards"]]
            for tensor, info in meta["tensors"].items()
        }

    @property
    def location(self) -> str:
        """The step directory (a path or URL)."""
        return self.storage.url(self.name)

    @property
    def path(self) -> Path:
        """The step directory as a local path (the converter and eval read local checkpoints)."""
        return Path(self.location)

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def weights_only(self) -> bool:
        return bool(self.meta["weights_only"])

    @property
    def config(self) -> Config:
        """The run config saved with the checkpoint; a key or value this version cannot read is one
        error naming the checkpoint (rather than the user's own config)."""
        try:
            return config_from_dict(self.meta["config"])
        except UserError as e:
            raise UserError(
                f"checkpoint {self.location}: the config in its {METADATA} cannot be read: {e} (saved by another "
                f"megatron-lite version, or edited); use the version that saved it, or another checkpoint"
            ) from None

    def shapes(self, kind: str) -> dict[str, tuple[int, ...]]:
        """Global shape of every tensor of ``kind`` (``model``, ``exp_avg``...), by parameter name."""
        prefix = f"{kind}/"
        return {n[len(prefix) :]: tuple(i["shape"]) for n, i in self.meta["tensors"].items() if n.startswith(prefix)}

    def _slice(self, file: str, key: str):
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = safe_open(str(self.storage.fetch(f"{self.name}/{file}")), framework="pt")
        try:
            return self._handles[file].get_slice(key)
        except Exception as e:  # safetensors' own error: the file passed its checksum, so metadata.json is wrong
            raise UserError(
                f"checkpoint {self.location}: {file} has no tensor {key!r}, which {METADATA} lists "
                f"({type(e).__name__}): the checkpoint is damaged; use another one (moved out of checkpoint.dir, "
                "checkpoint.resume=auto takes the next newest)"
            ) from None

    def read_box(self, name: str, box: Box) -> torch.Tensor:
        """``box`` of global tensor ``name``, in its stored dtype, from every stored box overlapping it."""
        if name not in self._shards:
            raise UserError(f"checkpoint {self.location} has no tensor {name}")
        out, covered = None, 0
        for stored, file, key in self._shards[name]:
            common = intersect(box, stored)
            if common is None:
                continue
            part = self._slice(file, key)[relative(common, stored)]
            if out is None:
                out = torch.empty(box_shape(box), dtype=part.dtype)
            out[relative(common, box)] = part
            covered += box_numel(common)
        if covered != box_numel(box):  # stored boxes never overlap, so anything else is a hole
            raise UserError(f"checkpoint {self.location}: {name}{list(box)} is only partly stored ({covered} elements)")
        return out

    def read_tensor(self, name: str) -> torch.Tensor:
        """The whole global tensor ``name``."""
        return self.read_box(name, full_box(self.meta["tensors"][name]["shape"]))

    def model_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(parameter name, tensor)`` of the model one at a time: memory holds one tensor."""
        for name in self.shapes("model"):
            yield name, self.read_tensor(f"model/{name}")

    def model_state(self) -> dict[str, torch.Tensor]:
        """The whole single-device state dict (weights-only starts, evaluation)."""
        return dict(self.model_tensors())

    def rank_tensor(self, rank: int, key: str) -> torch.Tensor:
        """A per-rank tensor (RNG state) from ``rank``'s file."""
        entry = self.meta["ranks"][rank]
        return self._slice(entry["file"], key)[:]

    def local_file(self, rel: str) -> Path | None:
        """A local copy of a file stored beside the tensors (``tokenizer.model``), None if absent."""
        if rel not in self.meta["files"]:
            return None
        return self.storage.fetch(f"{self.name}/{rel}")

    def close(self) -> None:
        self._handles.clear()
        self.storage.close()


def read_metadata(storage: Storage, name: str) -> tuple[dict | None, str | None]:
    """(metadata, None) when step directory ``name`` has a ``metadata.json`` of the schema whose step is
    its name's, else (None, problem). One process's read: the files are not checked."""
    try:
        meta = jsontext.loads(storage.read_text(f"{name}/{METADATA}"))
    except FileNotFoundError:
        if storage.exists(f"{name}/{OLDER_METADATA}"):
            return None, OLDER_FORMAT
        return None, f"{METADATA} is missing (never committed)"
    except (ValueError, UnicodeDecodeError):
        return None, f"{METADATA} is not valid JSON"
    except OSError as e:
        return None, f"{METADATA} cannot be read: {e}"
    problem = metadata_problem(meta)
    named = STEP_DIR.match(name)
    if not problem and named and int(named.group(1)) != meta["step"]:  # resuming it would restart at its step
        problem = f"{METADATA} is of step {meta['step']}, not of {name} (renamed or copied?)"
    return (None, problem) if problem else (meta, None)


def _check_files(storage: Storage, name: str, meta: dict, rank: int, size: int) -> str | None:
    listed = listed_keys(meta)
    for i, (rel, info) in enumerate(sorted(meta["files"].items())):
        if i % size != rank:
            continue
        got = storage.size(f"{name}/{rel}")
        if got is None:
            return f"{rel} is missing"
        if got != info["bytes"]:
            return f"{rel} has {got} bytes, expected {info['bytes']} (truncated?)"
        try:
            if storage.sha256(f"{name}/{rel}") != info["sha256"]:
                return f"{rel} does not match its sha256 (corrupt)"
            if rel in listed and (why := header_problem(storage.fetch(f"{name}/{rel}"), rel, listed[rel])):
                return why
        except OSError as e:  # a problem like any other: this rank must still reach the all-gather
            return f"{rel} cannot be read: {e}"
    return None


def verify(storage: Storage, name: str) -> tuple[dict | None, str | None]:
    """(metadata, None) when step directory ``name`` is complete and intact, else (None, problem).
    Collective: every rank calls it and gets the same answer."""
    rank, size = collectives.world()
    meta, problem = collectives.broadcast(read_metadata(storage, name) if rank == 0 else None)
    if problem:
        return None, problem
    found = [p for p in collectives.all_gather(_check_files(storage, name, meta, rank, size)) if p]
    return (None, found[0]) if found else (meta, None)
