"""``megatron-lite eval``: the mean next-token loss of a checkpoint on a text file, or on its run's
held-out samples (``--held-out``: :func:`evaluate_held_out`, the run's ``eval_loss`` at that step).

The file is tokenized without BOS/EOS and cut into consecutive windows of ``seq_len + 1`` tokens
that overlap by one token (window k covers tokens [k*T, k*T + T]); the last window may be shorter.
Every token after the first is predicted exactly once, so the loss is the mean over
``tokens - 1`` predictions. A JSON Lines file (``.jsonl``/``.json``, as ``preprocess`` reads it)
is scored on its documents' text under ``json_key``, each followed by EOS as ``preprocess``
stores them, not on the JSON syntax around it; ``.gz``/``.bz2``/``.xz`` files are decompressed.

The file streams through in bounded memory, as ``preprocess`` reads it: read in blocks (a JSON
line whole), tokenized in pieces that give exactly the ids of the whole text
(``preprocess.Splitter``), and scored a group of windows at a time, so memory holds one piece's
text and ids and one group's tokens, never the file's. It is read twice: once to check it (UTF-8,
JSON) before the checkpoint is loaded, once to score it.

A loss that is not finite (NaN or infinite: non-finite weights, or a forward pass that overflowed)
is no score: :class:`NonFiniteLossError`, which ``eval --json`` prints as ``"loss": null`` with an
``error``.
"""

from __future__ import annotations

import codecs
import glob
import logging
import math
import platform
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view

from megatron_lite.amounts import counted
from megatron_lite.checkpoint.format import sha256_file
from megatron_lite.checkpoint.lineage import content, dataset_fingerprint, recorded_datasets, recorded_workdir
from megatron_lite.checkpoint.reader import CheckpointReader, find_checkpoint
from megatron_lite.checkpoint.shards import check_saved_config, check_saved_tokenizer
from megatron_lite.checkpoint.storage import commit_stamp, kept_while_read
from megatron_lite.config import Config
from megatron_lite.data.gpt_dataset import PretrainingLoader
from megatron_lite.data.inputs import InputReader, check_input
from megatron_lite.data.jsonl import is_jsonl, json_text
from megatron_lite.data.preprocess import Splitter
from megatron_lite.data.token_range import check_batch_ids
from megatron_lite.data.tokenizer import Tokenizer
from megatron_lite.errors import UserError
from megatron_lite.models.transformer import Transformer, build_model
from megatron_lite.training.build import build_data, resolve_data_paths, resolve_device

_READ_BYTES = 1 << 20  # block size for reading a plain-text file
log = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """The loss is NaN or infinite; ``tokens``: the tokens scored."""

    def __init__(self, message: str, tokens: int) -> None:
        super().__init__(message)
        self.tokens = tokens


