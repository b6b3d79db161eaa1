"""Memory-mapped token storage: ``<prefix>.bin`` (raw ids) and ``<prefix>.idx`` (document table).

The same split as Megatron's ``MMapIndexedDataset``: the ``.bin`` file is every document's token ids
back to back, so a training run maps it once and reads windows without copying or parsing; the
``.idx`` file says where each document starts. Our ``.idx`` layout (little-endian, version 1)::

    magic       8 bytes   b"MLITEIDX"
    version     uint64    1
    dtype code  uint64    1 = uint16, 2 = int32
    num_docs    uint64    N
    num_tokens  uint64    total ids in .bin
    offsets     int64[N]  first token of each document, in tokens
    sizes       int64[N]  tokens in each document

It is not byte-compatible with Megatron's ``MMIDIDX`` files (different magic), so a foreign file is
rejected by name instead of being misread. Everything a damaged pair could get wrong is checked on
open, because a misread index trains silently on garbage. The document table is mapped too, and
checked a chunk at a time: ``offsets`` and ``sizes`` are read-only views of the map, whose pages
every rank of a node shares, instead of 16 bytes a document copied into each rank.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from megatron_lite.data.tempfiles import create_temp
from megatron_lite.errors import UserError

MAGIC = b"MLITEIDX"
VERSION = 1
_HEADER = struct.Struct("<8sQQQQ")  # magic, version, dtype code, num_docs, num_tokens
_DTYPE_CODES = {1: np.dtype(np.uint16), 2: np.dtype(np.int32)}
_CODE_OF_DTYPE = {dtype: code for code, dtype in _DTYPE_CODES.items()}
_CHECK_CHUNK = 1 << 22  # .idx documents checked at a time on open (~100 MiB of temporaries)
_REBUILD = "rebuild with `megatron-lite preprocess`"


def token_dtype(vocab_size: int) -> np.dtype:
    """The storage dtype for a vocabulary: uint16 halves the file when every id fits.

    The cut is 65,500 rather than 65,536 to leave room for a few ids added after preprocessing.
    """
    return np.dtype(np.uint16) if vocab_size < 65_500 else np.dtype(np.int32)


def write_atomic(path: str | Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write ``data`` (bytes, or a function writing them to the open file) to ``path`` via a temporary
    sibling, an fsync and a rename, so readers never see half a file and a mapping of the file it
    replaces keeps its bytes (a temporary a killed writer left is removable by
    ``tempfiles.remove_abandoned``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, f = create_temp(path)
    with f:  # locked until renamed
        try:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def check_output_prefix(prefix: str | Path, writes: str) -> None:
    """Refuse an output prefix that names a directory (``out/``, ``.``): its files would be hidden
    dot-files (``out/.bin``). ``writes``: what the prefix becomes, for the message (``NAME.bin, ...``)."""
    text = str(prefix)
    if os.path.basename(text) in ("", ".", ".."):
        raise UserError(
            f"--output {text} names a directory, not a file prefix; give a name inside it, e.g. "
            f"--output {os.path.join(text, 'NAME')} (writes {writes})"
        )


def check_outputs_spare_inputs(inputs: Sequence[Path], outputs: Sequence[Path], prefix: str | Path) -> None:
    """Refuse a run that would write one of its outputs over one of its own inputs (it reads the
    input, then replaces it: the user's source text would be gone)."""
    for out in outputs:
        for src in inputs:
            if out.exists() and os.path.samefile(src, out):
                raise UserError(
                    f"input {src} is also an output of --output {prefix} (which writes "
                    f"{', '.join(o.name for o in outputs)}) and would be overwritten; choose another --output prefix"
                )


def check_not_replacing(outputs: Sequence[Path], prefix: str | Path, what: str, overwrite: bool) -> None:
    """Refuse, unless ``overwrite`` (``--overwrite``), a run that would replace ``outputs`` an earlier
    run wrote. ``what``: what those files are and what depends on them, for the message."""
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not overwrite:
        raise UserError(
            f"--output {prefix} would replace {', '.join(existing)}: {what}; pass --overwrite to replace "
            "it, or choose another --output prefix"
        )


def _paths(prefix: str | Path) -> tuple[Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class IndexedDatasetBuilder:
    """Streams documents into a new ``<prefix>.bin``/``.idx`` pair.

    Tokens go straight to a temporary ``.bin`` (memory holds only the per-document sizes);
    ``finalize()`` writes the ``.idx`` and renames both into place, the ``.idx`` last, so a crash at
    any point leaves either the previous dataset, no dataset, or a ``.bin`` without ``.idx``
    (reported as missing on open), never a pair that opens but is wrong. Use it as a context manager
    to finalize on success and delete the temporary files on error; the ones a killed process leaves
    stay locked only while it lives, and ``tempfiles.remove_abandoned`` deletes them after.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type = np.uint16) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF_DTYPE:
            raise ValueError(f"token dtype must be uint16 or int32, got {self.dtype}")
        self.bin_path, self.idx_path = _paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin, self._file = create_temp(self.bin_path)  # closed by finalize()/abort()
        self._tmp_idx: Path | None = None
        self._sizes = array("q")
        self._max_id = np.iinfo(self.dtype).max
        self._top = -1  # the largest id added so far
        self._open_size: int | None = None  # tokens so far of a document begun by add_tokens()
        self._done = False

    def add_tokens(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append ids to the current document, which ``end_document()`` closes.

        Lets a long document go to disk in pieces, so memory never holds all of its ids at once.
        """
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"a document must be a 1-D sequence of ids, got shape {arr.shape}")
        if arr.size:
            low, high = int(arr.min()), int(arr.max())
            if low < 0 or high > self._max_id:
                # A silent wrap to uint16 would corrupt the data without any error later.
                raise ValueError(f"token ids must lie in [0, {self._max_id}] for {self.dtype}, got {low}..{high}")
            self._top = max(self._top, high)
        self._file.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        self._open_size = (self._open_size or 0) + arr.size

    def end_document(self) -> None:
        """Close the document that ``add_tokens()`` calls built (with no such call: an empty document)."""
        self._sizes.append(self._open_size or 0)
        self._open_size = None

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document (a sequence of token ids; may be empty)."""
        if self._open_size is not None:
            raise ValueError("add_document() inside a document begun by add_tokens(); call end_document() first")
        self.add_tokens(ids)
        self.end_document()

    @property
    def num_tokens(self) -> int:
        return int(sum(self._sizes))

    @property
    def max_token_id(self) -> int | None:
        """The largest id added so far, None before any (``preprocess`` records it with the dataset)."""
        return None if self._top < 0 else self._top

    def finalize(self, stale: Sequence[Path] = ()) -> Path:
        """Write the index and move both files into place; returns the ``.idx`` path. ``stale``:
        files describing the dataset being replaced, deleted only once the new pair is complete."""
        if self._open_size is not None:
            raise ValueError("a document begun by add_tokens() was never closed with end_document()")
        sizes = np.frombuffer(self._sizes, dtype=np.int64) if self._sizes else np.zeros(0, np.int64)
        offsets = np.zeros_like(sizes)
        np.cumsum(sizes[:-1], out=offsets[1:])
        self._file.flush()
        os.fsync(self._file.fileno())
        header = _HEADER.pack(MAGIC, VERSION, _CODE_OF_DTYPE[self.dtype], sizes.size, int(sizes.sum()))
        self._tmp_idx, f = create_temp(self.idx_path)
        with f:  # both temporaries stay open, so locked (tempfiles.py), until renamed
            f.write(header)
            f.write(offsets.astype("<i8").tobytes())
            f.write(sizes.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
            for path in stale:
                path.unlink(missing_ok=True)
            # .idx is what marks a dataset complete: drop the old one before the .bin changes under it.
            self.idx_path.unlink(missing_ok=True)
            os.replace(self._tmp_bin, self.bin_path)
            os.replace(self._tmp_idx, self.idx_path)
        self._file.close()
        self._done = True
        return self.idx_path

    def abort(self) -> None:
        """Close and delete the temporary files; the destination is left as it was."""
        self._tmp_bin.unlink(missing_ok=True)
        if self._tmp_idx is not None:
            self._tmp_idx.unlink(missing_ok=True)
        self._file.close()
        self._done = True

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._done:
            return
        if exc_type is None:
            try:
                self.finalize()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def _corrupt(path: Path, what: str) -> UserError:
    return UserError(f"corrupt .idx {path}: {what}; {_REBUILD}")


def _check_table(idx_path: Path, offsets: np.ndarray, sizes: np.ndarray) -> None:
    """No negative size, each document starts where the one before ends (the first at 0), and no
    end wraps past int64 (crafted sizes such as ``2**63 - 1`` twice would otherwise wrap around to
    a small total that matches the header and the ``.bin``).

    Read in chunks of ``_CHECK_CHUNK`` documents, so a mapped table is never copied whole.
    """
    for lo in range(0, sizes.size, _CHECK_CHUNK):
        negative = np.flatnonzero(sizes[lo : lo + _CHECK_CHUNK] < 0)
        if negative.size:
            raise _corrupt(idx_path, f"negative document size at document {lo + int(negative[0])}")
    expected = 0  # where the next document must start
    for lo in range(0, sizes.size, _CHECK_CHUNK):
        starts = np.asarray(offsets[lo : lo + _CHECK_CHUNK])
        with np.errstate(over="ignore"):
            ends = starts + sizes[lo : lo + _CHECK_CHUNK]  # a wrap makes an end smaller than its start
        misplaced = starts != np.concatenate(([expected], ends[:-1]))
        bad = np.flatnonzero(misplaced | (ends < starts))
        if bad.size:
            doc = lo + int(bad[0])
            if misplaced[doc - lo]:
                raise _corrupt(
                    idx_path, f"document {doc} starts at token {offsets[doc]}, not where the one before ends"
                )
            raise _corrupt(idx_path, f"document {doc} of {sizes[doc]} tokens ends past the largest offset int64 holds")
        expected = int(ends[-1])


def _read_index(idx_path: Path) -> tuple[np.dtype, int, np.ndarray, np.ndarray]:
    """Parse and check an ``.idx`` file; returns (dtype, num_tokens, offsets, sizes)."""
    file_size = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) >= len(MAGIC) and head[: len(MAGIC)] != MAGIC:
        raise _corrupt(idx_path, f"bad magic bytes {head[: len(MAGIC)]!r} (expected {MAGIC!r})")
    if len(head) < _HEADER.size:
        raise _corrupt(idx_path, f"truncated header ({len(head)} of {_HEADER.size} bytes)")
    _, version, code, num_docs, num_tokens = _HEADER.unpack(head)
    if version != VERSION:
        raise _corrupt(idx_path, f"unsupported version {version} (this megatron-lite reads version {VERSION})")
    if code not in _DTYPE_CODES:
        raise _corrupt(idx_path, f"unknown dtype code {code} (known: {sorted(_DTYPE_CODES)})")
    expected = _HEADER.size + 16 * num_docs
    if file_size != expected:
        state = "truncated" if file_size < expected else "has trailing bytes"
        raise _corrupt(idx_path, f"{state}: {file_size} bytes, expected {expected} for {num_docs} documents")
    if num_docs:
        # Mapped, not read: the table stays in the page cache, shared by every rank on the node.
        # A plain ndarray view of the map: indexing an np.memmap costs twice as much per element.
        table = np.asarray(np.memmap(idx_path, dtype="<i8", mode="r", offset=_HEADER.size, shape=(2 * num_docs,)))
    else:
        table = np.zeros(0, "<i8")
    offsets, sizes = table[:num_docs], table[num_docs:]
    _check_table(idx_path, offsets, sizes)
    if int(sizes.sum()) != num_tokens:
        raise _corrupt(idx_path, f"header says {num_tokens} tokens but document sizes add up to {int(sizes.sum())}")
    return _DTYPE_CODES[code], int(num_tokens), offsets, sizes


class IndexedDataset:
    """Read-only view of a ``<prefix>.bin``/``.idx`` pair, validated on open.

    ``get`` returns views into the memory map (no copy): do not write into them.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = _paths(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise UserError(f"dataset file {path} not found; build it with `megatron-lite preprocess`")
        self.dtype, self.num_tokens, self.offsets, self.sizes = _read_index(self.idx_path)
        bin_size = self.bin_path.stat().st_size
        if bin_size != self.num_tokens * self.dtype.itemsize:
            need = self.num_tokens * self.dtype.itemsize
            raise _corrupt(
                self.idx_path,
                f"it describes {self.num_tokens} {self.dtype} tokens ({need} bytes) "
                f"but {self.bin_path} has {bin_size} bytes",
            )
        # np.memmap refuses empty files; an empty dataset is legal (it just has no samples).
        if bin_size:
            self._tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        else:
            self._tokens = np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return int(self.sizes.size)

    def get(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of document ``doc`` (to its end when length is None)."""
        if not 0 <= doc < len(self):
            raise IndexError(f"document {doc} out of range for {len(self)} documents in {self.prefix}")
        size = int(self.sizes[doc])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"span [{offset}, {offset + length}) outside document {doc} of {size} tokens")
        start = int(self.offsets[doc]) + offset
        return self._tokens[start : start + length]

    def max_token_id(self) -> int:
        """The largest id in the ``.bin`` (-1 when empty), read in full: cheap for a file in the page
        cache (GB/s), disk speed otherwise."""
        return int(self._tokens.max()) if self._tokens.size else -1

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}, docs={len(self)}, tokens={self.num_tokens}, dtype={self.dtype})"
