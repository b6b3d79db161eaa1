"""Finding and opening the input files of ``preprocess`` and ``tokenizer train``, compressed or not.

A file ending in ``.gz``, ``.bz2`` or ``.xz`` is decompressed as it is read (Python's own
``gzip``/``bz2``/``lzma``), and its format is that of the name without that ending
(``a.jsonl.gz`` is JSON Lines). Other compressions (``.zst``, ``.zip``, ...) are refused by name:
read as text, their bytes would be tokenized as one document of garbage with no error at all.

So is a file whose first bytes hold a NUL (:func:`check_input`): text never does, while binary
files (a dataset's ``.bin``, an image, an archive without its ending) and UTF-16/UTF-32 text hold
many. Text with some bytes that are not UTF-8 is read, each such byte replaced by U+FFFD, with a
warning naming the file and how many of its documents or lines held any (:func:`warn_invalid_utf8`).
Lines are read whole, each at most :data:`MAX_LINE_BYTES` (64 MiB, its newline included): a JSON
Lines document, a line ``tokenizer train`` samples. A longer one (a file without newlines, a
decompression bomb) is refused, naming its file and line, rather than filling memory; ``preprocess``
and ``eval --text`` read plain text in blocks, whatever its lines' lengths.
What each input of ``preprocess`` held is a :class:`Found`; :func:`check_text` refuses inputs
that hold no text at all.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import logging
import lzma
import os
import zlib
from collections import Counter
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, NamedTuple

from megatron_lite.amounts import counted
from megatron_lite.errors import UserError

_OPENERS = {
    ".gz": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    ".bz2": lambda raw: bz2.BZ2File(raw, mode="rb"),
    ".xz": lambda raw: lzma.LZMAFile(raw, mode="rb"),  # noqa: SIM115 - InputReader closes it
}
_UNSUPPORTED = (".zst", ".zstd", ".lz4", ".zip", ".7z", ".tar", ".br", ".snappy", ".parquet", ".arrow")
# What a damaged or mislabelled compressed file raises while it is read.
_DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)
MAX_LINE_BYTES = 64 << 20
"""The longest line read whole (module docstring): far longer than a corpus's documents (a novel is
a few MiB); decoded and parsed, a line takes a few times its bytes of memory."""
_SNIFF_BYTES = 8000  # where a NUL byte marks a file binary (git's own test looks as far)

log = logging.getLogger(__name__)


def compression(path: Path) -> str | None:
    """The compression suffix of ``path`` (``.gz``, ``.bz2``, ``.xz``), None for an uncompressed file;
    a :class:`UserError` for a compressed or binary format that cannot be read as text."""
    suffix, inner = path.suffix.lower(), text_suffix(path)
    for bad in (suffix, inner):
        if bad in _UNSUPPORTED:
            raise UserError(
                f"input {path}: {bad} files cannot be read (supported compressions: "
                f"{', '.join(_OPENERS)}); decompress or unpack it first, and give the text files"
            )
    return suffix if suffix in _OPENERS else None


def text_suffix(path: Path) -> str:
    """The suffix that says how to read ``path`` once decompressed: ``a.jsonl.gz`` -> ``.jsonl``."""
    if path.suffix.lower() in _OPENERS:
        path = path.with_suffix("")
    return path.suffix.lower()


class InputReader:
    """Binary reader of one input file, decompressing it when its name says so.

    Iterating yields lines (with their ``\\n``; one past :data:`MAX_LINE_BYTES` is a :class:`UserError`),
    ``read(n)`` blocks. ``advance()`` is how many bytes of the file on disk were consumed since its
    last call, so progress counts on-disk sizes, the same as the total it is measured against. A
    damaged compressed file gives one :class:`UserError` naming it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        kind = compression(path)
        self._raw = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._file: BinaryIO = _OPENERS[kind](self._raw) if kind else self._raw
        self._kind = kind
        self._done = 0
        self._lines = 0

    def _failed(self, e: Exception) -> UserError:
        return UserError(
            f"input {self.path} cannot be decompressed as {self._kind} ({type(e).__name__}: {e}); "
            "it is damaged or truncated, or its name's ending does not match its format"
        )

    def __iter__(self) -> InputReader:
        return self

    def __next__(self) -> bytes:
        try:
            line = self._file.readline(MAX_LINE_BYTES + 1)
        except _DECOMPRESS_ERRORS as e:
            if self._kind is None:
                raise
            raise self._failed(e) from e
        if not line:
            raise StopIteration
        self._lines += 1
        if len(line) > MAX_LINE_BYTES:
            raise UserError(
                f"input {self.path}:{self._lines}: line {self._lines} is longer than {MAX_LINE_BYTES >> 20} MiB, the "
                "most a line is read whole; split it into lines (a .jsonl file: one document of at most that per "
                "line), or give plain text to preprocess, which reads it in blocks"
            )
        return line

    def read(self, size: int) -> bytes:
        try:
            return self._file.read(size)
        except _DECOMPRESS_ERRORS as e:
            if self._kind is None:
                raise
            raise self._failed(e) from e

    def advance(self) -> int:
        """Bytes of the file on disk read since the last call."""
        now = self._raw.tell()
        step, self._done = now - self._done, now
        return step

    def close(self) -> None:
        self._file.close()
        self._raw.close()

    def __enter__(self) -> InputReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def check_input(path: Path) -> None:
    """Refuse an input that cannot be text, before any input is read in full: a compressed or binary
    format by its name (:func:`compression`), or a NUL byte in its first bytes (decompressed)."""
    compression(path)
    with InputReader(path) as f:
        head = f.read(_SNIFF_BYTES)
    if b"\0" in head:
        raise UserError(
            f"input {path} is not text: it holds NUL bytes (the first at byte {head.index(0)}), as binary files "
            "and UTF-16/UTF-32 text do; leave it out of --input, or convert it to UTF-8 text first"
        )


