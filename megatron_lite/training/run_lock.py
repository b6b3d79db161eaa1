"""One run per run directory: a run holds ``log.dir`` and ``checkpoint.dir`` locked for its whole life.

Two runs writing one directory damage each other without a word: the second resumes from the
first's checkpoint while the first trains on, both append to one ``metrics.jsonl``, and each one's
``checkpoint.keep`` pruning deletes the other's checkpoints. So rank 0 of a run (one holder is
enough, however many machines share the directories) takes an exclusive ``flock`` on
``<dir>/.megatron-lite.lock`` in ``log.dir`` and in ``checkpoint.dir`` (once when they are one
directory), before anything reads or writes there, writes its host, pid, start time and SLURM job
into it, and holds it until the run ends (:func:`hold_run_dirs`, around the trainer in
``train.py``). A second run's rank 0 finds the lock taken and refuses, on every rank at once
(``fail_fast_setup``), naming the directory, the holder (read from the file) and the fix; it
writes nothing there.

The kernel drops the lock when the holding process ends, however it ends (a SIGKILL, the
out-of-memory killer), so a relaunch after a crash, a SLURM requeue or a torchrun restart (new
workers, started after the old ones died) takes it again. On NFS the lock of a crashed node
outlives it: the server keeps it until the dead client's lease runs out (NFSv4: 90 s by default;
NFSv3: until that node reboots). So a run whose lock file names an earlier start of its own launch
(the same SLURM job with a lower ``SLURM_RESTART_COUNT``, or the same torchrun run id with a lower
``TORCHELASTIC_RESTART_COUNT``: ``tempfiles.earlier_start``) waits for that lock, up to
:data:`EARLIER_START_WAIT_S`, logging once what it waits for, and takes it when it goes; still held
then, it is refused, naming what to do. Any other holder is refused at once: the lock of a live,
different run is never taken. The file stays in the directory from one run to the next, opened in place
(``tempfiles.take_lock``), and holds the last holder's details. A background checkpoint write
(``checkpoint.async``) still running when the run fails keeps the lock until the process exits:
no next run starts on a directory still being written.

A filesystem without locks (``flock`` fails, e.g. Lustre mounted without ``-o flock``) gets one
warning that nothing keeps a second run out, and the run goes on. An object-store
``checkpoint.dir`` (``s3://``, ``gs://``) has no locks: rank 0 claims it with a claim object
instead (created with the store's conditional create where it has one), after locking ``log.dir``,
checked again before each save and deleted when the run ends (``checkpoint/claim.py``, which says
what that does and does not protect). A claim left by a run that died is taken over by a later start
of the same launch, and by a run whose ``log.dir`` lock file named that run (it held its ``log.dir``
for its whole life, and holds it no more).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from megatron_lite.checkpoint.claim import CLAIM, claim, release_claim
from megatron_lite.checkpoint.storage import Storage, is_url
from megatron_lite.checkpoint.writer import writing_in_background
from megatron_lite.config import Config
from megatron_lite.data.tempfiles import LockHeldError, earlier_start, holder_info, read_holder, take_lock
from megatron_lite.errors import UserError
from megatron_lite.launcher.fail_fast import fail_fast_setup
from megatron_lite.training.preflight import check_checkpoint_dir, probe_dir

LOCK_FILE = ".megatron-lite.lock"
# How long a run waits for the lock of an earlier start of its own launch (a requeue, a torchrun
# restart): an NFSv4 server keeps a crashed client's lock until its lease runs out, 90 s by default
# (Linux nfsd's nfsv4leasetime), plus 30 s for the server to act on it. At most half of
# parallel.timeout_s, for which the other ranks wait in the collective that follows.
EARLIER_START_WAIT_S = 120.0
POLL_S = 1.0  # between tries of that lock: each is one lock request to the file server
log = logging.getLogger(__name__)


def run_dirs(cfg: Config) -> list[tuple[str, Path]]:
    """``(key, directory)`` of each run directory to lock: ``log.dir``, and ``checkpoint.dir`` unless
    it is the same directory or an object store."""
    dirs = [("log.dir", Path(cfg.log.dir))]
    ckpt = str(cfg.checkpoint.dir)
    if not is_url(ckpt):
        where = Path(ckpt.removeprefix("file://"))
        if os.path.realpath(where) != os.path.realpath(dirs[0][1]):
            dirs.append(("checkpoint.dir", where))
    return dirs


def _unusable(key: str, where: Path, error: OSError) -> UserError:
    """The error for a run directory whose lock file cannot be made, opened or written."""
    probe_dir(key, where)  # an unwritable directory raises its own error, naming the key and the fix
    return UserError(
        f"{key}={str(where)!r}: its lock file {where / LOCK_FILE} cannot be used: {error.strerror or error}; "
        f"remove it, or choose another {key}"
    )


def _in_use(key: str, where: Path, holder: str) -> UserError:
    return UserError(
        f"{key}={str(where)!r} is in use by another run ({holder}; lock file {where / LOCK_FILE}): two runs "
        f"in one directory overwrite each other's checkpoints and metrics; wait for that run to end, stop it, "
        f"or choose another {key}"
    )


def _take(key: str, where: Path, wait_s: float) -> tuple[int, bool | None]:
    """``take_lock`` on ``where``'s lock file, waiting up to ``wait_s`` while an earlier start of this
    launch holds it (:func:`~megatron_lite.data.tempfiles.earlier_start`); any other holder is refused."""
    path, deadline = where / LOCK_FILE, None
    while True:
        try:
            return take_lock(path)
        except LockHeldError as e:
            if not earlier_start(e.info, holder_info()):
                raise _in_use(key, where, e.holder) from None
            if deadline is None:
                deadline = time.monotonic() + wait_s
                log.warning(
                    "%s=%r is locked by an earlier start of this job (%s), replaced by this one: waiting up to %.0f s "
                    "for its lock to go (on NFS a crashed node's lock lasts until its lease runs out)",
                    key, str(where), e.holder, wait_s,
                )  # fmt: skip
            elif time.monotonic() >= deadline:
                raise UserError(
                    f"{key}={str(where)!r} is still locked by an earlier start of this job ({e.holder}; lock file "
                    f"{path}) after {wait_s:.0f} s: if that process still runs, stop it; if its node is down and "
                    f"the filesystem keeps its lock (NFSv3 until the node reboots), delete {path}; then start again"
                ) from None
            time.sleep(POLL_S)


def _lock_dir(key: str, where: Path, wait_s: float) -> int | None:
    """Lock ``where`` for this run: the lock file's descriptor (held while open), or None where the
    filesystem has no locks. :class:`UserError` when another run holds it (an earlier start of this
    launch: after ``wait_s``), or it cannot be used."""
    try:
        where.mkdir(parents=True, exist_ok=True)
        fd, taken = _take(key, where, wait_s)
    except OSError as e:  # a link or a directory there, a full disk, a quota
        raise _unusable(key, where, e) from None
    if taken is None:
        os.close(fd)
        return None
    return fd


def _named_run(where: Path) -> str | None:
    """The run id in ``where``'s lock file, read before this run takes the lock: once taken, that run
    holds it no more, and as a run holds its ``log.dir`` for its whole life, it has ended."""
    try:
        holder = read_holder((where / LOCK_FILE).read_bytes())
    except OSError:
        return None
    return None if holder is None else holder.get("run")


def _claim(cfg: Config, ended: str | None) -> None:
    """Claim the object-store ``checkpoint.dir`` for this run (``checkpoint/claim.py``): ``ended``, the
    run this one's ``log.dir`` lock file named, has ended, and its claim is taken over. The trainer's
    preflight probes the directory for writes (``check_checkpoint_dir``, on every rank): here the probe
    runs only when the claim fails, so that a bucket that cannot be written gets that probe's error."""
    storage = Storage(cfg.checkpoint.dir)
    try:
        exclusive = claim(storage, holder_info(), ended)
    except UserError:
        raise
    except Exception as e:  # the client's own errors: access denied, a lost connection
        check_checkpoint_dir(cfg)  # a bucket that cannot be written: one error naming it and what to check
        raise UserError(
            f"checkpoint.dir={storage.url()!r}: its claim object {storage.url(CLAIM)} cannot be read or written: "
            f"{type(e).__name__}: {e}; check the bucket, the credentials and the endpoint (AWS_ENDPOINT_URL)"
        ) from None
    how = (
        "created with the store's conditional create: of two runs started at the same moment, one is refused at startup"
        if exclusive
        else "read, then written: the store (or its fsspec client) has no conditional create, so of two runs "
        "started at the same moment the one whose claim was overwritten is refused at its first save"
    )
    log.info(
        "checkpoint.dir=%r is an object store, which has no locks: this run claims it with %s until it ends, "
        "and a second run is refused; the claim was %s (checkpoint/claim.py says what that does and does not "
        "cover)",
        storage.url(), storage.url(CLAIM), how,
    )  # fmt: skip