def _non_finite_why(model: Transformer) -> str:
    """Why a model's loss is not finite: the parameters holding NaN or infinite values, if any."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if not bad:
        return "its weights are finite, but so large that the forward pass overflowed float32"
    names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more tensors" if len(bad) > 3 else "")
    return f"its weights hold NaN or infinite values (in {names})"


def load_model(path: str | Path, device: torch.device) -> tuple[Transformer, Tokenizer]:
    """The trained model (in eval mode) and the tokenizer saved with it."""
    reader = find_checkpoint(path)
    stamp = commit_stamp(reader.path)  # a run saving into its directory may prune it while it is read
    cfg = reader.config
    check_saved_config(reader.location, cfg, reader.shapes("model"))
    model = build_model(cfg.model, cfg.train.seed, device)
    with kept_while_read(reader.path, stamp, "evaluated", "evaluate the copy"):
        model.load_state_dict(reader.model_state())  # assembled from the ranks' boxes, any layout
        tokenizer = reader.local_file("tokenizer.model")
        tok = Tokenizer(tokenizer) if tokenizer is not None else None
    if tok is None:
        raise UserError(
            f"checkpoint {reader.location} has no tokenizer.model, and eval tokenizes the text with the "
            "sentencepiece model saved beside the weights (a model imported from Hugging Face with a tokenizer "
            "that is not sentencepiece, e.g. byte-level BPE, carries none): evaluate it where its own tokenizer runs"
        )
    check_saved_tokenizer(reader.location, cfg, tok.vocab_size)
    return model.eval(), tok


@torch.no_grad()
def sum_next_token_loss(
    model: Transformer, pieces: Iterable[Sequence[int]], seq_len: int, batch: int = 8
) -> tuple[float, int]:
    """(summed next-token loss, tokens) of the ids of ``pieces`` taken as one stream, over windows of
    ``seq_len + 1`` tokens overlapping by one (the last may be shorter): full windows ``batch`` at a
    time in order, then the short one alone. Memory holds one piece's ids and one group's tokens."""
    group = batch * seq_len + 1  # the tokens of `batch` full windows
    buf, total, tokens = np.empty(0, dtype=np.int64), 0.0, 0
    for ids in pieces:
        buf = np.concatenate([buf, np.asarray(ids, dtype=np.int64)])
        tokens += len(ids)
        while len(buf) >= group:
            total += _windows_loss(model, buf[:group], seq_len)
            buf = buf[group - 1 :]  # the next window starts at the last token of this group
    full = max(len(buf) - 1, 0) // seq_len
    if full:
        total += _windows_loss(model, buf[: full * seq_len + 1], seq_len)
    if len(buf) - full * seq_len >= 2:
        total += _windows_loss(model, buf[full * seq_len :], len(buf) - full * seq_len - 1)
    return total, tokens


def _windows_loss(model: Transformer, ids: np.ndarray, seq_len: int) -> float:
    """Summed loss of ``ids`` (``k * seq_len + 1`` tokens) as ``k`` windows of ``seq_len + 1`` tokens
    overlapping by one, in one batch."""
    device = next(model.parameters()).device
    windows = sliding_window_view(ids, seq_len + 1)[::seq_len].copy()  # (k, T+1)
    x = torch.from_numpy(windows).to(device)
    logits = model(x[:, :-1]).float()
    return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()


def _not_utf8(p: Path, e: UnicodeDecodeError, start: int) -> UserError:
    """The error for a file that is not UTF-8, ``e`` raised decoding the bytes from offset ``start``."""
    at, end = start + e.start, start + e.end - 1
    where = f"byte 0x{e.object[e.start]:02x} in position {at}" if end == at else f"bytes in position {at}-{end}"
    return UserError(
        f"text file {str(p)!r} is not UTF-8 ('utf-8' codec can't decode {where}: {e.reason}); convert it to "
        "UTF-8 first (iconv -f ITS_ENCODING -t UTF-8 FILE > NEW_FILE)"
    )


def _text_chunks(p: Path) -> Iterator[str]:
    """The file's text, decoded block by block (as preprocess reads it: a CRLF stays two characters)."""
    decoder, read = codecs.getincrementaldecoder("utf-8")(), 0
    with InputReader(p) as f:
        while True:
            block = f.read(_READ_BYTES)
            start = read - len(decoder.getstate()[0])  # the bytes held back from the block before come first
            try:
                yield decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise _not_utf8(p, e, start) from None
            if not block:
                return
            read += len(block)


def _documents(p: Path, json_key: str) -> Iterator[Iterable[str]]:
    """Each document of the file as text chunks, to be consumed before the next: the whole file, or for
    JSON Lines each line's text under ``json_key``, as preprocess reads them."""
    if not is_jsonl(p):
        yield _text_chunks(p)
        return
    with InputReader(p) as f:
        for n, raw in enumerate(f, 1):
            if (text := json_text(raw, p, n, json_key, {})) is not None:
                yield (text,)


def _token_pieces(p: Path, json_key: str, tok: Tokenizer, eos: bool) -> Iterator[list[int]]:
    """The file's token ids in pieces (:class:`~megatron_lite.data.preprocess.Splitter`), each document
    followed by EOS when ``eos``."""
    splitter = Splitter(tok)
    for chunks in _documents(p, json_key):
        for piece in splitter.split(chunks):
            yield tok.encode(piece)
        if eos:
            yield [tok.eos_id]


