"""Text files -> tokenized ``<prefix>.bin``/``.idx``, streaming and memory-bounded.

A corpus can be far larger than memory, and so can one document: ``.jsonl`` / ``.json`` files are
read line by line (one JSON object per line, text under ``json_key``), any other file is one
document, read in blocks; ``.gz``, ``.bz2`` and ``.xz`` files are decompressed as they are read
(``inputs.py``). A document is tokenized in pieces of about ``_PIECE_CHARS`` characters
whose ids go to the ``.bin`` as they come, so memory holds one piece's text and ids, not the
document's (sentencepiece alone needs ~50 bytes per character it encodes at once).

The pieces give exactly the ids of encoding the whole document at once. A cut is made only between
two characters that no multi-character vocabulary piece contains side by side (:class:`Splitter`):
BPE only ever merges adjacent symbols into vocabulary pieces, so no token can span such a boundary
and the two sides are encoded independently. With our tokenizers that holds after every newline
(``"\n"`` is a user-defined symbol, never merged) and before most spaces, so the bound holds even
for one very long line. It fails only for a stretch of text with no such pair in
``_PIECE_CHARS`` characters and more (e.g. one character repeated), or for a tokenizer whose
normalizer is not the identity (a dummy prefix, whitespace collapsing): those stretches, or
documents, are encoded whole, taking memory ~50x their size as before. A JSON line is held whole
(raw, decoded and parsed: ~3x its size) before its text is cut into pieces.

Bytes that are not UTF-8 are replaced by U+FFFD (counted in the stats, and a warning names each
file with such documents) rather than stopping a long run on one stray file; a binary file is
refused before anything is read in full (``inputs.check_input``).
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from sentencepiece import sentencepiece_model_pb2
from tqdm import tqdm

from megatron_lite import jsontext
from megatron_lite.data.indexed import (
    IndexedDataset,
    IndexedDatasetBuilder,
    check_not_replacing,
    check_output_prefix,
    check_outputs_spare_inputs,
    token_dtype,
    write_atomic,
)
from megatron_lite.data.inputs import Found, InputReader, check_text, expand_inputs, warn_invalid_utf8
from megatron_lite.data.jsonl import is_jsonl, json_text
from megatron_lite.data.output_lock import hold_output
from megatron_lite.data.preprocess_pool import EncodingPool, resolve_workers
from megatron_lite.data.tempfiles import remove_abandoned_outputs
from megatron_lite.data.token_range import dataset_record
from megatron_lite.data.tokenizer import Tokenizer, is_tokenizer_record
from megatron_lite.errors import UserError
from megatron_lite.progress import ProgressLines, byte_progress

_PIECE_CHARS = 1 << 20  # characters of text per sentencepiece call (memory ~50x that while it runs)
_READ_BYTES = 1 << 20  # block size for reading a plain-text document
_SP_SPACE = "\u2581"  # sentencepiece's whitespace marker: a space in the text is this in a piece

log = logging.getLogger(__name__)


class Splitter:
    """Cuts a document's text into pieces whose ids, concatenated, are the ids of the whole text.

    Sentencepiece BPE starts from single characters (user-defined symbols matched whole) and only
    merges two adjacent symbols when their concatenation is a vocabulary piece, so a token spans
    the boundary between characters ``a`` and ``b`` only if some piece contains ``ab``. Where no
    piece does, the text on each side is encoded on its own, whatever comes before or after. That
    needs a normalizer that maps each character on its own (identity, no dummy prefix, no
    whitespace collapsing); with any other model the document is left whole.
    """

    def __init__(self, tok: Tokenizer, piece_chars: int | None = None) -> None:
        self.piece_chars = piece_chars or _PIECE_CHARS
        self.pairs: set[tuple[str, str]] | None = None
        sp = getattr(tok, "_sp", None)
        if sp is None:
            return
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(sp.serialized_model_proto())
        norm = proto.normalizer_spec
        if (
            proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE
            or norm.precompiled_charsmap
            or norm.add_dummy_prefix
            or norm.remove_extra_whitespaces
        ):
            return
        pairs: set[tuple[str, str]] = set()
        for i in range(sp.get_piece_size()):
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)):
                piece = sp.id_to_piece(i)
                pairs.update(zip(piece, piece[1:], strict=False))
        self.pairs = pairs

    def _safe(self, a: str, b: str) -> bool:
        a = _SP_SPACE if a == " " else a
        b = _SP_SPACE if b == " " else b
        return (a, b) not in self.pairs

    def _cut(self, text: str, start: int) -> int | None:
        """The first ``i >= start`` where ``text[:i]`` and ``text[i:]`` may be encoded apart, if any."""
        nl = text.find("\n", start - 1, start + 4096)  # after a newline is the usual safe place
        if 0 <= nl < len(text) - 1 and self._safe("\n", text[nl + 1]):
            return nl + 1
        for i in range(max(start, 1), len(text)):
            if self._safe(text[i - 1], text[i]):
                return i
        return None

    def split(self, chunks: Iterable[str]) -> Iterator[str]:
        """Re-cut the stream of text ``chunks`` (one document) into safe pieces; yields at least one."""
        if self.pairs is None:
            yield "".join(chunks)
            return
        pending, scanned = "", 0  # text not yet yielded; where a cut may still be found in it
        for chunk in chunks:
            pending = pending + chunk if pending else chunk
            start = 0
            while len(pending) - start > self.piece_chars:
                cut = self._cut(pending, max(start + self.piece_chars, scanned))
                if cut is None:  # nowhere (yet) in the rest: look again only at text still to come
                    scanned = len(pending)
                    break
                yield pending[start:cut]
                start = scanned = cut
            pending, scanned = pending[start:], max(scanned - start, 0)
        yield pending


def _json_documents(path: Path, json_key: str, bar: tqdm | ProgressLines, stats: dict) -> Iterator[Iterable[str]]:
    """Each non-blank line of ``path`` is a JSON object; yield its ``json_key`` string (as one chunk)."""
    with InputReader(path) as f:
        for lineno, raw in enumerate(f, 1):
            bar.update(f.advance())
            stats["bytes"] += len(raw)
            text = json_text(raw, path, lineno, json_key, stats)
            del raw
            if text is not None:
                yield (text,)


def _text_chunks(path: Path, bar: tqdm | ProgressLines, stats: dict) -> Iterator[str]:
    """The whole file as one document, decoded block by block (the same text as decoding it at once)."""
    lenient = codecs.getincrementaldecoder("utf-8")(errors="replace")
    strict = codecs.getincrementaldecoder("utf-8")(errors="strict")
    valid = True
    with InputReader(path) as f:
        while block := f.read(_READ_BYTES):
            bar.update(f.advance())
            stats["bytes"] += len(block)
            if valid:
                try:
                    strict.decode(block)
                except UnicodeDecodeError:
                    valid = False
            yield lenient.decode(block)
    if valid:
        try:
            strict.decode(b"", final=True)
        except UnicodeDecodeError:
            valid = False
    if not valid:
        stats["decode_errors"] += 1
    yield lenient.decode(b"", final=True)


def _documents(path: Path, json_key: str, bar: tqdm | ProgressLines, stats: dict) -> Iterator[Iterable[str]]:
    """Each document of ``path`` as an iterable of text chunks, to be consumed before the next."""
    if is_jsonl(path):
        yield from _json_documents(path, json_key, bar, stats)
        return
    yield _text_chunks(path, bar, stats)


def _pieces(
    files: list[Path], json_key: str, splitter: Splitter, bar: tqdm | ProgressLines, stats: dict, found: list[Found]
) -> Iterator[str | None]:
    """The text of every document of ``files``, in pieces (:class:`Splitter`), each document followed
    by None; what each file held is appended to ``found`` once it is read."""
    for path in files:
        start, invalid, documents, with_text = stats["bytes"], stats["decode_errors"], 0, 0
        for chunks in _documents(path, json_key, bar, stats):
            empty = True
            for piece in splitter.split(chunks):
                empty = empty and not piece
                yield piece
            yield None
            documents += 1
            with_text += not empty
        found.append(Found(path, stats["bytes"] - start, documents, with_text, stats["decode_errors"] - invalid))


def _write(builder: IndexedDatasetBuilder, encoded: Iterable[np.ndarray | None], eos: np.ndarray, stats: dict) -> None:
    """Write the ids of each piece, and ``eos`` and a document end at each None."""
    for ids in encoded:
        if ids is None:
            builder.add_tokens(eos)
            builder.end_document()
            stats["documents"] += 1
            stats["tokens"] += eos.size
        else:
            builder.add_tokens(ids)
            stats["tokens"] += ids.size


def _check_prefix(out_prefix: str | Path) -> None:
    """Refuse a prefix that is not a file prefix: a directory, a name ending in ``.bin`` or ``.idx``."""
    check_output_prefix(out_prefix, "NAME.bin, NAME.idx and NAME.json")
    if str(out_prefix).endswith((".bin", ".idx")):  # it would write NAME.bin.bin, which data.path cannot name
        raise UserError(
            f"--output {out_prefix} ends in its file's extension; give the prefix, --output {str(out_prefix)[:-4]} "
            "(it writes PREFIX.bin, PREFIX.idx and PREFIX.json)"
        )


def _check_outputs(files: list[Path], out_prefix: str | Path, overwrite: bool) -> Path:
    """Refuse outputs that would destroy something: an input, a ``PREFIX.json`` that is not an
    earlier dataset record (a tokenizer trained to the same prefix keeps its record there too), or,
    unless ``overwrite``, an earlier dataset. Returns the record's path."""
    prefix = str(out_prefix)
    outputs = [Path(prefix + ".bin"), Path(prefix + ".idx"), Path(prefix + ".json")]
    meta_path = outputs[-1]
    check_outputs_spare_inputs(files, outputs, out_prefix)
    what = "a dataset built earlier (runs that train on it, or resume from it, would read the new one)"
    if not meta_path.exists():
        check_not_replacing(outputs, out_prefix, what, overwrite)
        return meta_path
    try:
        meta = jsontext.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict) and "tokenizer_sha256" in meta:
        check_not_replacing(outputs, out_prefix, what, overwrite)
        return meta_path  # the record of the dataset this run rebuilds
    if is_tokenizer_record(meta):
        what = "the record of the tokenizer trained to the same prefix (`megatron-lite tokenizer train`)"
    else:
        what = "not a dataset record written by `megatron-lite preprocess`"
    raise UserError(
        f"{meta_path} exists and is {what}; preprocess writes the dataset's record there and would "
        f"replace it: choose another --output prefix (e.g. data/NAME for datasets, tok/NAME for tokenizers)"
    )


