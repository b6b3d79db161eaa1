"""``convert from-hf``: a Llama, Mistral, Qwen2 or GPT-2 HF directory -> one of our checkpoints.

The result is ``<out>/step_00000000`` written by :func:`save_weights`, holding the weights only:
its metadata says ``"weights_only": true`` and it has no optimizer, scaler, data position or
RNG, because a fresh optimizer must take its hyperparameters from the new run's config, not from
a made-up state. The trainer starts such a checkpoint at step 0 with a fresh optimizer.
``<out>/config.yaml`` is the default config (``Config()``) with only what the weights fix: the
``model`` section, ``data.tokenizer`` (when a sentencepiece model is copied in) and
``checkpoint.init_from`` pointing at them (so a rerun resumes from the run's own checkpoints).
Everything else is the new run's to choose and stays at its default, even for a model this project
exported (whose ``megatron_lite.json`` records the source run's config): that run's parallel
layout, length, learning-rate schedule, data and directories would not fit another run. Its
checkpoint, step and lineage are kept in ``origin.json`` as ``exported_from`` (the record of where
the weights were trained, which a later ``to-hf`` carries on and shows in the model card, and a
later ``from-hf`` of that export keeps); the checkpoint's own lineage stays empty: it trained nothing.

Tokenizer: a sentencepiece ``tokenizer.model`` (Llama 2, Mistral, our own exports) is copied in
and becomes ``data.tokenizer`` (refused when it has more pieces than ``vocab_size``). Byte-level BPE
tokenizers (GPT-2, Llama 3) cannot be expressed in sentencepiece; their path is recorded in
``origin.json`` and data must be tokenized to the same ids outside megatron-lite: the import warns,
and the trainer refuses to train such a checkpoint on the embedded corpus (``training/preflight.py``),
whose ids are megatron-lite's own tokenizer's.

Memory: the weights are held once (``save_weights`` takes the whole state); HF tensors keep
their dtype (bf16 stays bf16; the trainer's fp32 parameters upcast them on load). Weights that mix
dtypes (bf16 matrices, fp32 norms) are recorded as fp32, the dtype a later ``to-hf`` writes them in,
so that no value is rounded.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_lite.checkpoint.hf import Adapter, import_config
from megatron_lite.checkpoint.writer import save_weights
from megatron_lite.config import Config, ModelConfig
from megatron_lite.convert.compare import refuse_config_mismatch, refuse_other_task, unused_tensor_problem
from megatron_lite.convert.io import (
    HFWeights,
    read_export_record,
    read_hf_config,
    refuse_out_in_checkpoints,
    refuse_used_out,
)
from megatron_lite.convert.tokenizer import (
    REQUIRED_SENTENCEPIECE,
    find_sentencepiece,
    piece_count,
    record_of_model,
    unexportable,
)
from megatron_lite.errors import UserError, refuse_blank

log = logging.getLogger(__name__)


@dataclass
class ImportResult:
    """The written checkpoint and the run config that trains from it."""

    checkpoint: Path
    config_path: Path
    parameters: int
    tokenizer: Path | None


def _import_tensors(adapter: Adapter, m: ModelConfig, weights: HFWeights, model_type: str) -> dict[str, torch.Tensor]:
    """Our state dict from the HF tensors, checking that every HF tensor is used or safely droppable."""
    from megatron_lite.models.transformer import Transformer

    by_hf = weights.full_names(adapter)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(m).state_dict().items()}
    state, used = {}, set()
    for ours, (hf_names, transform) in adapter.name_map(m).items():
        missing = [h for h in hf_names if h not in by_hf]
        if missing:
            raise UserError(f"the Hugging Face checkpoint lacks {missing[0]} (needed for {ours})")
        state[ours] = transform.from_hf([weights.get(by_hf[h]) for h in hf_names], m)
        used.update(hf_names)
        if tuple(state[ours].shape) != expected[ours]:
            raise UserError(f"{ours}: shape {tuple(state[ours].shape)} from HF, expected {expected[ours]}")
    problem = unused_tensor_problem(adapter, m, weights, used)  # buffers, tied head, zero biases: dropped
    if problem:
        raise UserError(f"{problem}, so this {model_type} model cannot be imported exactly")
    return state


def _run_config(m: ModelConfig, tokenizer: Path | None) -> Config:
    """The config to train from (see the module docstring): defaults, the model, the tokenizer."""
    cfg = Config()
    cfg.model = m
    cfg.data.tokenizer = str(tokenizer) if tokenizer else None
    return cfg


def _extra_files(hf_dir: Path, sp: Path | None, raw: dict, tmp: Path) -> dict[str, Path]:
    """tokenizer.model, our tokenizer metadata (for our own exports) and origin.json, as save_weights files."""
    files, record = {"tokenizer.model": sp} if sp else {}, read_export_record(hf_dir)
    tok_meta = record_of_model(record.get("tokenizer"), hf_dir / "megatron_lite.json", sp)
    if sp and tok_meta:
        (tmp / "tokenizer.json").write_text(json.dumps(tok_meta, indent=1) + "\n")
        files["tokenizer.json"] = tmp / "tokenizer.json"
    origin = {
        "format": "megatron-lite/hf-import-v1",
        "path": str(hf_dir.resolve()),
        "model_type": raw["model_type"],
        "hf_config": raw,
        "tokenizer": "tokenizer.model (sentencepiece, copied)" if sp else f"Hugging Face tokenizer at {hf_dir}",
        "exported_from": _exported_from(record),
    }
    (tmp / "origin.json").write_text(json.dumps(origin, indent=1) + "\n")
    files["origin.json"] = tmp / "origin.json"
    return files


def _exported_from(record: dict[str, Any]) -> dict[str, Any] | None:
    """Where the weights of a megatron-lite export (``record``: its ``megatron_lite.json``) were trained:
    the exported checkpoint, step and lineage; for an export of an import, whose checkpoint trained
    nothing (no lineage), the ``exported_from`` its origin carries. None for another model's directory."""
    origin = record.get("origin")
    carried = origin.get("exported_from") if isinstance(origin, dict) else None
    if record.get("lineage") is None and isinstance(carried, dict):
        return carried
    return {k: record[k] for k in ("checkpoint", "step", "lineage") if k in record} or None