def lock_run_dirs(cfg: Config) -> list[int]:
    """Lock every run directory (:func:`run_dirs`) and claim an object-store ``checkpoint.dir``;
    returns the descriptors that hold the locks. One warning names those on a filesystem without
    locks; they are used all the same."""
    held: list[int] = []
    unlocked, ended = [], None
    try:
        wait_s = min(EARLIER_START_WAIT_S, cfg.parallel.timeout_s / 2)
        for key, where in run_dirs(cfg):
            before = _named_run(where) if key == "log.dir" else None
            fd = _lock_dir(key, where, wait_s)
            if fd is None:
                unlocked.append(f"{key}={str(where)!r}")
            else:
                held.append(fd)
                ended = ended or before
        if is_url(str(cfg.checkpoint.dir)):
            _claim(cfg, ended)
    except BaseException:
        release(held)
        raise
    if unlocked:
        log.warning(
            "%s on a filesystem without file locks (flock): nothing keeps a second run out, and two runs in one "
            "directory overwrite each other's checkpoints and metrics; start one run per directory (or mount the "
            "filesystem with locks, e.g. Lustre's -o flock)",
            " and ".join(unlocked) + (" is" if len(unlocked) == 1 else " are"),
        )
    return held


def release(fds: list[int]) -> None:
    """Drop the locks :func:`lock_run_dirs` took."""
    for fd in fds:
        os.close(fd)


