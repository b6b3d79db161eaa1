"""Builders the trainer composes: device and dtype, data.

Each takes the resolved config and returns one object, so tests and tools can build exactly what
training builds.
"""

from __future__ import annotations

import glob
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_lite.config import Config, check_vocab_covers
from megatron_lite.data.corpus import prepare_default_corpus
from megatron_lite.data.gpt_dataset import GPTDataset, NoHeldOutSamplesError, held_out_warnings
from megatron_lite.data.inputs import files_glob
from megatron_lite.data.preprocess import check_dataset_tokenizer
from megatron_lite.data.token_range import check_token_ids
from megatron_lite.data.tokenizer import Tokenizer, tokenizer_record
from megatron_lite.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, option: str = "train.device=") -> torch.device:
    """``auto`` -> this process's CUDA device when there is one, else CPU. ``option``: how the
    user spelled the setting, for the error (``--device `` on the eval command line)."""
    if name not in ("auto", "cpu", "cuda"):  # else it fell through to CUDA: a traceback on a CPU machine
        raise UserError(f"{option}{name} is not one of: auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option}cuda but no CUDA device is available; use {option}auto or {option}cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The parameter dtype: ``auto`` -> bf16 on GPUs that support it, fp32 elsewhere (CPU bf16 is
    ~30x slower than fp32); ``fp8`` -> bf16, with FP8 block GEMMs on top (``training/fp8.py``)."""
    if name == "fp8":
        return torch.bfloat16
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


@dataclass
class DataBundle:
    """The tokenizer and the train/valid datasets of a run."""

    tokenizer: Tokenizer
    train: GPTDataset
    valid: GPTDataset | None
    tokenizer_path: Path
    warnings: list[str] = field(default_factory=list)
    """What the held-out split leaves out (a dataset of the blend, or the whole evaluation) or takes
    beyond data.valid_fraction; rank 0 logs them."""
    tokenizer_record: Path | None = None
    """The tokenizer's ``PREFIX.json`` record, checked to be its model's; None without one."""


def _datasets_in(paths: list[str]) -> list[str]:
    """The dataset prefixes among ``paths`` (files or directories): ``X`` for each ``X.bin`` with an ``X.idx``."""
    found = [str(p)[:-4] for path in paths for p in sorted(Path(path).glob("*.bin") if Path(path).is_dir() else [])]
    found += [p[:-4] for p in sorted(paths) if p.endswith(".bin")]
    return [p for p in found if Path(p + ".idx").is_file()]


def _not_a_prefix(entry: str, tokenizer: str | None) -> str | None:
    """Why the ``data.path`` entry ``entry``, which has no ``.bin``, is not a dataset prefix, with the
    fix: a file of the dataset (``.bin``, ``.idx``, ``.json``), a directory or glob of datasets, a text
    file not tokenized yet (the ``preprocess`` command to run, with ``tokenizer``, ``data.tokenizer``,
    where set); None where none of these fits (the file is missing)."""
    model = shlex.quote(tokenizer) if tokenizer else "MODEL"
    stem, suffix = os.path.splitext(entry)
    if suffix in (".bin", ".idx", ".json") and (suffix != ".json" or Path(stem + ".bin").is_file()):
        return f"data.path takes dataset prefixes without .bin/.idx/.json: {entry} -> {stem}"
    is_dir = Path(entry).is_dir()
    if is_dir or glob.has_magic(entry):
        what = "a directory" if is_dir else "a glob"
        found = _datasets_in([entry] if is_dir else glob.glob(entry))
        listed = f"data.path={','.join(found[:8])}{',...' if len(found) > 8 else ''}"
        fix = (
            f"list the datasets: {listed}"
            if found
            else "it holds no dataset (PREFIX.bin with PREFIX.idx): build one with `megatron-lite preprocess "
            f"--input {shlex.quote(files_glob(entry)) if is_dir else 'FILES'} --tokenizer {model} --output data/NAME`, "
            "then data.path=data/NAME"
        )
        return f"data.path={entry} is {what}, not a dataset prefix (PREFIX for PREFIX.bin/.idx); {fix}"
    if Path(entry).is_file():
        return (
            f"data.path={entry} is a file, not a dataset prefix (PREFIX for PREFIX.bin/.idx); tokenize it first: "
            f"`megatron-lite preprocess --input {shlex.quote(entry)} --tokenizer {model} --output data/NAME`, then "
            "data.path=data/NAME"
        )
    return None


def resolve_data_paths(cfg: Config, progress: bool, checkpoint: str | None = None) -> tuple[list[str], Path]:
    """(dataset prefixes, tokenizer path): the user's, or the embedded stdlib corpus built once.
    ``checkpoint``: the checkpoint whose run's data ``cfg`` names (``eval --held-out``), for errors
    that fit reading that run's data rather than starting a run."""
    d = cfg.data
    run = f"checkpoint {checkpoint}'s run" if checkpoint else None
    if not d.path:
        try:  # here, for the key's name in the error; a cache already built may sit in a read-only parent
            Path(d.cache_dir).expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as e:
            reason = "it exists and is not a directory" if isinstance(e, FileExistsError) else e.strerror or str(e)
            fix = (
                f"{run} keeps the embedded corpus there, and eval --held-out reads its held-out split from it: run "
                "eval where that directory can be reached, or score a text file with --text"
                if run
                else "choose a directory this process can create (or one holding the corpus already built)"
            )
            raise UserError(
                f"data.cache_dir={d.cache_dir!r} cannot be made a directory for the embedded corpus: {reason}; {fix}"
            ) from None
        prefix, tok = prepare_default_corpus(d.cache_dir, d.vocab_size, progress=progress)
        return [prefix], Path(d.tokenizer) if d.tokenizer else tok
    for prefix in d.path:
        if not Path(prefix + ".bin").is_file() and (why := _not_a_prefix(prefix, d.tokenizer)):
            raise UserError(why)
        for ext in (".bin", ".idx"):
            if not Path(prefix + ext).is_file():
                fix = (
                    f"{run} trained on it (data.path), and eval --held-out reads its held-out split from it: "
                    "restore the file there, or score a text file with --text"
                    if run
                    else "build it with `megatron-lite preprocess --input FILES --tokenizer MODEL --output PREFIX`"
                )
                raise UserError(f"dataset file {prefix + ext} does not exist; {fix}")
    return list(d.path), Path(d.tokenizer)