def _warn_about_tokenizer(hf_dir: Path, sp: Path | None, out: Path) -> None:
    """Say at import what the tokenizer will not allow later: training on megatron-lite's own data
    (not sentencepiece), or ``convert to-hf`` (a sentencepiece model it cannot convert exactly)."""
    if sp is None:
        log.warning(
            "the tokenizer of %s is not sentencepiece (tokenizer.json only, e.g. byte-level BPE), so the "
            "checkpoint carries none and megatron-lite cannot tokenize text for this model: train it only with "
            "data.path and data.tokenizer naming datasets tokenized with that tokenizer (%s alone refuses to "
            "start); `convert to-hf` exports the data.tokenizer a run used, so it must give the same ids",
            hf_dir,
            out / "config.yaml",
        )
    elif why := unexportable(sp):
        log.warning(
            "%s uses %s: megatron-lite trains with it, but `convert to-hf` cannot export it back (it converts "
            "only sentencepiece %s), so checkpoints trained with it cannot return to Hugging Face",
            sp,
            why,
            REQUIRED_SENTENCEPIECE,
        )


def _refuse_tokenizer_past_vocab(hf_dir: Path, sp: Path | None, m: ModelConfig) -> None:
    """Refuse a sentencepiece model with more pieces than ``config.json``'s ``vocab_size``: its larger ids
    have no embedding row, so it is not the tokenizer these weights were trained with."""
    pieces = piece_count(sp) if sp else 0
    if pieces > m.vocab_size:
        raise UserError(
            f"{sp} has {pieces} pieces, more than the vocab_size={m.vocab_size} of {hf_dir / 'config.json'}: ids "
            f"{m.vocab_size} and up have no embedding row, so it is not the tokenizer these weights were trained "
            "with; copy the model's own tokenizer.model into the directory"
        )


def from_hf(hf_dir: str | Path, out: str | Path) -> ImportResult:
    """Import an HF model directory as ``<out>/step_00000000`` plus ``<out>/config.yaml``: the
    defaults with only ``model``, ``data.tokenizer`` (when copied) and ``checkpoint.init_from`` set."""
    refuse_blank("--hf", hf_dir, "read")
    refuse_blank("--out", out)
    hf_dir, out = Path(hf_dir), Path(out)
    refuse_used_out(out)  # first: a config.yaml or `latest` already there would be overwritten
    refuse_out_in_checkpoints(out)  # a run's saves there would prune or replace what is written
    raw, adapter, hf_config, weights = read_hf_config(hf_dir)
    sp = find_sentencepiece(hf_dir)
    m = import_config(hf_config)
    refuse_other_task(hf_dir, raw, adapter, m, weights)
    refuse_config_mismatch(hf_dir, adapter, m, weights)  # before any warning: a wrong config.json is the news
    _refuse_tokenizer_past_vocab(hf_dir, sp, m)
    _warn_about_tokenizer(hf_dir, sp, out)
    state = _import_tensors(adapter, m, weights, raw["model_type"])
    tok_dest = (out / "step_00000000" / "tokenizer.model").resolve() if sp else None
    cfg = _run_config(m, tok_dest)
    with tempfile.TemporaryDirectory() as td:
        files = _extra_files(hf_dir, sp, raw, Path(td))
        path = Path(save_weights(out, 0, state, cfg.to_dict(), files))
    cfg.checkpoint.init_from = str(path.resolve())
    cfg.save(out / "config.yaml")
    n_params = sum(t.numel() for t in state.values())
    return ImportResult(path, out / "config.yaml", n_params, tok_dest)
