"""Where checkpoints live: a local directory, or any fsspec URL (``s3://bucket/run`` through s3fs).

Local directories get POSIX atomicity: files are written and fsynced, a save goes to a hidden
``.tmp-step_*`` directory renamed into place, and small files are replaced with ``os.replace``.
Object stores have no rename, so a remote save writes straight into ``step_*/`` and the commit is
``metadata.json``, one PUT written after everything else (``format.py``). Rank files are written
to a local spool file first (safetensors needs a seekable file) and then uploaded: by ``s5cmd``
when it is on PATH and the URL is ``s3://`` (multipart upload in parallel), else by fsspec
(s3fs uploads the parts of a large file with ``max_concurrency`` requests in flight). Credentials
and endpoints come from the usual environment (``AWS_*``), never from the config.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from megatron_lite.checkpoint.format import METADATA, STAGING_DIR, STEP_DIR, TMP_PREFIX, sha256_file
from megatron_lite.errors import UserError

UPLOAD_CONCURRENCY = 8  # parts in flight per file: saturates ~10 Gb/s links in s3fs's measurements


def is_url(path: str | Path) -> bool:
    """True for ``scheme://...`` other than ``file://``."""
    return "://" in str(path) and not str(path).startswith("file://")


class Storage:
    """One checkpoint root; every path argument is relative to it (``step_00000100/rank_00000...``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = str(root).rstrip("/")
        self.remote = is_url(self.root)
        self._spool: Path | None = None
        if self.remote:
            import fsspec

            try:
                self.fs, self._base = fsspec.core.url_to_fs(self.root)
            except (ImportError, ValueError) as e:
                raise UserError(
                    f"checkpoint.dir={self.root!r}: {e} (s3:// needs `pip install megatron-lite[s3]`)"
                ) from None
        else:
            self.root = str(Path(self.root.removeprefix("file://")))

    def url(self, rel: str = "") -> str:
        """The full location of ``rel``, for messages and for readers."""
        return f"{self.root}/{rel}" if rel else self.root

    def _local(self, rel: str) -> Path:
        return Path(self.root) / rel

    def _remote(self, rel: str) -> str:
        return f"{self._base}/{rel}"

    # ---- listing and small files -------------------------------------------------------------
    def step_dirs(self) -> list[str]:
        """Names of ``step_*`` directories, oldest first (complete or not: see ``step_dir.py``)."""
        if self.remote:
            names = (
                [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._base, detail=False)]
                if self.fs.exists(self._base)
                else []
            )
        else:
            root = Path(self.root)
            names = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
        return sorted(n for n in names if STEP_DIR.match(n))

    def staging_dirs(self) -> list[str]:
        """Local ``.tmp-step_*`` (and ``.tmp-replaced-step_*``) directories: saves that never reached
        their commit (none remote, where a save writes straight into ``step_*/``). Only a save in
        flight has one legitimately. Other ``.tmp-*`` names are not ours (``convert to-hf`` stages
        ``--out NAME`` in ``.tmp-NAME``) and are never listed."""
        root = Path(self.root)
        if self.remote or not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if STAGING_DIR.match(p.name) and p.is_dir())

    def names(self, rel: str) -> list[str]:
        """Names of the entries directly inside directory ``rel`` (none when it does not exist)."""
        if self.remote:
            if not self.fs.exists(self._remote(rel)):
                return []
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._remote(rel), detail=False)]
        path = self._local(rel)
        return [p.name for p in path.iterdir()] if path.is_dir() else []

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._remote(rel)) if self.remote else self._local(rel).exists()

    def size(self, rel: str) -> int | None:
        """Bytes of file ``rel``, None when it does not exist."""
        try:
            return int(self.fs.size(self._remote(rel))) if self.remote else self._local(rel).stat().st_size
        except (FileNotFoundError, OSError):
            return None

    def read_text(self, rel: str) -> str:
        """Contents of ``rel``; FileNotFoundError when missing."""
        if self.remote:
            return self.fs.cat_file(self._remote(rel)).decode()
        return self._local(rel).read_text()

    def write_text(self, rel: str, text: str) -> None:
        """Replace ``rel`` with ``text`` atomically (local: temp file, fsync, rename; remote: one PUT)."""
        if self.remote:
            self.fs.pipe_file(self._remote(rel), text.encode())
            return
        path = self._local(rel)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with tmp.open("w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # left only by a failure (a full disk)

    @property
    def creates_exclusively(self) -> bool:
        """Whether :meth:`create_text` is one request that the store itself refuses when the object exists:
        a local O_EXCL open, or an fsspec client whose ``pipe_file(..., mode="create")`` sends the store's
        conditional create (s3fs >= 2024.12: S3's ``If-None-Match: *``; gcsfs: ``ifGenerationMatch=0``;
        fsspec's ``memory://``), not fsspec's generic stand-in (an existence check, then a write). Whether
        the store honours the condition is known only once it refused one (``claim.py``)."""
        if not self.remote:
            return True
        from fsspec.asyn import AsyncFileSystem
        from fsspec.spec import AbstractFileSystem

        asynchronous = isinstance(self.fs, AsyncFileSystem)
        method = type(self.fs)._pipe_file if asynchronous else type(self.fs).pipe_file
        generic = AsyncFileSystem._pipe_file if asynchronous else AbstractFileSystem.pipe_file
        return method is not generic and "mode" in inspect.signature(method).parameters

    def create_text(self, rel: str, text: str) -> None:
        """Write ``rel`` only where nothing is there: FileExistsError when it exists, or when another
        create of it was in flight (S3 answers 409 ConditionalRequestConflict to all but one of concurrent
        creates). Only where :attr:`creates_exclusively` (elsewhere fsspec checks, then writes, or the
        client lacks the mode)."""
        if self.remote:
            try:
                self.fs.pipe_file(self._remote(rel), text.encode(), mode="create")
            except OSError as e:
                if _conflicting_create(e):
                    raise FileExistsError(f"{self.url(rel)}: another create of it was in flight ({e})") from e
                raise
            return
        with self._local(rel).open("x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def sha256(self, rel: str) -> str:
        """Hex sha256 of file ``rel`` (remote: streamed, not stored)."""
        return sha256_file(self.fetch(rel)) if self.remote else sha256_file(self._local(rel))

    # ---- saving --------------------------------------------------------------------------------
    def staging_name(self, final: str) -> str:
        """Where a save of ``final`` is written before its commit."""
        return final if self.remote else TMP_PREFIX + final

    def begin(self, final: str) -> str:
        """Prepare an empty staging directory for ``final`` (rank 0 only); returns its name."""
        staging = self.staging_name(final)
        self.remove(staging)
        if not self.remote:
            self._local(staging).mkdir(parents=True)
        return staging

    def writable_path(self, rel: str) -> Path:
        """A local path to write file ``rel`` to, then :meth:`publish` it."""
        if not self.remote:
            return self._local(rel)
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix="megatron-lite-spool-"))
        return self._spool / rel.replace("/", "__")

    def publish(self, local: Path, rel: str) -> None:
        """Upload a file written at :meth:`writable_path` (remote), then drop the spool copy."""
        if not self.remote:
            return
        try:
            s5cmd = shutil.which("s5cmd") if self.root.startswith("s3://") else None
            if s5cmd:
                self._s5cmd_upload(s5cmd, local, rel)
            else:
                extra = {"max_concurrency": UPLOAD_CONCURRENCY} if self.root.startswith("s3://") else {}
                self.fs.put_file(str(local), self._remote(rel), **extra)
        finally:
            local.unlink(missing_ok=True)

    def _s5cmd_upload(self, s5cmd: str, local: Path, rel: str) -> None:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        cmd = [s5cmd, *(["--endpoint-url", endpoint] if endpoint else []), "cp", str(local), self.url(rel)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise OSError(f"s5cmd upload of {rel} failed: {done.stderr.strip()[-500:]}")

    def copy_in(self, src: Path, rel: str) -> None:
        """Copy a local file (the tokenizer) into the checkpoint."""
        if self.remote:
            self.fs.put_file(str(src), self._remote(rel))
        else:
            shutil.copyfile(src, self._local(rel))

    def commit(self, staging: str, final: str) -> None:
        """Make ``staging`` visible as ``final`` (local: rename over any older ``final``)."""
        if self.remote:
            return
        old, aside = self._local(final), self._local(f"{TMP_PREFIX}replaced-{final}")
        if old.exists():  # re-saving a step (after a resume) replaces it only once the new one is complete:
            shutil.rmtree(aside, ignore_errors=True)  # renamed aside, not deleted first, so a crash
            os.replace(old, aside)  # between leaves no window without either; removed after the rename
        os.replace(self._local(staging), old)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself is durable
        finally:
            os.close(fd)
        shutil.rmtree(aside, ignore_errors=True)

    def finish_interrupted_commit(self) -> list[str]:
        """Local: finish a :meth:`commit` killed between its two renames (``step_N`` set aside as
        ``.tmp-replaced-step_N``, the new copy still staged): without this the step would be missing
        and pruning would then remove both copies. The staged copy goes into place when it holds its
        ``metadata.json`` (written before the commit: a complete save), else the old one goes back.
        Returns the steps put back. Only the run that owns the directory calls it, before resuming."""
        root, restored = Path(self.root), []
        if self.remote or not root.is_dir():
            return restored
        for aside in sorted(root.glob(f"{TMP_PREFIX}replaced-step_*")):
            final = root / aside.name.removeprefix(f"{TMP_PREFIX}replaced-")
            staged = root / f"{TMP_PREFIX}{final.name}"
            if not STEP_DIR.match(final.name) or final.exists():
                continue  # the commit's first rename never happened, or its second did: pruning's to clean
            os.replace(staged if (staged / METADATA).is_file() else aside, final)
            restored.append(final.name)
        return restored

    def remove(self, rel: str) -> None:
        """Delete a file or directory tree if present."""
        if self.remote:
            if self.fs.exists(self._remote(rel)):
                self.fs.rm(self._remote(rel), recursive=True)
        elif self._local(rel).is_dir():
            shutil.rmtree(self._local(rel), ignore_errors=True)
        else:
            self._local(rel).unlink(missing_ok=True)

    # ---- loading -------------------------------------------------------------------------------
    def fetch(self, rel: str) -> Path:
        """A local path holding file ``rel``: itself, or a download cached for this process."""
        if not self.remote:
            return self._local(rel)
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix="megatron-lite-spool-"))
        local = self._spool / ("cache__" + rel.replace("/", "__"))
        if not local.exists():
            part = local.with_name(local.name + ".part")
            self.fs.get_file(self._remote(rel), str(part))
            os.replace(part, local)
        return local

    def close(self) -> None:
        """Drop the local spool and download cache."""
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None


def _conflicting_create(e: OSError) -> bool:
    """S3's answer to a conditional create while another create of the object is in flight: 409
    ConditionalRequestConflict, which s3fs passes on as a plain OSError caused by botocore's error."""
    response = getattr(e.__cause__, "response", None)
    return isinstance(response, dict) and response.get("Error", {}).get("Code") == "ConditionalRequestConflict"


def commit_stamp(step_dir: Path) -> tuple[int, int] | None:
    """What identifies this commit of a local step directory: its ``metadata.json``'s inode and mtime
    (a re-save replaces the file, pruning removes it); None when it is gone."""
    try:
        st = (Path(step_dir) / METADATA).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


class CheckpointGoneError(UserError):
    """The checkpoint a reader was reading was removed or replaced meanwhile (:func:`kept_while_read`)."""


@contextlib.contextmanager
def kept_while_read(step_dir: Path, stamp: tuple[int, int] | None, doing: str, fix: str) -> Iterator[None]:
    """A failure to read the checkpoint in ``step_dir`` (an OSError, or its re-verification finding
    none) when it was meanwhile removed or replaced (``stamp``, from :func:`commit_stamp` when it was
    opened, no longer matches: a training run still saving into its directory prunes old steps) is
    one :class:`UserError` saying so, what the reader was ``doing`` and ``fix`` (what to do with a copy)."""
    try:
        yield
    except CheckpointGoneError:  # said already, by a reader this one called
        raise
    except (OSError, UserError) as e:
        if stamp is None or commit_stamp(step_dir) == stamp:
            raise
        raise CheckpointGoneError(
            f"checkpoint {step_dir} was removed or replaced while it was being {doing} ({type(e).__name__}: {e}): "
            "a training run saving into its directory prunes older steps (checkpoint.keep); copy the step "
            f"directory out of the run's checkpoint.dir and {fix}"
        ) from None