def _check_text_path(p: Path) -> None:
    """Refuse a ``--text`` that is no file to read twice, naming what it is: a directory, a pipe or a
    device, a dangling link, a dataset's prefix, a glob, or nothing at all."""
    if p.is_dir():
        raise UserError(f"--text {str(p)!r} is a directory; give one UTF-8 text file")
    if p.exists() and not p.is_file():  # a pipe (`<(cmd)`, /dev/stdin), a device: no second read
        raise UserError(
            f"--text {str(p)!r} is not a regular file (a pipe or a device), and eval reads its file twice (checked "
            "before the checkpoint is loaded, then scored); write the text to a file and give that"
        )
    if not p.is_file():
        dataset = Path(f"{p}.bin").is_file() and Path(f"{p}.idx").is_file()
        hint = (
            "; it is a preprocessed dataset's prefix, and --text reads text (--held-out scores a run's held-out split)"
            if dataset
            else "; --text takes one file, not a glob (concatenate the files into one)"
            if glob.has_magic(str(p))
            else f"; it is a symbolic link to {str(p.readlink())!r}, which does not exist"
            if p.is_symlink()
            else ""
        )
        raise UserError(f"text file {str(p)!r} does not exist{hint}")


def _too_short(p: Path, tokens: int) -> UserError:
    return UserError(  # the same words for an empty file, refused before the checkpoint is loaded
        f"text file {str(p)!r} has {counted(tokens, 'token')}, and a score needs at least 2 (one to predict the "
        "next from): give --text a file with more text"
    )


def evaluate_text(checkpoint: str | Path, text_path: str | Path, device: str = "auto", json_key: str = "text") -> dict:
    """``{"loss", "perplexity", "tokens"}`` of the checkpoint's model on a UTF-8 text file (or the
    documents of a JSON Lines file, their text under ``json_key``); :class:`NonFiniteLossError`
    when the loss is NaN or infinite."""
    p = Path(text_path)
    _check_text_path(p)
    if json_key != "text" and not is_jsonl(p):  # the key would be ignored, the file scored as it stands
        raise UserError(
            f"--json-key {json_key} names the text of JSON Lines documents, and {str(p)!r} is read as plain text "
            "(only .jsonl/.json files, compressed or not, are JSON Lines); rename it if it holds JSON Lines, "
            "or leave --json-key out"
        )
    dev = resolve_device(device, option="--device ")  # before reading anything
    check_input(p)  # an archive is refused by name, a binary file by its NUL bytes
    # read to its end in bounded memory: not UTF-8, bad JSON, no text at all refused before the checkpoint is loaded
    if not sum(len(chunk) for chunks in _documents(p, json_key) for chunk in chunks):
        raise _too_short(p, 0)
    model, tok = load_model(checkpoint, dev)
    documents = is_jsonl(p) and tok.eos_id >= 0  # each document ends with EOS, as preprocess stores it
    total, tokens = sum_next_token_loss(model, _token_pieces(p, json_key, tok, documents), model.cfg.seq_len)
    if tokens < 2:
        raise _too_short(p, tokens)
    return _score(total / (tokens - 1), tokens, model, f"checkpoint {str(checkpoint)!r} on {str(p)!r}")


