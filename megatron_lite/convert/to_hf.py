"""``convert to-hf``: one of our checkpoints -> a directory ``transformers`` loads offline.

Output: ``config.json`` (``LlamaConfig`` or ``GPT2Config``; ``MistralConfig`` for a checkpoint
imported from a Mistral, see ``checkpoint/hf.py``; with ``torch_dtype`` beside ``dtype`` and a
llama's ``rope_theta`` also at the top level, where transformers 4 reads them), ``model.safetensors`` (or shards with
``model.safetensors.index.json`` above ``max_shard_size``), ``generation_config.json``, tokenizer
files (``convert/tokenizer.py``), ``megatron_lite.json`` (source checkpoint, step, the checkpoint's
lineage as saved: code commit, Python, the run's working directory, dataset fingerprints, tokenizer
sha256; full run config, tokenizer metadata) and a model card ``README.md`` that shows that lineage.

Streaming: tensors are read, transformed and written one at a time at offsets planned from the
checkpoint's headers, so memory holds about one tensor (plus its split parts), never the model.
Measured with ``--no-verify``: a 1.58 GB fp32 model raised anonymous memory by the same ~60 MB as
an 18 MB one (imports); RSS still grows by the checkpoint's pages, which safetensors reads through
mmap, as reclaimable page cache.
Nothing here touches a GPU. Everything is written to ``.tmp-<out>`` first and renamed to ``out`` (or
moved into it, when it is an existing empty directory such as ``--out .``) only once the verification
(``convert/verify.py``) passed; a failed write (a full disk) removes it and is reported in one line.
``--out`` is checked before the checkpoint is read: not blank, new or an empty directory, and outside
every checkpoint directory (a training run's saves there prune and replace directories). A checkpoint
removed or replaced while it is read (a run still saving prunes it) is one error saying so.

That staging directory sits beside ``--out``, in a directory the user owns, so it is marked as ours
(:data:`STAGING_MARKER`: which run, when, for which ``--out``). The exporter holds an exclusive
``flock`` on that marker from the moment it appears until the export ends
(``tempfiles.create_locked``); the kernel drops it however the process ends. One left by an earlier
run (killed, or kept after a failed verification for inspection) is removed with a warning only when
it carries the marker, holds nothing but files an export writes, and its marker's lock can be taken
(``tempfiles.locked_if_abandoned``): a run still writing holds it, on this host or any other sharing
the filesystem. Where the filesystem has no locks nothing is removed. Anything else there is refused
in one error naming the path and what to do, and left untouched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from megatron_lite import jsontext
from megatron_lite.checkpoint.hf import ADAPTERS, check_exportable, export_config, export_type
from megatron_lite.checkpoint.storage import commit_stamp, kept_while_read
from megatron_lite.config import ModelConfig
from megatron_lite.convert.card import model_card
from megatron_lite.convert.io import (
    CheckpointSource,
    ShardedWriter,
    open_checkpoint,
    refuse_out_in_checkpoints,
    refuse_used_out,
)
from megatron_lite.convert.tokenizer import special_ids, write_hf_tokenizer
from megatron_lite.convert.verify import VerifyResult, verify
from megatron_lite.data.tempfiles import create_locked, locked_if_abandoned
from megatron_lite.errors import UserError, refuse_blank

DEFAULT_MAX_SHARD = 5 * 10**9  # HF Hub's long-standing default shard size
STAGING_MARKER = ".megatron-lite-to-hf"
"""The file that makes a ``.tmp-<out>`` directory recognisably an unfinished export of ours."""
_EXPORT_FILE = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|megatron_lite)\.json|tokenizer\.model|README\.md"
    r"|model(-\d{5,}-of-\d{5,})?\.safetensors|model\.safetensors\.index\.json"
)
"""Every file name an export writes (what a staging directory of ours may hold besides the marker)."""
log = logging.getLogger(__name__)


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


def _remove_stale_staging(tmp: Path, out: Path) -> None:
    """Remove ``tmp`` if it is an unfinished export of ours that no live run is writing; else one
    :class:`UserError` naming it and what to do, with nothing changed there."""
    marker = tmp / STAGING_MARKER
    if tmp.is_symlink() or not tmp.is_dir() or not marker.is_file():
        raise UserError(
            f"{tmp} is in the way: to-hf writes the export for --out {out} there first, and it is not an unfinished "
            f"export of ours (no {STAGING_MARKER} in it), so it was left untouched; move or delete it, or choose "
            "another --out"
        )
    ours = {STAGING_MARKER} | {p.name for p in tmp.iterdir() if _EXPORT_FILE.fullmatch(p.name) and p.is_file()}
    foreign = sorted(p.name for p in tmp.iterdir() if p.name not in ours)
    if foreign:
        raise UserError(
            f"{tmp}, an unfinished export an earlier to-hf left, now also holds {foreign[0]}, which to-hf does not "
            "write, so it was left untouched; move what you want to keep out of it and delete it, or choose another "
            "--out"
        )
    try:
        info = jsontext.loads(marker.read_text())
    except (OSError, ValueError):
        info = {}
    info = info if isinstance(info, dict) else {}
    run = f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
    try:
        with locked_if_abandoned(marker) as abandoned:
            if abandoned is None:
                raise UserError(
                    f"{tmp} holds an unfinished export for --out {out} ({run}), and its filesystem has no file locks, "
                    "so to-hf cannot tell whether that run is still writing it; nothing was removed: if no to-hf run "
                    f"is writing it, delete it by hand (rm -r {tmp}) and run again, or choose another --out"
                )
            if not abandoned:
                raise UserError(
                    f"another to-hf run ({run}) is writing the export for --out {out} in {tmp} (it holds the lock on "
                    f"{STAGING_MARKER}); wait for it to finish or choose another --out"
                )
            log.warning("removing %s, an unfinished export left by an earlier to-hf run (%s)", tmp, run)
            shutil.rmtree(tmp)  # the lock held meanwhile: no run can take it over
    except OSError as e:
        raise UserError(f"cannot remove {tmp}, an unfinished export an earlier to-hf left: {e}; delete it") from None


def _prepare_out(out: Path, checkpoint: Path) -> tuple[Path, BinaryIO]:
    """The temporary directory beside ``out`` (absolute: ``--out .`` works) that the export is written to,
    created with its marker, and the marker's open file, locked from its creation: the export's caller
    holds it open until the export ends. One left by an earlier run is removed only when it is
    recognisably ours and abandoned."""
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists() or tmp.is_symlink():
        _remove_stale_staging(tmp, out)
    try:
        tmp.mkdir(parents=True)
    except FileExistsError:
        raise UserError(
            f"{tmp} appeared while to-hf was starting: another to-hf run is writing the export for --out {out}; "
            "wait for it to finish or choose another --out"
        ) from None
    except OSError as e:
        raise _write_error(out, e) from None
    info = {
        "format": "megatron-lite/to-hf-staging-v1",
        "out": str(out),
        "checkpoint": str(checkpoint),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    with _removed_on_error(tmp, out):  # ours from here on
        held = create_locked(tmp / STAGING_MARKER, (json.dumps(info) + "\n").encode())
    return tmp, held


@contextlib.contextmanager
def _removed_on_error(tmp: Path, out: Path, writing: bool = True) -> Iterator[None]:
    """Any failure removes the unfinished export in ``tmp``; while ``writing``, an OSError (disk full,
    I/O error) is a :class:`UserError` naming the OS's reason and ``--out``."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if writing and isinstance(e, OSError):
            raise _write_error(out, e) from None
        raise


