"""``convert to-hf``: one of our checkpoints -> a directory ``transformers`` loads offline.

Output: ``config.json`` (``LlamaConfig`` or ``GPT2Config``; ``MistralConfig`` for a checkpoint
imported from a Mistral, see ``checkpoint/hf.py``), ``model.safetensors`` (or shards with
``model.safetensors.index.json`` above ``max_shard_size``), ``generation_config.json``, tokenizer
files (``convert/tokenizer.py``), ``megatron_lite.json`` (lineage: source checkpoint, step, full
run config, tokenizer metadata) and a model card ``README.md``.

Streaming: tensors are read, transformed and written one at a time at offsets planned from the
checkpoint's headers, so memory holds about one tensor (plus its split parts), never the model.
Measured with ``--no-verify``: a 1.58 GB fp32 model raised anonymous memory by the same ~60 MB as
an 18 MB one (imports); RSS still grows by the checkpoint's pages, which safetensors reads through
mmap, as reclaimable page cache.
Nothing here touches a GPU. Everything is written to ``.tmp-<out>`` first and renamed to ``out`` (or
moved into it, when it is an existing empty directory such as ``--out .``) only once the verification
(``convert/verify.py``) passed; a failed write (a full disk) removes it and is reported in one line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_lite.checkpoint.hf import ADAPTERS, check_exportable, export_config, export_type
from megatron_lite.convert.card import model_card
from megatron_lite.convert.io import CheckpointSource, ShardedWriter, open_checkpoint, refuse_used_out
from megatron_lite.convert.tokenizer import special_ids, write_hf_tokenizer
from megatron_lite.convert.verify import VerifyResult, verify
from megatron_lite.errors import UserError

DEFAULT_MAX_SHARD = 5 * 10**9  # HF Hub's long-standing default shard size


@dataclass
class ExportResult:
    """Where the export went and what it checked."""

    out: Path
    parameters: int
    files: list[str]
    check: VerifyResult | None


def _check_names(src: CheckpointSource, expected: dict) -> None:
    missing = sorted(set(expected) - set(src.specs))
    extra = sorted(set(src.specs) - set(expected))
    if missing or extra:
        raise UserError(
            f"checkpoint {src.path} does not match its model config: missing {missing[:4]}, unexpected {extra[:4]}"
        )


def _prepare_out(out: Path) -> Path:
    """The temporary directory beside ``out`` (absolute: ``--out .`` works) that the export is written to."""
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


@contextlib.contextmanager
def _removed_on_error(tmp: Path, out: Path, writing: bool = True) -> Iterator[None]:
    """Any failure removes the unfinished export in ``tmp``; while ``writing``, an OSError (disk full,
    I/O error) is a :class:`UserError` naming the OS's reason and ``--out``."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if writing and isinstance(e, OSError):
            raise UserError(
                f"cannot write the export to {out}: {type(e).__name__}: {e}; nothing was left there "
                "(free some space or choose another --out, then run again)"
            ) from None
        raise


def _install(tmp: Path, out: Path) -> None:
    """Move the finished export from ``tmp`` to ``out``: a rename, or into ``out`` itself when it is an
    existing empty directory (the current directory, a mount point)."""
    if not out.exists():
        tmp.rename(out)
        return
    moved = []
    try:
        for entry in sorted(tmp.iterdir()):
            moved.append(Path(shutil.move(str(entry), str(out / entry.name))))
    except BaseException:
        for path in moved:  # out was empty: leave it so
            path.unlink(missing_ok=True)
        raise
    tmp.rmdir()


def _write_weights(src: CheckpointSource, name_map: dict, tmp: Path, max_shard_bytes: int) -> int:
    """Stream every tensor through the adapter into shards; returns the parameter count."""
    m = src.config.model
    plan = []
    for ours, (hf_names, transform) in name_map.items():
        shape, dtype = src.specs[ours]
        plan += [(h, s, dtype) for h, s in zip(hf_names, transform.hf_shapes(shape, m))]
    writer = ShardedWriter(tmp, plan, max_shard_bytes)
    try:
        for ours, t in src.tensors():
            hf_names, transform = name_map[ours]
            for hf_name, part in zip(hf_names, transform.to_hf(t, m)):
                writer.write(hf_name, part)
    except BaseException:
        writer.abort()  # the error that stopped the writing is the one to report
        raise
    writer.close()
    return sum(math.prod(s) for _, s, _ in plan)


def _write_lineage(src: CheckpointSource, tmp: Path) -> None:
    tok_meta = src.tokenizer.with_suffix(".json") if src.tokenizer else None
    lineage = {
        "format": "megatron-lite/hf-export-v1",
        "checkpoint": str(src.path.resolve()),
        "step": src.meta.get("step"),
        "consumed_samples": src.consumed_samples,
        "config": src.config.to_dict(),
        "origin": src.origin,
        "tokenizer_converted": True,
        "tokenizer": json.loads(tok_meta.read_text()) if tok_meta and tok_meta.is_file() else None,
    }
    (tmp / "megatron_lite.json").write_text(json.dumps(lineage, indent=1) + "\n")


def _write_export(
    src: CheckpointSource, name_map: dict, hf_config: Any, ids: dict, tmp: Path, max_shard_size: int
) -> int:
    """Weights, configs, tokenizer and lineage into ``tmp``; returns the parameter count."""
    n_params = _write_weights(src, name_map, tmp, max_shard_size)
    hf_config.save_pretrained(str(tmp))
    from transformers import GenerationConfig

    GenerationConfig(**ids).save_pretrained(str(tmp))
    write_hf_tokenizer(src.tokenizer, tmp, src.config.model.seq_len)
    _write_lineage(src, tmp)
    return n_params


def to_hf(
    checkpoint: str | Path,
    out: str | Path,
    step: int | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD,
    check: bool = True,
) -> ExportResult:
    """Export a checkpoint (a step directory or a run's checkpoint root) as a HF model directory."""
    src = open_checkpoint(checkpoint, step)
    m = src.config.model
    check_exportable(m)  # first: an unsupported model's tensor names differ too, a less useful error
    if src.tokenizer is None:
        raise UserError(
            f"checkpoint {src.path} has no tokenizer.model; to-hf needs the sentencepiece model "
            "(megatron-lite BPE with byte fallback) to write the Hugging Face tokenizer"
        )
    adapter = ADAPTERS[export_type(m, src.origin)]
    name_map = adapter.name_map(m)
    _check_names(src, name_map)
    ids = special_ids(src.tokenizer)
    hf_config = export_config(m, ids, src.specs["embed.weight"][1], src.origin)  # refuses what HF cannot express
    out, dest = Path(out), Path(os.path.abspath(out))  # dest: `--out .` has a name and a parent
    refuse_used_out(out)
    tmp = _prepare_out(dest)  # only now, after every check, is anything written
    with _removed_on_error(tmp, out):
        n_params = _write_export(src, name_map, hf_config, ids, tmp, max_shard_size)
    with _removed_on_error(tmp, out, writing=False):  # reads only: an OSError there is not the output's
        result = verify(src.path, tmp) if check else None
    if result is not None and not result.passed:
        raise UserError(
            f"verification failed, so {out} was not written ({result.summary()}); "
            f"the unverified export is left in {tmp} for inspection"
        )
    from megatron_lite.data.tokenizer import Tokenizer

    with _removed_on_error(tmp, out):
        card = model_card(src, adapter.hf_class, n_params, Tokenizer(src.tokenizer).vocab_size, result)
        (tmp / "README.md").write_text(card)
        _install(tmp, dest)
    return ExportResult(out, n_params, sorted(p.name for p in out.iterdir()), result)