def _open_tokenizer(tokenizer: str | Path | Tokenizer, append_eos: bool) -> Tokenizer:
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    if append_eos and tok.eos_id < 0:
        raise UserError(
            f"tokenizer {tok.path} has no EOS token (eos_id {tok.eos_id}) to end each document with; "
            "pass --no-eos, or use a tokenizer that has one (`megatron-lite tokenizer train`)"
        )
    return tok


def preprocess(
    inputs: Sequence[str | Path],
    tokenizer: str | Path | Tokenizer,
    out_prefix: str | Path,
    json_key: str = "text",
    append_eos: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    workers: int | str = 1,
) -> dict:
    """Tokenize ``inputs`` into ``<out_prefix>.bin``/``.idx`` (plus a ``.json`` of stats).

    Returns the stats: ``documents``, ``tokens``, ``bytes`` (bytes of input read, after
    decompression: a ``.gz`` counts as the file inside it), ``files``, ``decode_errors`` (documents
    with invalid UTF-8), ``seconds``. An existing dataset at ``out_prefix`` is refused unless
    ``overwrite``. The dataset appears only when complete; on any error the previous one (if any) is
    left untouched. Inputs with no text at all (empty, blank lines, empty ``json_key`` strings) are
    an error naming them, or a warning for each when other inputs have text. Temporary files that an
    earlier run to ``out_prefix`` left when it was killed are deleted (``tempfiles.py``); those of a
    run still writing are not. ``workers`` > 1 (or ``"auto"``) encodes in that many processes
    (``preprocess_pool.py``), writing the same bytes. The run holds ``out_prefix`` locked from before
    it checks the outputs until its record is written (``output_lock.py``): a second run to it is
    refused at once.
    """
    workers = resolve_workers(workers)
    files = expand_inputs(inputs)
    _check_prefix(out_prefix)
    with hold_output(out_prefix, out_prefix):
        return _build(files, tokenizer, out_prefix, json_key, append_eos, progress, overwrite, workers)


