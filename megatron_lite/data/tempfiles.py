"""Temporary files beside an output, and removing the ones a killed writer left behind.

A writer (``indexed.write_atomic``, ``IndexedDatasetBuilder``: what ``preprocess`` and ``tokenizer
train`` write through) stages ``DIR/NAME`` in ``DIR/.NAME.tmp-XXXXXXXX`` and renames it into place.
From the moment it creates the temporary until after the rename it holds an exclusive ``flock`` on
it, and the kernel drops that lock however the process ends (an exception, a SIGKILL, the
out-of-memory killer; on NFS, when the dead client's lease runs out). So a temporary that
:func:`remove_abandoned` can lock has no live writer, on this host or any other sharing the
filesystem, and is deleted; one it cannot lock belongs to a run still writing (a concurrent
``preprocess`` to the same prefix, even a stopped one) and is left alone. On a filesystem without
locks (``flock`` fails with anything but "held") nothing can be proven and nothing is removed.
:func:`remove_abandoned_outputs` is what a command runs on its outputs before writing them. The
same lock shows a live writer of a whole directory: ``convert to-hf`` (its staging directory) and
``corpus.py`` (a build folder) hold the directory's marker, made by :func:`create_locked`, for the
writing's whole life, and remove an earlier such directory only while :func:`locked_if_abandoned`
holds its marker. A marker that outlives its holder, a run directory's lock file, is opened in place
by :func:`take_lock` instead (a run directory's, ``training/run_lock.py``; an output prefix's,
``output_lock.py``), its holder's host, pid and launch in it (:func:`holder_text`,
:func:`describe_holder`; :func:`earlier_start` tells an earlier start of the same launch).

Locking cannot be atomic with creating: a cleaner may lock and delete a temporary in the instant
between its writer's ``open`` and ``flock``. The writer waits for the lock, then checks that its
name still leads to its file; if not, it starts again under a new name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import stat
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from megatron_lite import jsontext

try:
    import fcntl
except ImportError:  # Windows: no flock, so no temporary is ever provably abandoned
    fcntl = None

_SUFFIX = ".tmp-"
log = logging.getLogger(__name__)


def lock(fd: int, wait: bool) -> bool | None:
    """Take an exclusive lock on ``fd``: True when taken, False when another process holds it,
    None when this filesystem (or platform) has no locks."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP, ENOSYS: e.g. a Lustre mount without -o flock
        return None
    return True


def _named(path: Path, fd: int) -> bool:
    """Whether ``path`` is still the file open as ``fd`` (not deleted, not replaced)."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def create_temp(path: Path) -> tuple[Path, BinaryIO]:
    """A new temporary beside ``path``, locked, and its file open for writing. The caller renames it
    over ``path`` (or deletes it) before closing the file: closing releases the lock."""
    while True:
        tmp = path.with_name(f".{path.name}{_SUFFIX}{uuid.uuid4().hex[:8]}")
        try:
            f = open(tmp, "xb")  # noqa: SIM115 - the caller closes it after the rename
        except FileExistsError:
            continue
        try:
            lock(f.fileno(), wait=True)  # waits out a cleaner that took it in the instant before
            if _named(tmp, f.fileno()):
                return tmp, f
        except BaseException:
            tmp.unlink(missing_ok=True)
            f.close()
            raise
        f.close()  # a cleaner deleted it as abandoned: a new name


def create_locked(path: Path, data: bytes = b"") -> BinaryIO:
    """Create ``path`` holding ``data``, locked from its first moment under that name (written as a
    :func:`create_temp` temporary, then renamed), and return its open file: the caller keeps it open
    for as long as what ``path`` marks is being written; closing it releases the lock."""
    tmp, f = create_temp(path)
    try:
        f.write(data)
        f.flush()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        f.close()
        raise
    return f


def _open_regular(path: Path, create: bool) -> int:
    """``path`` opened for reading and writing (NFS grants an exclusive lock only on a file open for
    writing), never through a link; OSError when it is not a regular file (a FIFO opens too)."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_CREAT if create else 0), 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def open_locked(path: Path) -> tuple[int, bool | None]:
    """Open the regular file ``path`` for reading and writing, creating it empty when missing (never
    replacing it), and try its lock without waiting: ``(fd, taken)``, ``taken`` as :func:`lock`
    returns it. The caller closes ``fd``, which releases the lock. For a marker that stays under its
    name from one holder to the next (a run directory's lock file): two processes creating it at once
    open the same file, where each :func:`create_locked` would lock a file of its own, one renamed
    over the other. OSError when ``path`` is a link or not a regular file, or cannot be opened."""
    while True:
        fd = _open_regular(path, create=True)
        try:
            taken = lock(fd, wait=False)
            if not taken or _named(path, fd):
                return fd, taken
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # deleted or replaced since it was opened: the file under that name now


RUN_ID = uuid.uuid4().hex  # this process: a holder's lock files and object-store claims name it
_NO_RUN_ID = ("", "none")  # torchrun's --rdzv_id when none is given: shared by unrelated runs


def holder_info() -> dict:
    """This process as a lock's holder: host, pid, start time, :data:`RUN_ID`, and the launch it belongs
    to (SLURM job and restart count, torchrun run id and restart count; None outside them)."""
    env = os.environ.get
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "run": RUN_ID,
        "slurm_job": env("SLURM_JOB_ID"),
        "slurm_restart": env("SLURM_RESTART_COUNT"),
        "torchrun_run": env("TORCHELASTIC_RUN_ID"),
        "torchrun_restart": env("TORCHELASTIC_RESTART_COUNT"),
    }