def _kept(src: CheckpointSource, stamp: tuple[int, int] | None) -> contextlib.AbstractContextManager[None]:
    return kept_while_read(src.path, stamp, "converted", "convert the copy; nothing was written to --out")


def _write_error(out: Path, e: OSError) -> UserError:
    return UserError(
        f"cannot write the export to {out}: {type(e).__name__}: {e}; nothing was left there "
        "(free some space or choose another --out, then run again)"
    )


def _install(tmp: Path, out: Path) -> None:
    """Move the finished export from ``tmp`` to ``out``: a rename, or into ``out`` itself when it is an
    existing empty directory (the current directory, a mount point)."""
    if not out.exists():
        tmp.rename(out)
        (out / STAGING_MARKER).unlink()  # after the rename: a crash in between leaves a complete export
        return
    moved = []
    try:
        for entry in sorted(tmp.iterdir()):
            if entry.name == STAGING_MARKER:
                continue
            target = out / entry.name
            if target.exists() or target.is_symlink():  # saved there while the export was being written
                raise UserError(
                    f"{target} appeared while the export was being written, and it is not overwritten: the export "
                    f"was not installed and {out} is as it was; choose a new --out (or empty it) and run again"
                )
            moved.append(Path(shutil.move(str(entry), str(target))))
    except BaseException:
        for path in moved:  # out was empty: leave it so
            path.unlink(missing_ok=True)
        raise
    (tmp / STAGING_MARKER).unlink()
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
    lineage = {
        "format": "megatron-lite/hf-export-v1",
        "checkpoint": str(src.path.resolve()),
        "step": src.meta.get("step"),
        "consumed_samples": src.consumed_samples,
        "lineage": src.meta.get("lineage"),
        "config": src.config.to_dict(),
        "origin": src.origin,
        "tokenizer_converted": True,
        "tokenizer": src.tokenizer_record,
    }
    (tmp / "megatron_lite.json").write_text(json.dumps(lineage, indent=1) + "\n")


