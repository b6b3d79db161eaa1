"""Training the tokenizer of ``tokenizer.py``: a sentencepiece BPE model that round-trips code.

:func:`train_tokenizer` samples a bounded, seeded share of the inputs' lines (``.jsonl`` documents'
text), trains on it with :data:`TRAINING_SETTINGS` (why each setting: ``tokenizer.py``) and writes
``PREFIX.model`` and its record ``PREFIX.json`` (:func:`is_tokenizer_record`): the ids, the sha256
and everything the training depended on.

Training is deterministic: the line sample is seeded and sentencepiece runs single-threaded without
shuffling, so the same inputs and settings give the same ``.model`` bytes (checked with
sentencepiece 0.2.3; other sentencepiece versions may differ).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tqdm import tqdm

from megatron_lite import jsontext
from megatron_lite.amounts import byte_size, counted, duration
from megatron_lite.data.indexed import (
    check_not_replacing,
    check_output_prefix,
    check_outputs_spare_inputs,
    write_atomic,
)
from megatron_lite.data.inputs import InputReader, expand_inputs, warn_invalid_utf8
from megatron_lite.data.jsonl import decode, is_jsonl, json_text
from megatron_lite.data.output_lock import hold_output
from megatron_lite.data.tempfiles import remove_abandoned_outputs
from megatron_lite.errors import UserError
from megatron_lite.progress import ProgressLines, above_progress_bar, byte_progress

log = logging.getLogger(__name__)

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
NEWLINE = "\n"
MIN_VOCAB = 4 + 1 + 256 + 1  # specials, newline, bytes, and at least one learned piece
MAX_VOCAB = 2**31 - 1  # sentencepiece reads vocab_size as an int32
_SAMPLE_SEED = 1234
RECORD_FORMAT = "megatron-lite-tokenizer"  # PREFIX.json's "format": a tokenizer's record
# sentencepiece's max_sentence_length (its default): it silently skips longer lines, so a corpus of
# long lines (prose paragraphs, minified code, one-line files) would train on little or nothing.
_SENTENCE_BYTES = 4192

# Every setting that shapes the model; stored in the .json so a model can be reproduced.
TRAINING_SETTINGS: dict = {
    "model_type": "bpe",
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": True,
    "split_digits": True,
    "byte_fallback": True,
    "add_dummy_prefix": False,
    "character_coverage": 0.9995,
    "user_defined_symbols": [NEWLINE],
    "pad_id": PAD_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "unk_id": UNK_ID,
    "num_threads": 1,  # more threads change the merge order, hence the model bytes
    "shuffle_input_sentence": False,
}


def _line_pieces(line: str, limit: int = _SENTENCE_BYTES) -> Iterator[str]:
    """``line`` cut into pieces of at most ``limit`` UTF-8 bytes, before a space where there is one
    (a word keeps its leading space, as sentencepiece's whitespace marker does); a line that fits
    is yielded as it is."""
    data = line.encode("utf-8")
    if len(data) <= limit:
        yield line
        return
    start = 0
    while len(data) - start > limit:
        end = start + limit
        while (data[end] & 0xC0) == 0x80:  # not inside a character's bytes
            end -= 1
        space = data.rfind(b" ", start + 1, end + 1)
        end = space if space > start else end
        yield data[start:end].decode("utf-8")
        start = end
    yield data[start:].decode("utf-8")


def _text_lines(raw: bytes, path: Path, lineno: int, json_key: str | None, stats: dict) -> list[str]:
    """The non-empty text lines in line ``lineno`` (``raw``) of ``path``: the line itself, or for a
    JSON Lines file (``json_key`` set) the lines of the document under that key. A line with bytes
    that are not UTF-8 counts in ``stats["decode_errors"]``."""
    if json_key is None:
        line = decode(raw, stats).rstrip("\n")
        return [line] if line else []
    text = json_text(raw, path, lineno, json_key, stats)
    return [line for line in text.split("\n") if line] if text else []


def _sample_lines(
    files: list[Path], max_bytes: int, bar: tqdm | ProgressLines, counts: dict | None = None, json_key: str = "text"
) -> Iterator[str]:
    """Yield lines (without newlines) from ``files``, keeping about ``max_bytes`` of them.

    Each line of a file (a document of a ``.jsonl`` file, whose text lines are yielded) is kept with
    probability ``max_bytes / total`` from a fixed-seed RNG, so the sample spreads over all files
    (not just the first ones), is the same on every run, and memory holds one line at a time on our
    side. A line longer than sentencepiece takes is cut into pieces (``_line_pieces``). A compressed
    input counts at its size on disk, so inputs that decompress to far more than ``max_bytes`` can
    fill the sample before the last files are reached.
    ``counts["lines"]`` and ``counts["bytes"]`` count the lines yielded and their UTF-8 bytes;
    ``counts["invalid_utf8"]`` holds, for each file, the lines sampled and how many of them held bytes
    that are not UTF-8.
    """
    counts = {} if counts is None else counts
    counts.setdefault("lines", 0)
    counts.setdefault("bytes", 0)
    invalid_utf8 = counts.setdefault("invalid_utf8", {})
    total = sum(p.stat().st_size for p in files)
    keep = 1.0 if total <= max_bytes else max_bytes / total
    rng = random.Random(_SAMPLE_SEED)
    taken = 0
    for path in files:
        key = json_key if is_jsonl(path) else None
        stats = invalid_utf8[path] = {"decode_errors": 0, "sampled": 0}
        with InputReader(path) as f:
            for lineno, raw in enumerate(f, 1):
                bar.update(f.advance())
                if keep < 1.0 and rng.random() >= keep:
                    continue
                stats["sampled"] += 1
                lines = _text_lines(raw, path, lineno, key, stats)
                if not lines:
                    continue
                taken += len(raw)
                for line in lines:
                    counts["bytes"] += len(line.encode("utf-8"))
                    for piece in _line_pieces(line):
                        counts["lines"] += 1
                        yield piece
                if taken >= max_bytes:
                    return


def _check_inputs(inputs: Sequence[str | Path], vocab_size: int) -> list[Path]:
    """The input files (globs expanded and each checked as ``preprocess`` does: ``expand_inputs``),
    once ``vocab_size`` is known to be large enough."""
    files = expand_inputs(inputs)
    if vocab_size < MIN_VOCAB:
        raise UserError(
            f"vocab_size {vocab_size} is too small: byte fallback alone needs {MIN_VOCAB}; "
            f"give --vocab-size {MIN_VOCAB} or more"
        )
    if vocab_size > MAX_VOCAB:
        raise UserError(
            f"vocab_size {vocab_size} is too large: sentencepiece holds at most {MAX_VOCAB:,} (2**31-1) pieces; "
            "give a smaller --vocab-size (commonly 32000 to 256000)"
        )
    return files


def is_tokenizer_record(meta: Any) -> bool:
    """Whether ``meta`` (a parsed ``PREFIX.json``) is a record ``megatron-lite tokenizer train`` writes."""
    return isinstance(meta, dict) and meta.get("format") == RECORD_FORMAT


def _output_names(out_prefix: str | Path) -> tuple[Path, Path]:
    """``(PREFIX.model, PREFIX.json)`` (a prefix already ending in ``.model`` is the model's path)."""
    prefix = str(out_prefix)
    model_path = Path(prefix if prefix.endswith(".model") else prefix + ".model")
    return model_path, model_path.with_suffix(".json")


def _output_paths(files: list[Path], out_prefix: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """``(PREFIX.model, PREFIX.json)``, refused where writing them would destroy something: an
    input, a ``PREFIX.json`` that is not an earlier tokenizer record (a dataset preprocessed to the
    same prefix keeps there the hash of the tokenizer it was made with), or, unless ``overwrite``,
    an earlier tokenizer (the datasets made with it record its hash and would be refused)."""
    model_path, meta_path = _output_names(out_prefix)
    check_outputs_spare_inputs(files, [model_path, meta_path], out_prefix)
    if meta_path.exists():
        try:
            meta = jsontext.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        if not is_tokenizer_record(meta):
            if isinstance(meta, dict) and "tokenizer_sha256" in meta:
                what = "the record of the dataset preprocessed to the same prefix (which tokenizer made it)"
            else:
                what = "not a tokenizer record written by `megatron-lite tokenizer train`"
            raise UserError(
                f"{meta_path} exists and is {what}; training writes the tokenizer's record there and would "
                f"replace it: choose another --output prefix (e.g. tok/NAME for tokenizers, data/NAME for datasets)"
            )
    what = (
        "a tokenizer trained earlier (datasets preprocessed with it record its sha256, and training "
        "refuses them with another tokenizer)"
    )
    check_not_replacing([model_path, meta_path], out_prefix, what, overwrite)
    return model_path, meta_path


def _record(data: bytes, vocab_size: int, max_bytes: int, total: int, files: list[Path], json_key: str) -> dict:
    """``PREFIX.json`` of a trained model: ids, hash, and everything its training depended on."""
    return {
        "format": RECORD_FORMAT,
        "version": 1,
        "vocab_size": vocab_size,
        "pad_id": PAD_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "unk_id": UNK_ID,
        "newline_id": UNK_ID + 1,
        "sha256": hashlib.sha256(data).hexdigest(),
        "sentencepiece_version": spm.__version__,
        "training": {
            **TRAINING_SETTINGS,
            "max_bytes": max_bytes,
            "sample_seed": _SAMPLE_SEED,
            "input_bytes": total,
            "inputs": [str(p) for p in files],
            "json_key": json_key,
        },
    }


def _recording(lines: Iterator[str], failed: list[Exception]) -> Iterator[str]:
    """``lines``, appending to ``failed`` the error that ends them: sentencepiece turns an error of
    its sentence iterator into a RuntimeError of its own ("INTERNAL: UserError: ..." and frames)."""
    try:
        yield from lines
    except Exception as e:
        failed.append(e)
        raise


def _announced(lines: Iterator[str], counts: dict, vocab_size: int, started: list[float]) -> Iterator[str]:
    """``lines``, then a log line saying that training starts, with the time it starts appended to
    ``started``: sentencepiece reads every sentence before it trains (minutes on a large sample), so the
    sample's end is the training's start."""
    yield from lines
    size = f"{byte_size(counts['bytes'])} of sample lines ({counted(counts['lines'], 'line')})"
    log.info("training a %s-piece BPE on %s...", f"{vocab_size:,}", size)
    started.append(time.monotonic())


def train_tokenizer(
    inputs: Sequence[str | Path],
    out_prefix: str | Path,
    vocab_size: int,
    max_bytes: int = 20_000_000,
    progress: bool = True,
    json_key: str = "text",
    overwrite: bool = False,
) -> Path:
    """Train a BPE model on a bounded sample of ``inputs``; write ``<prefix>.model`` and ``.json``.

    ``.jsonl``/``.json`` inputs are JSON Lines: the text under ``json_key`` is what is sampled, as
    ``preprocess`` reads them (not the JSON syntax around it).

    Returns the ``.model`` path (a prefix already ending in ``.model`` is used as is). Both files
    are written atomically (temp name, then rename); an existing tokenizer there is refused unless
    ``overwrite``. Temporaries that an earlier run to ``out_prefix`` left when it was killed are
    deleted, with a warning naming each (``tempfiles.py``), also by a run then refused; those of a run
    still writing are not.
    Sentencepiece itself writes no file: the model comes back through ``model_writer``. The run holds
    the prefix locked from before it checks the outputs until both are written (``output_lock.py``,
    the lock ``preprocess`` takes on the same prefix): a second run to it is refused at once.
    """
    files = _check_inputs(inputs, vocab_size)
    check_output_prefix(out_prefix, "NAME.model and NAME.json")
    with hold_output(str(out_prefix).removesuffix(".model"), out_prefix):
        # a killed run's temporaries go first, also when this run is refused
        remove_abandoned_outputs(list(_output_names(out_prefix)), str(out_prefix))
        model_path, meta_path = _output_paths(files, out_prefix, overwrite)
        data, meta = _train(files, vocab_size, max_bytes, progress, json_key)
        meta_path.unlink(missing_ok=True)  # a crash before the new record leaves none, not the old model's
        write_atomic(model_path, data)
        write_atomic(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    return model_path


def _vocab_hint(e: Exception) -> str:
    """The fix for sentencepiece's vocabulary-size errors, in this command's flags: too high for the
    text (its largest size named), or too small for the text's distinct characters (its least named;
    the ``--character_coverage`` its message suggests is no flag here)."""
    if high := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", str(e)):
        return f"; lower --vocab-size to {int(high[1]):,} or less, or give more text"
    if low := re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", str(e)):
        return (
            f"; raise --vocab-size to {int(low[1]):,} or more: each distinct character of the sampled text, and each "
            "special piece, needs a piece of its own (this command has no --character_coverage)"
        )
    return ""


def _train(files: list[Path], vocab_size: int, max_bytes: int, progress: bool, json_key: str) -> tuple[bytes, dict]:
    """Train the model of :func:`train_tokenizer` on a sample of ``files``: its bytes and its record."""
    total = sum(p.stat().st_size for p in files)
    model = io.BytesIO()
    counts: dict = {"lines": 0}
    started: list[float] = []  # when the sample ended and sentencepiece's training began
    meter = byte_progress(progress, total, "tokenizer sample", lambda: f"{counts['lines']:,} lines sampled")
    with meter as bar, above_progress_bar():
        failed: list[Exception] = []  # a reading error, which sentencepiece would wrap as its own
        lines = _recording(_sample_lines(files, max_bytes, bar, counts, json_key), failed)
        if progress:
            lines = _announced(lines, counts, vocab_size, started)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines,
                model_writer=model,
                vocab_size=vocab_size,
                minloglevel=2,
                **TRAINING_SETTINGS,
            )
        except RuntimeError as e:  # e.g. "Vocabulary size too high" for a small corpus
            if failed:
                raise failed[0] from None
            if not counts["lines"]:
                raise UserError(
                    f"no text to train a tokenizer on in {', '.join(map(str, files))} (only empty lines, or JSON "
                    "Lines documents with empty text); give files with text in them"
                ) from e
            raise UserError(
                f"sentencepiece could not train a {vocab_size}-token model on {counted(len(files), 'file')}: "
                f"{e}{_vocab_hint(e)}"
            ) from e
    if started:
        log.info("trained the %s-piece tokenizer in %s", f"{vocab_size:,}", duration(time.monotonic() - started[0]))
    invalid = counts["invalid_utf8"].items()
    warn_invalid_utf8([(path, read["decode_errors"], read["sampled"]) for path, read in invalid], "sampled lines")
    data = model.getvalue()
    return data, _record(data, vocab_size, max_bytes, total, files, json_key)
