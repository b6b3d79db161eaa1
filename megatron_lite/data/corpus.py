"""A corpus every machine already has: the Python standard library's own ``.py`` source (~30 MB).

It lets ``megatron-lite train`` run end to end with no download: the first call trains a tokenizer
on it and tokenizes it into ``<cache_dir>/stdlib-<X.Y>-v<vocab>-<hash>/`` (``tokenizer.model``,
``data.bin``/``.idx``, ``manifest.json``); later calls reuse that folder while its manifest (file
list with sizes, tokenizer sha256) still matches this interpreter's files. ``<hash>`` is a short hash
of that file list (paths and sizes) and the vocabulary size, so two interpreters of one X.Y whose
standard libraries differ (patch releases) each have their own folder, and neither build replaces
the corpus another run may be reading; interpreters with the same files share one. A folder named
``stdlib-<X.Y>-v<vocab>`` (without the hash) whose manifest matches is reused as it is. The folder is built
under a temporary name and renamed when complete, so an interrupted build never leaves a cache that
looks valid, and ranks racing to build it end up sharing whichever copy landed first. A build holds
its folder's marker (:data:`_BUILDING`) locked from the folder's first moment to its last
(``tempfiles.py``), so the next build removes, naming it, the folder of a build that was killed (of
either name, and no other: ranks building it at the same time are still writing).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import sysconfig
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from megatron_lite import jsontext
from megatron_lite.amounts import byte_size, counted
from megatron_lite.data.indexed import IndexedDataset, write_atomic
from megatron_lite.data.inputs import log as inputs_log
from megatron_lite.data.preprocess import preprocess
from megatron_lite.data.tempfiles import create_locked, locked_if_abandoned
from megatron_lite.data.tokenizer import Tokenizer, train_tokenizer
from megatron_lite.errors import UserError

MANIFEST_VERSION = 1
_TOKENIZER_SAMPLE_BYTES = 8_000_000  # BPE on 8 MB: ~10 s here; more barely changes the merges
_BUILDING = ".building"
"""The file in a build folder that its build holds locked until it ends (``tempfiles.py``)."""
log = logging.getLogger(__name__)


def default_corpus_files() -> list[Path]:
    """Every ``.py`` file of the standard library, sorted; installed packages (site-packages) excluded."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in stdlib.rglob("*.py") if p.is_file() and not skip & set(p.relative_to(stdlib).parts))


def _say(progress: bool, message: str) -> None:
    """A phase of the build, logged (dated, as the run's other lines in a job log) where ``progress``."""
    if progress:
        log.info("%s", message)


def _manifest(files: list[Path], vocab_size: int) -> dict:
    return {
        "version": MANIFEST_VERSION,
        "vocab_size": vocab_size,
        "files": [[str(p), p.stat().st_size] for p in files],
    }


