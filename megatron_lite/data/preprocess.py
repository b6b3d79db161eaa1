"""Text files -> tokenized ``<prefix>.bin``/``.idx``, streaming one document at a time.

A corpus can be far larger than memory, so nothing here holds more than one document: ``.jsonl`` /
``.json`` files are read line by line (one JSON object per line, text under ``json_key``), any other
file is one document. Bytes that are not UTF-8 are replaced by U+FFFD (counted in the stats) rather
than stopping a long run on one stray file.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from megatron_lite.data.indexed import IndexedDatasetBuilder, token_dtype, write_atomic
from megatron_lite.data.tokenizer import Tokenizer
from megatron_lite.errors import UserError

_JSON_SUFFIXES = (".jsonl", ".json")


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Resolve files and glob patterns into an ordered list of files (duplicates dropped)."""
    if isinstance(inputs, str | Path):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        text = os.path.expanduser(str(item))
        if glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True) if Path(m).is_file())
            if not matches:
                raise UserError(f"input pattern {text!r} matches no files")
            files.extend(matches)
        elif Path(text).is_dir():
            raise UserError(f"input {text} is a directory; pass files or a glob such as '{text}/*.jsonl'")
        elif not Path(text).is_file():
            raise UserError(f"input file {text} not found")
        else:
            files.append(Path(text))
    if not files:
        raise UserError("preprocess needs at least one input file or glob pattern")
    return list(dict.fromkeys(files))


def _decode(raw: bytes, stats: dict) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats["decode_errors"] += 1
        return raw.decode("utf-8", errors="replace")


def _json_documents(path: Path, json_key: str, bar: tqdm, stats: dict) -> Iterator[str]:
    """Each non-blank line of ``path`` is a JSON object; yield its ``json_key`` string."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            bar.update(len(raw))
            if not raw.strip():
                continue
            try:
                obj = json.loads(_decode(raw, stats))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(obj, dict) or json_key not in obj:
                keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
                raise UserError(f"{path}:{lineno}: no key {json_key!r} (found {keys}); set the json key")
            value = obj[json_key]
            if not isinstance(value, str):
                raise UserError(f"{path}:{lineno}: {json_key!r} holds {type(value).__name__}, not a string")
            yield value


def _documents(path: Path, json_key: str, bar: tqdm, stats: dict) -> Iterator[str]:
    if path.suffix.lower() in _JSON_SUFFIXES:
        yield from _json_documents(path, json_key, bar, stats)
        return
    raw = path.read_bytes()
    bar.update(len(raw))
    yield _decode(raw, stats)


def preprocess(
    inputs: Sequence[str | Path],
    tokenizer: str | Path | Tokenizer,
    out_prefix: str | Path,
    json_key: str = "text",
    append_eos: bool = True,
    progress: bool = True,
) -> dict:
    """Tokenize ``inputs`` into ``<out_prefix>.bin``/``.idx`` (plus a ``.json`` of stats).

    Returns the stats: ``documents``, ``tokens``, ``bytes`` (input bytes read), ``files``,
    ``decode_errors`` (documents with invalid UTF-8), ``seconds``. The dataset appears only when
    complete; on any error the previous one (if any) is left untouched.
    """
    files = expand_inputs(inputs)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    total = sum(p.stat().st_size for p in files)
    stats = {"documents": 0, "tokens": 0, "bytes": 0, "files": len(files), "decode_errors": 0}
    start = time.perf_counter()
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr, disable=not progress)
    with bar, IndexedDatasetBuilder(out_prefix, token_dtype(tok.vocab_size)) as builder:
        for path in files:
            for text in _documents(path, json_key, bar, stats):
                ids = tok.encode(text, eos=append_eos)
                builder.add_document(ids)
                stats["documents"] += 1
                stats["tokens"] += len(ids)
        stats["bytes"] = total  # every input file is read to its end
    stats["seconds"] = round(time.perf_counter() - start, 3)
    meta = {
        **stats,
        "tokenizer": str(tok.path),
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "json_key": json_key,
        "append_eos": append_eos,
        "inputs": [str(p) for p in files],
    }
    write_atomic(Path(str(out_prefix) + ".json"), (json.dumps(meta, indent=1) + "\n").encode())
    return stats


def check_dataset_tokenizer(prefix: str | Path, tok: Tokenizer, fix: str | None = None) -> None:
    """Refuse to read ``<prefix>.bin`` with another tokenizer than the one :func:`preprocess` made it
    with: the sha256 recorded in ``<prefix>.json`` must be ``tok.sha256`` (the same hash of the
    ``.model`` bytes). Without that record (a dataset made elsewhere, an unreadable ``.json``) there
    is nothing to compare: the ``.idx`` stores no largest token id, so no cheap fallback check."""
    meta_path = Path(str(prefix) + ".json")
    try:
        meta = json.loads(meta_path.read_text())
        recorded, made_with = meta.get("tokenizer_sha256"), meta.get("tokenizer", "another tokenizer")
    except (OSError, ValueError, AttributeError):
        return
    if not recorded or recorded == tok.sha256:
        return
    fix = fix or (
        f"point data.tokenizer at the tokenizer the data was made with, or re-run "
        f"`megatron-lite preprocess --tokenizer {tok.path} --output {prefix} ...`"
    )
    raise UserError(
        f"dataset {prefix} was tokenized with {made_with} (sha256 {recorded[:12]}..., recorded in {meta_path}), "
        f"not with data.tokenizer={tok.path} (sha256 {tok.sha256[:12]}...): its token ids would mean other "
        f"tokens; {fix}"
    )