def _write_config(hf_config: Any, m: ModelConfig, tmp: Path) -> None:
    """``config.json``, with the keys transformers 4 (which vLLM and many fine-tuning setups still run)
    reads where transformers 5 writes others: ``torch_dtype`` beside ``dtype`` (without it, before 4.56,
    a bf16 export loads as fp32, twice the memory), and a llama's ``rope_theta`` at the top level too
    (transformers 5 writes it only inside ``rope_parameters``; transformers 4 reads only the top-level
    key, silently taking 10000 without it). transformers 5 reads either."""
    hf_config.save_pretrained(str(tmp))
    path = tmp / "config.json"
    config = json.loads(path.read_text())
    if "dtype" in config:
        config.setdefault("torch_dtype", config["dtype"])
    if m.arch == "llama":
        config["rope_theta"] = float(m.rope_theta)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # as save_pretrained writes it


def _write_export(
    src: CheckpointSource, name_map: dict, hf_config: Any, ids: dict, tmp: Path, max_shard_size: int
) -> int:
    """Weights, configs, tokenizer and lineage into ``tmp``; returns the parameter count."""
    n_params = _write_weights(src, name_map, tmp, max_shard_size)
    _write_config(hf_config, src.config.model, tmp)
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
    refuse_blank("--checkpoint", checkpoint, "read")
    refuse_blank("--out", out)  # the --out checks come before the checkpoint's checksums are read
    refuse_out_in_checkpoints(Path(out), checkpoint)
    refuse_used_out(Path(out))
    src = open_checkpoint(checkpoint, step)
    stamp = commit_stamp(src.path)
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
    with _kept(src, stamp):
        ids = special_ids(src.tokenizer)
    hf_config = export_config(m, ids, src.specs["embed.weight"][1], src.origin)  # refuses what HF cannot express
    out, dest = Path(out), Path(os.path.abspath(out))  # dest: `--out .` has a name and a parent
    tmp, held = _prepare_out(dest, src.path)  # only now, after every check, is anything written
    with held:  # its lock marks this export as alive until it ends, however it ends
        with _removed_on_error(tmp, out), _kept(src, stamp):
            n_params = _write_export(src, name_map, hf_config, ids, tmp, max_shard_size)
        with _removed_on_error(tmp, out, writing=False), _kept(src, stamp):  # reads: not the output's error
            result = verify(src.path, tmp) if check else None
        if result is not None and not result.passed:
            raise UserError(
                f"verification failed, so {out} was not written ({result.summary()}); "
                f"the unverified export is left in {tmp} for inspection (the next to-hf run to {out} removes it)"
            )
        from megatron_lite.data.tokenizer import Tokenizer

        with _removed_on_error(tmp, out):
            with _kept(src, stamp):
                card = model_card(src, adapter.hf_class, n_params, Tokenizer(src.tokenizer).vocab_size, result)
            (tmp / "README.md").write_text(card)
            _install(tmp, dest)
    return ExportResult(out, n_params, sorted(p.name for p in out.iterdir()), result)
