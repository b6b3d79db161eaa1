"""Per-epoch sample indexes on disk, memory-mapped, shared by the ranks of a node (``data.index_cache``).

Megatron writes its doc-idx, sample-idx and shuffle-idx ``.npy`` files once and memory-maps them;
this does the same for ``sample_index.EpochIndex``. Every rank of a node then reads one copy from the
page cache instead of building and holding its own (``12 D + 4 S`` bytes a rank), and a restart
maps the epoch it stopped in instead of building it again.

One epoch of one split is four files, ``<split>-e<epoch>-<key>.{perm,starts,shuffle}.npy`` and
``.json`` (and an empty ``.lock``), where ``<key>`` hashes everything the index depends on
(``split_key`` plus the epoch): the dataset's document count, token count and size checksum, the
split and its document ids, seq_len, samples per epoch, the seeds, this format's version and
numpy's (the draws of its generators are what the index is). The JSON holds those fields and each
array's shape, dtype and CRC-32. Files are kept (``12 D + 4 S`` bytes an epoch read) until the
directory is removed: an epoch whose files are gone is built again.

- Writes are atomic: each file goes to a temporary sibling, is fsynced and renamed into place, the
  JSON last. No file is rewritten in place, so a rank that mapped one keeps its bytes (a mapped file
  truncated under its reader kills the reader with SIGBUS).
- One rank of a node builds: the first to hold an exclusive ``flock`` on ``<name>.lock`` (an empty
  file, left in place: removing it would let a late rank lock a new file and build a second time)
  builds and writes the epoch; the others wait on the lock, then map what it wrote. On a filesystem
  without ``flock`` every rank builds and writes the same bytes, and the renames keep that harmless
  on a local disk. A network filesystem shared by nodes may not keep a replaced file for another
  client that mapped it, so a disk local to each node is the place for the cache.
- Opening checks the JSON's key against the wanted one, each array's shape and dtype against the
  split's, and each CRC-32 (one read of the file, whose pages the node's ranks share): a truncated,
  damaged or mismatched epoch is rebuilt with a warning, never used.
- A directory that cannot be written is refused when the dataset is opened, a ``UserError`` naming
  ``data.index_cache``: the run asked for a shared index, and building it silently in every rank
  would spend the memory the cache is there to save. A write that fails later (a full disk) is
  warned about and that epoch is served from memory, so a long run is not lost to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from megatron_lite import jsontext
from megatron_lite.data.indexed import write_atomic
from megatron_lite.data.sample_index import EpochIndex, index_dtype
from megatron_lite.data.tempfiles import lock
from megatron_lite.errors import UserError

log = logging.getLogger(__name__)
FORMAT = 1  # the layout of the files; a change gives every epoch a new key
ARRAYS = ("perm", "starts", "shuffle")


def crc32(a: np.ndarray) -> int:
    """CRC-32 of an array's bytes, read in place (a mapped array is read once from the page cache)."""
    return zlib.crc32(np.ascontiguousarray(a))


def split_key(
    num_docs: int,
    num_tokens: int,
    sizes_crc: int,
    split: str,
    docs: np.ndarray,
    seq_len: int,
    samples: int,
    seed: list[int],
) -> dict:
    """The fields a split's epoch indexes depend on, but the epoch (JSON-ready)."""
    return {
        "format": FORMAT,
        "numpy": np.__version__,
        "documents": int(num_docs),
        "tokens": int(num_tokens),
        "sizes_crc32": int(sizes_crc),
        "split": split,
        "split_documents": int(docs.size),
        "split_crc32": crc32(docs),
        "seq_len": int(seq_len),
        "samples": int(samples),
        "seed": [int(s) for s in seed],
    }