def _cache_problem(folder: Path, expected: dict) -> str | None:
    """Why ``folder`` is not a complete build for exactly ``expected``'s files and vocab, or None."""
    try:
        manifest = jsontext.loads((folder / "manifest.json").read_text())
        sha = manifest.pop("tokenizer_sha256")
    except (OSError, ValueError, KeyError, AttributeError) as e:
        return f"no readable manifest.json ({type(e).__name__})"
    if manifest != expected:
        return "built from other files or another vocabulary size (the standard library changed?)"
    try:
        if hashlib.sha256((folder / "tokenizer.model").read_bytes()).hexdigest() != sha:
            return "tokenizer.model differs from the one it was built with"
        IndexedDataset(folder / "data")
    except (OSError, ValueError, UserError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _cache_matches(folder: Path, expected: dict) -> bool:
    return _cache_problem(folder, expected) is None


def _build(tmp: Path, final: Path, files: list[Path], vocab_size: int, expected: dict, progress: bool) -> int:
    """Train the tokenizer and tokenize ``files`` into ``tmp`` (to be renamed ``final``); returns the
    token count."""
    size = byte_size(sum(size for _, size in expected["files"]))
    _say(progress, f"training tokenizer on {size} of stdlib source ({counted(len(files), 'file')})...")
    with _inputs_as_they_are():
        model = train_tokenizer(files, tmp / "tokenizer", vocab_size, _TOKENIZER_SAMPLE_BYTES, progress=progress)
        _say(progress, f"tokenizing {counted(len(files), 'file')} with a {vocab_size}-token vocabulary...")
        stats = preprocess([str(p) for p in files], model, tmp / "data", progress=progress)
    if stats["decode_errors"]:
        n = stats["decode_errors"]
        _say(progress, f"({n} file{'s are' if n > 1 else ' is'} test data in another encoding: read with U+FFFD)")
    # The dataset's record names its tokenizer where it will be, not in the build folder renamed away.
    record = jsontext.loads((tmp / "data.json").read_text())
    record["tokenizer"] = str(final / "tokenizer.model")
    write_atomic(tmp / "data.json", (json.dumps(record, indent=1) + "\n").encode())
    manifest = {**expected, "tokenizer_sha256": Tokenizer(model).sha256}
    write_atomic(tmp / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    return int(stats["tokens"])


@contextlib.contextmanager
def _inputs_as_they_are() -> Iterator[None]:
    """Hold back the warnings about single inputs (``data/inputs.py``) while the standard library is
    read: its empty ``__init__.py`` files and its test files in other encodings are what they are
    meant to be, and no user can act on a warning naming them."""
    level = inputs_log.level
    inputs_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        inputs_log.setLevel(level)


def _start_build(cache_dir: Path, name: str) -> tuple[Path, BinaryIO]:
    """A new build folder for ``name`` in ``cache_dir``, with its marker, and the marker's open file,
    locked from its creation: the build holds it open until it ends."""
    tmp = cache_dir / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        return tmp, create_locked(tmp / _BUILDING)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_abandoned_builds(cache_dir: Path, name: str) -> None:
    """Delete the build folders of ``name`` that no live build holds (its marker's lock can be
    taken), with a warning naming each; a folder without a marker, or on a filesystem without
    locks, is left as it is."""
    pattern = re.compile(re.escape(f".{name}.tmp-") + r"\d+-[0-9a-f]{8}")
    for entry in sorted(os.listdir(cache_dir)):
        tmp = cache_dir / entry
        if not pattern.fullmatch(entry) or tmp.is_symlink() or not tmp.is_dir():
            continue
        try:
            with locked_if_abandoned(tmp / _BUILDING) as abandoned:
                if abandoned:
                    log.warning("removing %s, the folder of a corpus build that did not finish (it was killed)", tmp)
                    shutil.rmtree(tmp)
        except OSError:  # no marker (gone meanwhile, still starting), or not ours to delete: left as it is
            pass


def _install(tmp: Path, final: Path, expected: dict) -> None:
    """Move a finished build into place, replacing a stale cache; a concurrent winner is kept."""
    if _cache_matches(final, expected):
        return  # another process finished the same build first: keep it, ours is deleted
    if final.exists():
        stale = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(OSError):  # another process may have moved it first
            os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    (tmp / _BUILDING).unlink()  # the build still holds it open: its lock lasts to the end
    try:
        os.rename(tmp, final)
    except OSError:
        if not _cache_matches(final, expected):  # lost a race to a build we cannot use
            raise


def _folder_names(expected: dict, default: bool) -> list[str]:
    """Names of the cache folders that may hold the build ``expected`` describes, the one a build
    makes first: named by the manifest's hash (:data:`MANIFEST_VERSION`, files with sizes,
    vocabulary), and, for the standard library (``default``), the name without the hash."""
    version = ".".join(platform.python_version().split(".")[:2])
    digest = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:10]
    name = f"stdlib-{version}-v{expected['vocab_size']}"
    return [f"{name}-{digest}", *([name] if default else [])]


def _corpus_files(files: Sequence[str | Path] | None) -> list[Path]:
    paths = sorted(Path(p) for p in files) if files is not None else default_corpus_files()
    if not paths:
        raise UserError("no corpus files: no .py files found under the standard library (sysconfig stdlib path)")
    return paths


def _locate(cache_dir: Path, paths: list[Path], vocab_size: int, default: bool) -> tuple[Path, bool]:
    expected = _manifest(paths, vocab_size)
    names = _folder_names(expected, default)
    ready = next((cache_dir / n for n in names if _cache_matches(cache_dir / n, expected)), None)
    return (ready, True) if ready is not None else (cache_dir / names[0], False)


def locate_default_corpus(
    cache_dir: str | Path, vocab_size: int, files: Sequence[str | Path] | None = None
) -> tuple[Path, bool]:
    """``(folder, ready)``: the cache folder :func:`prepare_default_corpus` reads for these arguments,
    and whether a complete build for exactly this interpreter's files is there (else a build makes
    that folder). Builds nothing: it lists and stats the files and reads the folder's manifest."""
    return _locate(Path(cache_dir).expanduser(), _corpus_files(files), vocab_size, default=files is None)


def prepare_default_corpus(
    cache_dir: str | Path,
    vocab_size: int,
    progress: bool = True,
    files: Sequence[str | Path] | None = None,
) -> tuple[str, Path]:
    """Build (or reuse) the stdlib corpus; returns ``(dataset prefix, tokenizer model path)``.

    ``files`` replaces the stdlib file list (tests use a handful of files); its folder is named by
    its files as the standard library's is (:func:`locate_default_corpus`).
    """
    paths, cache_dir = _corpus_files(files), Path(cache_dir).expanduser()
    final, ready = _locate(cache_dir, paths, vocab_size, default=files is None)
    if ready:
        return str(final / "data"), final / "tokenizer.model"
    name, expected = final.name, _manifest(paths, vocab_size)
    if cache_dir.is_dir():
        for folder in _folder_names(expected, default=files is None):  # a killed build of either name
            _remove_abandoned_builds(cache_dir, folder)
    if final.exists():
        _say(progress, f"the corpus cache {final} cannot be used ({_cache_problem(final, expected)}): rebuilding it")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp, held = _start_build(cache_dir, name)
    start = time.perf_counter()
    with held:
        try:
            tokens = _build(tmp, final, paths, vocab_size, expected, progress)
            _install(tmp, final, expected)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _say(progress, f"corpus ready in {final}: {tokens:,} tokens ({time.perf_counter() - start:.1f} s)")
    return str(final / "data"), final / "tokenizer.model"