@contextlib.contextmanager
def hold_run_dirs(cfg: Config, rank: int) -> Iterator[None]:
    """Hold the run directories locked for the ``with`` block (the whole run); rank 0 holds them.
    Collective: a refusal (another run holds one) is the same :class:`UserError` on every rank. A
    background checkpoint write still running at the end keeps the locks until the process exits."""
    fds: list[int] = []
    locked = False
    try:
        with fail_fast_setup("locking the run directories"):
            if rank == 0:
                fds, locked = lock_run_dirs(cfg), True
        yield
    finally:
        claimed = locked and is_url(str(cfg.checkpoint.dir))
        if (fds or claimed) and writing_in_background():
            log.info("the run directories stay locked until this process exits: a checkpoint write is still running")
        else:
            release(fds)
            if claimed:
                _release_claim(Storage(cfg.checkpoint.dir))


def _release_claim(storage: Storage) -> None:
    """Give up this run's claim on an object-store ``checkpoint.dir``; a failure is a warning (the run is over)."""
    try:
        release_claim(storage)
    except Exception as e:  # the client's own errors
        log.warning(
            "the claim object %s of this run could not be deleted (%s: %s): a run in another log.dir is refused "
            "there until it is deleted",
            storage.url(CLAIM), type(e).__name__, e,
        )  # fmt: skip
