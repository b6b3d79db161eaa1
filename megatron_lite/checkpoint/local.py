"""One-process checkpoints: the whole training state of a single rank in one directory.

Layout of ``<dir>/step_00000100/``: ``model.safetensors`` (the model's parameters by their
documented names, readable tensor by tensor), ``state.pt`` (optimizer, RNG, data position, step;
loaded with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects), extra
files such as the tokenizer, and ``meta.json`` (step, resolved config, sha256 of every file).

A save writes a hidden temporary directory, fsyncs it and renames it into place, then replaces
``<dir>/latest``: a crash at any
moment leaves the previous checkpoints intact. Only the newest ``keep`` are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from megatron_lite.errors import UserError

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Committed checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def iter_model_tensors(path: str | Path):
    """Yield ``(name, tensor)`` of a verified checkpoint's model one tensor at a time (bounded memory)."""
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            yield name, f.get_tensor(name)


def save_checkpoint(
    root: str | Path,
    step: int,
    state: dict[str, Any],
    config: dict,
    keep: int,
    files: dict[str, Path] | None = None,
) -> Path:
    """Write ``state`` as the checkpoint of ``step`` under ``root``; prune to the newest ``keep``.

    ``files`` (name -> source) are copied in too, e.g. the tokenizer, so a checkpoint stands alone.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = dict(state)
    model = {k: v.detach().contiguous().cpu() for k, v in state.pop("model").items()}
    save_file(model, tmp / "model.safetensors", metadata={"format": "pt"})
    with (tmp / "state.pt").open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    for name, src in (files or {}).items():
        shutil.copyfile(src, tmp / name)
    names = ["model.safetensors", "state.pt", *(files or {})]
    meta = {
        "step": step,
        "format": "megatron-lite/local-v1",
        "config": config,
        "sha256": {name: _sha256(tmp / name) for name in names},
    }
    _write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
    if final.exists():  # re-saving a step (e.g. after a resume) replaces it only once the new one is complete
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / "latest", final.name + "\n")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> str | None:
    """None when ``path`` is a complete checkpoint with matching checksums, else what is wrong."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return "meta.json is missing"
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        return "meta.json is not valid JSON"
    for name, digest in meta.get("sha256", {}).items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if _sha256(path / name) != digest:
            return f"{name} does not match its checksum (truncated or corrupt)"
    return None


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of one checkpoint directory, verified first."""
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem:
        raise UserError(f"checkpoint {path} is unusable: {problem}")
    meta = json.loads((path / "meta.json").read_text())
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    state["model"] = load_file(path / "model.safetensors")
    return state, meta


def resolve_resume(root: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``none`` -> None; a path -> it; ``auto`` -> the newest good
    one under ``root`` (skipping corrupt ones with a warning), None only when there are none."""
    if resume == "none":
        return None
    if resume != "auto":
        p = Path(resume)
        if not p.is_dir():
            raise UserError(f"checkpoint.resume={resume!r} is not a checkpoint directory")
        return p
    candidates = list_checkpoints(root)
    for p in reversed(candidates):
        problem = verify_checkpoint(p)
        if problem is None:
            return p
        log.warning("skipping checkpoint %s: %s", p, problem)
    if candidates:
        raise UserError(
            f"every checkpoint under {root} is corrupt; refusing to start from scratch. "
            "Fix or move them, or set checkpoint.resume=none"
        )
    return None


def find_checkpoint(path: str | Path) -> Path:
    """A step directory as given, or the newest good one under a run's checkpoint directory."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    found = resolve_resume(p, "auto") if p.is_dir() else None
    if found is None:
        raise UserError(f"no checkpoint found at {str(p)!r} (expected a step_XXXXXXXX directory or its parent)")
    return found