def _build(
    files: list[Path],
    tokenizer: str | Path | Tokenizer,
    out_prefix: str | Path,
    json_key: str,
    append_eos: bool,
    progress: bool,
    overwrite: bool,
    workers: int,
) -> dict:
    """:func:`preprocess` once its inputs and prefix are checked and the prefix is locked."""
    # a killed run's temporaries go first, also when this run is refused: they may hold gigabytes
    remove_abandoned_outputs([Path(f"{out_prefix}{ext}") for ext in (".bin", ".idx", ".json")], str(out_prefix))
    meta_path = _check_outputs(files, out_prefix, overwrite)
    tok = _open_tokenizer(tokenizer, append_eos)
    total = sum(p.stat().st_size for p in files)
    stats = {"documents": 0, "tokens": 0, "bytes": 0, "files": len(files), "decode_errors": 0}
    found: list[Found] = []
    start = time.perf_counter()
    bar = byte_progress(
        progress, total, "tokenizing", lambda: f"{stats['documents']:,} documents, {stats['tokens']:,} tokens"
    )
    splitter = Splitter(tok)
    eos = np.array([tok.eos_id] if append_eos else [], dtype=np.int64)
    pool = EncodingPool(tok, workers) if workers > 1 else None  # its processes start with the first batch
    with (
        bar,
        pool or contextlib.nullcontext(),
        IndexedDatasetBuilder(out_prefix, token_dtype(tok.vocab_size)) as builder,
    ):
        pieces = _pieces(files, json_key, splitter, bar, stats, found)
        if pool is not None:
            encoded = pool.encode(pieces)
        else:  # no Python list outlives a piece
            encoded = (None if p is None else np.array(tok.encode(p), dtype=np.int64) for p in pieces)
        _write(builder, encoded, eos, stats)
        check_text(found, json_key, out_prefix)
        warn_invalid_utf8([(f.path, f.invalid_utf8, f.documents) for f in found], "documents")
        # The old record goes just before the new .bin/.idx are installed: a crash after that leaves
        # no record rather than a wrong one, and a failure before it leaves the old dataset whole.
        builder.finalize(stale=[meta_path])
    stats["seconds"] = round(time.perf_counter() - start, 3)
    meta = {**stats, **_record(tok, builder.max_token_id, json_key, append_eos, files)}
    write_atomic(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    return stats


def _record(tok: Tokenizer, max_token_id: int, json_key: str, append_eos: bool, files: list[Path]) -> dict:
    """What ``PREFIX.json`` holds beside the stats: how the dataset was made."""
    return {
        "tokenizer": str(tok.path),
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "max_token_id": max_token_id,
        "json_key": json_key,
        "append_eos": append_eos,
        "inputs": [str(p) for p in files],
    }


def check_dataset_tokenizer(prefix: str | Path, tok: Tokenizer, fix: str | None = None) -> None:
    """Refuse to read ``<prefix>.bin`` with another tokenizer than the one :func:`preprocess` made it
    with: the sha256 recorded in ``<prefix>.json`` must be ``tok.sha256`` (the same hash of the
    ``.model`` bytes). Without that record (a dataset made elsewhere, an unreadable ``.json``) there
    is no hash to compare; the trainer still checks the largest token id (``token_range.py``)."""
    meta_path = Path(str(prefix) + ".json")
    try:
        meta = jsontext.loads(meta_path.read_text())
        recorded, made_with = meta.get("tokenizer_sha256"), meta.get("tokenizer", "another tokenizer")
    except (OSError, ValueError, AttributeError):
        return
    if recorded is not None and not isinstance(recorded, str):
        raise UserError(
            f"{meta_path} records tokenizer_sha256 {recorded!r}, not a sha256: the dataset's record is damaged; "
            f"re-run `megatron-lite preprocess --tokenizer {tok.path} --output {prefix} --overwrite ...` on its text"
        )
    if not recorded or recorded == tok.sha256:
        return
    if dataset_record(IndexedDataset(prefix)) is None:  # opened only here, where it would refuse
        log.warning(
            "%s is not the record of dataset %s (its document or token count differs): its tokenizer (%s) is "
            "not checked; rebuild the dataset with `megatron-lite preprocess ... --overwrite` to record it",
            meta_path,
            prefix,
            made_with,
        )
        return
    fix = fix or (
        f"point data.tokenizer at the tokenizer the data was made with, or re-run "
        f"`megatron-lite preprocess --tokenizer {tok.path} --output {prefix} --overwrite ...` on its text"
    )
    raise UserError(
        f"dataset {prefix} was tokenized with {made_with} (sha256 {recorded[:12]}..., recorded in {meta_path}), "
        f"not with data.tokenizer={tok.path} (sha256 {tok.sha256[:12]}...): its token ids would mean other "
        f"tokens; {fix}"
    )