WARN_EACH = 5  # inputs named one warning each; past these, one line counts the rest


def warn_inputs(lines: Sequence[str], rest: str) -> None:
    """Log ``lines`` (one per input) as warnings, the first :data:`WARN_EACH` of them; past those, one
    more warning: how many were left out, then ``rest`` (what they have in common: ``with ...``). A run over a
    directory of thousands of files (the standard library's, a crawl's shards) stays readable."""
    for line in lines[:WARN_EACH]:
        log.warning("%s", line)
    if len(lines) > WARN_EACH:
        more = len(lines) - WARN_EACH
        log.warning("and %s %s", counted(more, "more input"), rest)


def warn_invalid_utf8(invalid: Sequence[tuple[Path, int, int]], unit: str) -> None:
    """Warn of each ``(path, invalid, read)`` whose ``invalid`` of ``read`` ``unit`` (documents, sampled
    lines) held bytes that are not UTF-8, each of which was replaced by U+FFFD in what is tokenized or
    trained on."""
    lines = [
        f"input {path}: {unit} with bytes that are not UTF-8: {bad} of {read}, each such byte replaced by U+FFFD; "
        "if the file is text in another encoding, convert it to UTF-8 first (e.g. iconv -f LATIN1 -t UTF-8)"
        for path, bad, read in invalid
        if bad
    ]
    warn_inputs(lines, f"with {unit} holding bytes that are not UTF-8 (replaced by U+FFFD)")


def files_glob(directory: str) -> str:
    """A glob of ``directory``'s files for an error's fix: the commonest suffix of the files in it
    (``dir/*.txt``), else of those beneath it (``dir/**/*.py``), hidden files aside; ``dir/*.jsonl``
    for a directory without such files. The first 10,000 entries decide: a crawl's folder stays quick."""
    root, stem = Path(directory), directory.rstrip("/")
    for pattern, entries in (("*", root.glob("*")), ("**/*", root.glob("**/*"))):
        files = (p for p in islice(entries, 10_000) if p.suffix and not p.name.startswith(".") and p.is_file())
        seen = Counter(p.suffix for p in files)
        if seen:
            return f"{stem}/{pattern}{seen.most_common(1)[0][0]}"
    return f"{stem}/*.jsonl"


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Resolve files and glob patterns into an ordered list of files (duplicates dropped: a file
    named twice, by any spelling, a link or a glob, is read once, where it first appears). A name
    that is an existing file is that file, even with glob characters in it (``data[1].jsonl``)."""
    if isinstance(inputs, str | Path):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        text = os.path.expanduser(str(item))
        if glob.has_magic(text) and not Path(text).is_file():
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True) if Path(m).is_file())
            if not matches:
                raise UserError(f"input pattern {text!r} matches no files")
            files.extend(matches)
        elif Path(text).is_dir():
            raise UserError(f"input {text} is a directory; pass files or a glob such as '{files_glob(text)}'")
        elif not Path(text).is_file():
            raise UserError(f"input file {text} not found")
        else:
            files.append(Path(text))
    if not files:
        raise UserError("no inputs given (an empty list): pass at least one input file or glob pattern")
    first: dict[str, Path] = {}
    for path in files:
        first.setdefault(os.path.realpath(path), path)
    for path in first.values():
        check_input(path)  # an unreadable format is refused before any file is read in full
    return list(first.values())


class Found(NamedTuple):
    """What one input held: bytes read (decompressed), documents, documents with any text, and
    documents with bytes that are not UTF-8."""

    path: Path
    bytes: int
    documents: int
    with_text: int
    invalid_utf8: int

    def lack(self, json_key: str) -> str | None:
        """What this input lacks, as the end of a sentence naming it; None when it has text."""
        if self.with_text:
            return None
        if not self.bytes:
            return "is empty"
        if not self.documents:
            return "has only blank lines"
        if self.documents == 1:
            return f"has one document, whose {json_key!r} is empty"
        return f"has {self.documents} documents, all with an empty {json_key!r}"


def check_text(found: list[Found], json_key: str, out_prefix: str | Path) -> None:
    """One error naming the inputs when none has any text (a dataset of nothing but document ends);
    a warning for each input without text when others have some."""
    lacking = [f"{f.path} {why}" for f in found if (why := f.lack(json_key))]
    if len(lacking) == len(found):
        more = f"; and {len(lacking) - 10} more" if len(lacking) > 10 else ""
        raise UserError(
            f"no text to tokenize: {'; '.join(lacking[:10])}{more}. Nothing was written to --output {out_prefix}; "
            "give inputs that hold text (JSON Lines: one object per line, its text under --json-key)"
        )
    tail = "it adds no text to the dataset (the other inputs have some)"
    warn_inputs([f"input {what}: {tail}" for what in lacking], "with no text to add (the other inputs have some)")