def _expected(docs: int, samples: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each array of an epoch of ``docs`` documents and ``samples`` samples."""
    return {
        "perm": ((docs,), index_dtype(docs)),
        "starts": ((docs + 1,), np.dtype(np.int64)),
        "shuffle": ((samples,), index_dtype(samples)),
    }


class IndexCache:
    """Epoch indexes under one directory, created when needed and checked writable on opening."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory).expanduser()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.dir):
                pass
        except OSError as e:
            raise UserError(
                f"data.index_cache={directory}: the sample index cannot be written there "
                f"({type(e).__name__}: {e.strerror or e}); give a writable directory, best on a disk "
                "local to the node (e.g. data.index_cache=/tmp/megatron-lite-index), or leave "
                "data.index_cache empty to build the index in memory on every rank"
            ) from e

    def epoch(self, key: dict, docs: np.ndarray, build: Callable[[], EpochIndex]) -> EpochIndex:
        """The epoch ``key`` names (``split_key`` plus ``epoch``): mapped from the cache, or built
        by ``build`` (on one rank of the node at a time), written, and mapped."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        name = f"{key['split']}-e{key['epoch']}-{digest}"
        expect = _expected(docs.size, key["samples"])
        index = self._open(name, key, docs, expect, report=False)
        if index is not None:
            return index
        with self._locked(name):
            index = self._open(name, key, docs, expect, report=True)  # built by another rank meanwhile?
            if index is None:
                index = self._write(name, key, build())
        return index

    def _open(self, name: str, key: dict, docs: np.ndarray, expect: dict, report: bool) -> EpochIndex | None:
        """The mapped epoch, or None when absent or unusable (said when ``report``)."""
        meta_path = self.dir / f"{name}.json"
        if not meta_path.exists():
            return None
        arrays, problem = {}, None
        try:
            meta = jsontext.loads(meta_path.read_text())
            if meta.get("key") != key:
                problem = "its key fields differ from this split's"
            for a in ARRAYS if problem is None else ():
                arr = np.load(self.dir / f"{name}.{a}.npy", mmap_mode="r", allow_pickle=False)
                if (arr.shape, arr.dtype) != expect[a]:
                    problem = f"{a} is {arr.dtype}{list(arr.shape)}, not {expect[a][1]}{list(expect[a][0])}"
                elif crc32(arr) != meta["arrays"][a]["crc32"]:
                    problem = f"{a} does not match its checksum"
                if problem:
                    break
                arrays[a] = arr
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            problem = f"{type(e).__name__}: {e}"
        if problem is None:
            return EpochIndex(docs, **arrays)
        if report:
            log.warning("sample index cache %s is unusable (%s): rebuilding it", meta_path.with_suffix(".*"), problem)
        return None

    def _write(self, name: str, key: dict, index: EpochIndex) -> EpochIndex:
        """Write ``index`` (arrays first, the JSON that makes them valid last) and return it mapped;
        on a failed write, warn and return it as built."""
        arrays = {a: getattr(index, a) for a in ARRAYS}
        meta = {
            "key": key,
            "arrays": {
                a: {"shape": list(v.shape), "dtype": str(v.dtype), "crc32": crc32(v)} for a, v in arrays.items()
            },
        }
        try:
            for a, v in arrays.items():
                write_atomic(self.dir / f"{name}.{a}.npy", lambda f, v=v: np.save(f, v, allow_pickle=False))
            write_atomic(self.dir / f"{name}.json", (json.dumps(meta, indent=1) + "\n").encode())
            mapped = {a: np.load(self.dir / f"{name}.{a}.npy", mmap_mode="r", allow_pickle=False) for a in ARRAYS}
        except OSError as e:
            log.warning(
                "could not write the sample index of %s epoch %d to data.index_cache=%s (%s: %s): "
                "serving it from memory",
                key["split"],
                key["epoch"],
                self.dir,
                type(e).__name__,
                e.strerror or e,
            )
            return index
        return EpochIndex(index.docs, **mapped)  # the built arrays are freed: only shared pages remain

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """Hold an exclusive ``flock`` on ``<name>.lock`` where the filesystem has one."""
        try:
            held = open(self.dir / f"{name}.lock", "ab")  # noqa: SIM115 - closed below
        except OSError:
            yield  # the write that follows reports the directory's problem
            return
        try:
            lock(held.fileno(), wait=True)  # None: no flock here (some network filesystems), each rank builds
            yield
        finally:
            held.close()  # releases the lock