def holder_text() -> bytes:
    """What a holder writes into its lock file: :func:`holder_info` as JSON."""
    return json.dumps(holder_info()).encode()


def read_holder(text: bytes | str) -> dict | None:
    """The holder written in a lock file (:func:`holder_text`); None when it is empty or unreadable."""
    try:
        info = jsontext.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) and {"host", "pid", "started"} <= info.keys() else None


def describe_holder(text: bytes | str) -> str:
    """The holder of a lock, from its lock file's contents, as the refusal names it."""
    return describe_info(read_holder(text))


def describe_info(info: dict | None) -> str:
    """A holder as :func:`read_holder` reads it, as a refusal names it."""
    if info is None:  # empty: it took the lock an instant ago and writes it now
        return "a run that has not written its host and pid into the lock file yet"
    who = f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    if info.get("slurm_job"):
        restart = info.get("slurm_restart")
        who += f", SLURM job {info['slurm_job']}" + (f" restart {restart}" if restart not in (None, "0") else "")
    return who


def _count(value: object) -> int:
    """A restart count as the launcher exports it (unset: the first start)."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return -1  # not a count: never taken for an earlier start


def earlier_start(holder: dict | None, ours: dict) -> bool:
    """Whether ``holder`` (:func:`read_holder`) is an earlier start of the launch ``ours``
    (:func:`holder_info`) belongs to: the same SLURM job with a lower ``SLURM_RESTART_COUNT`` (a
    requeue), or the same SLURM job or none and the same torchrun run id with a lower
    ``TORCHELASTIC_RESTART_COUNT`` (an elastic restart). Such a holder has been replaced, as its
    launcher stops it before starting the next; any other holder may be a live, different run."""
    if holder is None:
        return False
    if holder.get("slurm_job") or ours["slurm_job"]:
        if holder.get("slurm_job") != ours["slurm_job"]:
            return False
        theirs, mine = _count(holder.get("slurm_restart")), _count(ours["slurm_restart"])
        if theirs != mine:
            return 0 <= theirs < mine
    run = ours["torchrun_run"]
    if run in (None, *_NO_RUN_ID) or holder.get("torchrun_run") != run:
        return False
    return 0 <= _count(holder.get("torchrun_restart")) < _count(ours["torchrun_restart"])


class LockHeldError(Exception):
    """Another live process holds the lock :func:`take_lock` tried; ``holder`` describes it, ``info``
    is what it wrote (:func:`read_holder`)."""

    def __init__(self, text: bytes) -> None:
        self.holder, self.info = describe_holder(text), read_holder(text)
        super().__init__(self.holder)


def take_lock(path: Path) -> tuple[int, bool | None]:
    """Take the lock file ``path`` for this process (:func:`open_locked`) and write its holder details
    into it: ``(fd, True)``, or ``(fd, None)`` on a filesystem without locks (nothing written); the
    caller keeps ``fd`` open while it holds the lock. :class:`LockHeldError` naming the holder when a live
    process has it; OSError (``fd`` closed) when the file cannot be opened or written (a full disk)."""
    fd, taken = open_locked(path)
    try:
        if taken is False:
            raise LockHeldError(os.pread(fd, 4096, 0))
        if taken:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder_text(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd, taken


@contextlib.contextmanager
def locked_if_abandoned(path: Path) -> Iterator[bool | None]:
    """Try, without waiting, the lock on the regular file ``path`` (as its writer holds it from
    :func:`create_temp` until it is done). Yields True while holding it: no live process does, on
    this host or any other, so whatever its writer was writing may be deleted inside the block;
    False when a live process holds it (or ``path`` was replaced meanwhile); None when the
    filesystem has no locks, so nothing can be proven. OSError when ``path`` cannot be opened for
    writing (gone, a link, another user's) or is not a regular file."""
    fd = _open_regular(path, create=False)
    try:
        taken = lock(fd, wait=False)
        yield taken and _named(path, fd)
    finally:
        os.close(fd)


def remove_abandoned(path: Path) -> list[Path]:
    """Delete the temporaries of ``path`` (``.NAME.tmp-XXXXXXXX`` beside it) that no live process
    holds locked; returns the ones deleted. Anything else is left as it is."""
    if fcntl is None or not path.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{path.name}{_SUFFIX}") + "[0-9a-f]{8}")
    removed = []
    for name in sorted(os.listdir(path.parent)):
        if not pattern.fullmatch(name):
            continue
        tmp = path.parent / name
        try:
            with locked_if_abandoned(tmp) as abandoned:
                if abandoned:
                    tmp.unlink()
                    removed.append(tmp)
        except OSError:  # gone meanwhile, not a file, or not ours to delete: nothing proven, left as it is
            pass
    return removed


def remove_abandoned_outputs(paths: Sequence[Path], output: str) -> None:
    """:func:`remove_abandoned` for each of ``paths``, the files a command writes at ``output`` (its
    ``--output``), with a warning naming each temporary removed."""
    for path in paths:
        for tmp in remove_abandoned(path):
            log.warning(
                "removed %s, a temporary file left by a run writing --output %s that did not finish "
                "(it was killed, or its machine went down)",
                tmp,
                output,
            )