def _score(loss: float, tokens: int, model: Transformer, what: str) -> dict:
    """The result of a finite loss; :class:`NonFiniteLossError` naming ``what`` and the cause otherwise."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"the loss of {what} is {loss}, no score: {_non_finite_why(model)}; "
            "the run diverged before this checkpoint: evaluate an earlier one",
            tokens,
        )
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


RUN_DATA_KEYS = ("path", "tokenizer", "cache_dir", "index_cache")  # the data.* keys that name files


def run_data_paths(cfg: Config, workdir: str | None, where: str) -> None:
    """Make the relative paths of ``cfg``'s data section (the run config of checkpoint ``where``)
    relative to ``workdir``, the directory that run started in (its lineage records it), as the run
    read them. Where ``workdir`` is unknown (a checkpoint that records none) or is no directory here
    (the checkpoint was copied to another machine), they stay relative to this process's directory,
    and a warning says so, once."""
    d = cfg.data
    # data.cache_dir is read only without data.path (the embedded corpus)
    used = [k for k in RUN_DATA_KEYS if getattr(d, k) and (k != "cache_dir" or not d.path)]
    relative = [k for k in used if any(not Path(p).is_absolute() for p in _as_list(getattr(d, k)))]
    if not relative:
        return
    if workdir and Path(workdir).is_dir():
        for key in relative:
            value = getattr(d, key)
            rebased = [_as_run_read(p, workdir) for p in _as_list(value)]
            setattr(d, key, rebased if isinstance(value, list) else rebased[0])
        return
    why = f"'s run started in {workdir}, no directory here" if workdir else " records no working directory of its run"
    paths = ", ".join(f"data.{k}={','.join(_as_list(getattr(d, k)))}" for k in relative)
    log.warning(
        "checkpoint %s%s: its relative data paths (%s) are read relative to this directory, %s",
        where,
        why,
        paths,
        Path.cwd(),
    )


def _as_list(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


def _as_run_read(path: str, workdir: str | None) -> str:
    """``path`` as the run read it: a relative path against ``workdir`` where that is a directory here."""
    if Path(path).is_absolute() or not workdir or not Path(workdir).is_dir():
        return path
    return str(Path(workdir) / path)


def recorded_corpus(cfg: Config, lineage: Any) -> tuple[list[str], Path] | None:
    """(prefixes, tokenizer) of the embedded corpus the run trained on, as its lineage records them
    (relative paths as :func:`run_data_paths` reads them), where both are still there
    with the recorded content; else None, and the corpus is built from this interpreter's standard
    library, as training builds it (``data/corpus.py``). So a run's own corpus is read, whatever this
    Python's standard library, and never rebuilt over."""
    saved = recorded_datasets(lineage)
    if cfg.data.path or saved is None or len(saved) != 1 or not isinstance(lineage.get("tokenizer"), dict):
        return None
    workdir, tok = recorded_workdir(lineage), lineage["tokenizer"]
    prefix, model = (_as_run_read(str(p), workdir) for p in (saved[0].get("prefix"), tok.get("path")))
    try:
        if content(dataset_fingerprint(prefix)) != content(saved[0]) or sha256_file(Path(model)) != tok.get("sha256"):
            return None
    except OSError:  # not there (another machine, a cleared cache)
        return None
    return [prefix], Path(model)


def check_run_data(reader: CheckpointReader, cfg: Config, prefixes: list[str]) -> None:
    """Refuse to score other samples than the checkpoint's run held out: each dataset at ``prefixes``
    must hold the tokens its lineage fingerprints (``.idx`` sha256, ``.bin`` size; a moved copy is the
    same). The embedded corpus is built from this interpreter's standard library, another in another
    Python version. A lineage without datasets allows no check: a warning says so."""
    lineage, where = reader.meta.get("lineage"), reader.location
    saved = recorded_datasets(lineage)
    if saved is None:
        log.warning(
            "checkpoint %s records no fingerprint of its run's data (no datasets in its lineage): eval --held-out "
            "cannot check that the held-out samples it reads are the run's",
            where,
        )
        return
    now = [{"prefix": p, **dataset_fingerprint(p)} for p in prefixes]
    if list(map(content, saved)) == list(map(content, now)):
        return
    if len(saved) != len(now):
        ran = f"{len(saved)} datasets ({', '.join(str(d.get('prefix')) for d in saved)})"
        reads = f"{len(now)} ({', '.join(prefixes)})"
    else:
        old, new = next((o, n) for o, n in zip(saved, now) if content(o) != content(n))
        ran = (
            f"{old.get('prefix')} (.idx sha256 {str(old.get('idx_sha256'))[:12]}..., .bin {old.get('bin_bytes')} bytes)"
        )
        reads = f"{new['prefix']} (.idx sha256 {new['idx_sha256'][:12]}..., .bin {new['bin_bytes']} bytes)"
    held = "its held-out split is not the run's, so the loss would be no held-out loss"
    if not cfg.data.path:
        python = lineage.get("python") or "(unrecorded)"
        raise UserError(
            f"checkpoint {where}'s run trained on the embedded corpus {ran}, built from the standard library of "
            f"Python {python}; eval --held-out built it here from Python {platform.python_version()}'s as {reads}, "
            f"other documents: {held}; run eval where the run's corpus is (its data.cache_dir) or with its Python, or "
            "score a text file with --text"
        )
    raise UserError(
        f"checkpoint {where}'s run trained on {ran}, and eval --held-out reads {reads}, other tokens: {held}; "
        "restore the run's data there, or score a text file with --text"
    )