def build_data(cfg: Config, prefixes: list[str], tokenizer_path: Path) -> DataBundle:
    """Open the tokenizer and both splits (datasets only read files: safe on every rank); each
    dataset must have been made with this tokenizer (``PREFIX.json``'s hash, when recorded), as must the
    tokenizer's own record beside it (:func:`~megatron_lite.data.tokenizer.tokenizer_record`). A
    dataset whose held-out split serves no sample is left out of the evaluation's blend, and without
    any such sample there is no evaluation; both are said in ``DataBundle.warnings``, as is a dataset
    holding out more of its tokens than ``data.valid_fraction`` asks (``held_out_warnings``)."""
    tok = Tokenizer(tokenizer_path)
    record = tokenizer_record(tok)
    d, seq, seed = cfg.data, cfg.model.seq_len, cfg.train.seed
    fix = None if d.path else "leave data.tokenizer empty to use the embedded corpus's own, or set data.path"
    for prefix in prefixes:
        check_dataset_tokenizer(prefix, tok, fix)
    split = {"valid_fraction": d.valid_fraction, "index_cache": d.index_cache}
    train = GPTDataset(prefixes, d.weights, seq, seed, split="train", **split)
    valid, warnings = None, []
    if d.valid_fraction > 0:
        try:
            valid = GPTDataset(prefixes, d.weights, seq, seed, split="valid", **split)
        except NoHeldOutSamplesError as e:
            warnings.append(f"{e}: training without evaluation (or set data.valid_fraction=0 to say so)")
        else:
            blend = "the evaluation blends the other datasets of data.path, by their weights, without it"
            warnings += [f"{why}; {blend}" for why in valid.left_out] + held_out_warnings(valid, d.valid_fraction)
    return DataBundle(tok, train, valid, Path(tokenizer_path), warnings, record)


def check_data_vocab(data: DataBundle, vocab_size: int) -> list[str]:
    """Refuse, before step 1, a dataset of the blend holding a token id >= ``vocab_size``
    (``model.vocab_size``): made with a larger tokenizer than the run's. Returns a warning for each
    dataset too large to read whole and without a record of its largest id (``data/token_range.py``).
    A ``vocab_size`` below the tokenizer's is refused first."""
    check_vocab_covers(vocab_size, data.tokenizer.vocab_size)
    return [
        f"dataset {prefix} has no record of its largest token id ({prefix}.json, written by `megatron-lite "
        "preprocess`) and is too large to read whole at startup: its ids are checked against "
        "model.vocab_size only as batches are read"
        for prefix in check_token_ids(data.train.datasets, vocab_size, data.tokenizer)
    ]