def evaluate_held_out(checkpoint: str | Path, device: str = "auto") -> dict:
    """``{"loss", "perplexity", "tokens"}`` of the checkpoint's model on the samples its run evaluates:
    ``train.eval_iters`` global batches of the held-out split, built from the data and settings in
    the checkpoint's config as training builds them, so the loss is the run's ``eval_loss`` at that
    step (to float rounding: one device, fp32, whatever the run's layout and dtype). Relative data
    paths are the run's: relative to the directory it started in (:func:`run_data_paths`); the embedded
    corpus is the run's own where it is still there (:func:`recorded_corpus`); data other than the run's
    is refused (:func:`check_run_data`)."""
    dev = resolve_device(device, option="--device ")
    reader = find_checkpoint(checkpoint)
    cfg, where = reader.config, reader.location
    if reader.weights_only:
        raise UserError(
            f"checkpoint {where} holds imported weights, not a run's, so it has no held-out split; use --text"
        )
    if cfg.data.valid_fraction <= 0:
        raise UserError(f"the run of checkpoint {where} held out no documents (data.valid_fraction=0); use --text")
    lineage = reader.meta.get("lineage")
    run_data_paths(cfg, recorded_workdir(lineage), where)
    prefixes, tokenizer = recorded_corpus(cfg, lineage) or resolve_data_paths(cfg, progress=False, checkpoint=where)
    check_run_data(reader, cfg, prefixes)
    data = build_data(cfg, prefixes, tokenizer)
    if data.valid is None:
        raise UserError(f"the run of checkpoint {where} has no held-out samples: {data.warnings[0]}; use --text")
    for why in data.warnings:  # a dataset left out of the held-out blend, as training said
        log.warning("%s", why)
    model, _ = load_model(checkpoint, dev)
    t = cfg.train
    loader = PretrainingLoader(data.valid, t.micro_batch_size, t.global_batch_size)

    def micro_mean(micro: list[torch.Tensor]) -> float:
        return sum(model(b[:, :-1].to(dev), b[:, 1:].to(dev)).float().item() for b in micro) / len(micro)

    with torch.no_grad():
        loss = held_out_loss(loader, cfg, "the held-out samples", data.tokenizer_path, micro_mean)
    tokens = t.eval_iters * t.global_batch_size * cfg.model.seq_len
    return _score(loss, tokens, model, f"checkpoint {str(checkpoint)!r} on its held-out samples")


def held_out_loss(
    loader: PretrainingLoader, cfg: Config, where: str, tokenizer: Path, micro_mean: Callable[[list], float]
) -> float:
    """The evaluation's loss, for a run (``Trainer.evaluate``) and for ``eval --held-out`` alike: the mean
    over ``train.eval_iters`` global batches of ``loader`` (the held-out split, from its first batch) of
    ``micro_mean`` (a global batch's mean loss over its microbatches), each batch's token ids checked
    as the training batches' are (``where`` names the read in the error)."""
    total = 0.0
    for _ in range(cfg.train.eval_iters):
        micro = loader.next_step()
        check_batch_ids(micro, cfg.model.vocab_size, where, tokenizer)
        total += micro_mean(micro)
    return total / cfg.train.eval_iters
