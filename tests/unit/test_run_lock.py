"""A run holds its log.dir and checkpoint.dir locked; a second run into either is refused, naming the
holder, and one whose holder is gone takes them. Holders here are other open files of this process
(a flock belongs to an open file, so they conflict as another process's would); tests/e2e/
test_run_dir_lock.py holds them from a real child process and runs the trainer."""

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading

import pytest

from megatron_lite.checkpoint.writer import WRITER_THREAD, writing_in_background
from megatron_lite.config import Config, fill_defaults
from megatron_lite.data import tempfiles
from megatron_lite.data.tempfiles import earlier_start, holder_info, open_locked
from megatron_lite.errors import UserError
from megatron_lite.training import run_lock
from megatron_lite.training.run_lock import LOCK_FILE, hold_run_dirs, lock_run_dirs, release, run_dirs


def _cfg(log_dir, ckpt=None) -> Config:
    cfg = Config()
    cfg.log.dir, cfg.checkpoint.dir = str(log_dir), None if ckpt is None else str(ckpt)
    return fill_defaults(cfg)


def _state(folder) -> dict:
    """Every path under ``folder`` (itself included) with its bytes and modification time."""
    paths = [folder, *sorted(folder.rglob("*"))]
    return {str(p): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in paths}


def test_the_lock_file_is_made_in_place_and_taken_once(tmp_path):
    path = tmp_path / LOCK_FILE
    fd, taken = open_locked(path)
    assert taken is True and path.read_bytes() == b""
    os.pwrite(fd, b"first", 0)
    other, taken = open_locked(path)  # another open file: as another process
    assert taken is False and os.fstat(other).st_ino == os.fstat(fd).st_ino and path.read_bytes() == b"first"
    os.close(other)
    os.close(fd)  # as when its process dies
    fd, taken = open_locked(path)
    assert taken is True and path.read_bytes() == b"first"  # the same file, never replaced
    path.unlink()  # removed by hand while held: the next run locks the file under the name
    again, taken = open_locked(path)
    assert taken is True and os.fstat(again).st_ino != os.fstat(fd).st_ino
    release([fd, again])
    os.mkfifo(tmp_path / "fifo")
    os.symlink(path, tmp_path / "link")
    for bad in ("fifo", "link"):
        with pytest.raises(OSError):
            open_locked(tmp_path / bad)


def test_a_held_directory_is_refused_naming_it_the_holder_and_the_fix(tmp_path):
    """A second run with another log.dir but the first's checkpoint.dir: refused for checkpoint.dir,
    the first run's files untouched, and the second's own log.dir lock let go."""
    first = lock_run_dirs(_cfg(tmp_path / "a"))
    (tmp_path / "a" / "checkpoints" / "latest").write_text("step_00000060\n")
    before = _state(tmp_path / "a")
    second = _cfg(tmp_path / "b", ckpt=tmp_path / "a" / "checkpoints")
    where = tmp_path / "a" / "checkpoints"
    with pytest.raises(UserError) as refused:
        lock_run_dirs(second)
    message = str(refused.value)
    assert message.startswith(f"checkpoint.dir={str(where)!r} is in use by another run (host {socket.gethostname()}, ")
    assert f"pid {os.getpid()}, started 20" in message and f"lock file {where / LOCK_FILE})" in message
    assert message.endswith("wait for that run to end, stop it, or choose another checkpoint.dir")
    assert _state(tmp_path / "a") == before
    fd, taken = open_locked(tmp_path / "b" / LOCK_FILE)  # the refused run holds nothing
    assert taken is True
    release([fd, *first])
    release(lock_run_dirs(second))  # its holder gone, the second run takes both


def test_log_dir_is_refused_and_an_empty_lock_file_names_a_holder_just_starting(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = lock_run_dirs(_cfg(tmp_path))
    with pytest.raises(UserError, match=r"^log.dir=.* \(host .*, SLURM job 4242; lock file .*another log.dir$"):
        lock_run_dirs(_cfg(tmp_path))
    os.ftruncate(first[0], 0)
    with pytest.raises(UserError, match="a run that has not written its host and pid into the lock file yet"):
        lock_run_dirs(_cfg(tmp_path))
    release(first)


def test_which_directories_are_locked(tmp_path):
    assert run_dirs(_cfg(tmp_path)) == [("log.dir", tmp_path), ("checkpoint.dir", tmp_path / "checkpoints")]
    assert run_dirs(_cfg(tmp_path, ckpt=f"file://{tmp_path}/")) == [("log.dir", tmp_path)]  # one directory
    assert run_dirs(_cfg(tmp_path / "run", ckpt="s3://bucket/run")) == [("log.dir", tmp_path / "run")]
    store = _cfg(tmp_path / "run", ckpt=f"memory://{tmp_path.name}/run")  # claimed instead: test_checkpoint_claim.py
    fds = lock_run_dirs(store)
    assert len(fds) == 1 and (tmp_path / "run" / LOCK_FILE).exists()
    with pytest.raises(UserError, match="log.dir="):  # log.dir still keeps a second run out
        lock_run_dirs(_cfg(tmp_path / "run", ckpt=f"memory://{tmp_path.name}/other"))
    release(fds)


def test_without_file_locks_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(tempfiles.fcntl, "flock", no_locks)
    cfg = _cfg(tmp_path)
    assert lock_run_dirs(cfg) == [] and lock_run_dirs(cfg) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and warnings[0] == warnings[1]  # one a run
    assert warnings[0].startswith(
        f"log.dir={str(tmp_path)!r} and checkpoint.dir={str(tmp_path / 'checkpoints')!r} are on a filesystem "
        "without file locks (flock): nothing keeps a second run out"
    )


def test_a_directory_that_cannot_be_used_is_one_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"log.dir=.*file.* is not a writable directory: it exists and is not a dir"):
        lock_run_dirs(_cfg(tmp_path / "file"))
    (tmp_path / "run" / LOCK_FILE).mkdir(parents=True)
    with pytest.raises(UserError, match=r"log.dir=.*: its lock file .* cannot be used: .*; remove it, or choose"):
        lock_run_dirs(_cfg(tmp_path / "run"))


@pytest.mark.parametrize("writing", [False, True])
def test_the_run_holds_the_lock_until_it_ends_and_a_background_write_until_exit(tmp_path, monkeypatch, writing):
    """A checkpoint write still running when the run fails (checkpoint.async, abandoned) keeps the
    directories locked: the process exits soon, and no next run starts on them meanwhile."""
    taken, lock = [], run_lock.lock_run_dirs
    monkeypatch.setattr(run_lock, "lock_run_dirs", lambda cfg: taken.extend(lock(cfg)) or taken)
    monkeypatch.setattr(run_lock, "writing_in_background", lambda: writing)
    with pytest.raises(RuntimeError, match="failed"), hold_run_dirs(_cfg(tmp_path), rank=0):
        with pytest.raises(UserError, match="in use by another run"):
            lock_run_dirs(_cfg(tmp_path))
        raise RuntimeError("the run failed")
    fd, taken_again = open_locked(tmp_path / LOCK_FILE)
    assert taken_again is not writing
    release([fd, *(taken if writing else [])])
    with hold_run_dirs(_cfg(tmp_path), rank=1):  # another rank holds nothing
        release(lock_run_dirs(_cfg(tmp_path)))


def test_a_background_checkpoint_write_is_seen_until_it_ends():
    done = threading.Event()
    writer = threading.Thread(target=done.wait, name=WRITER_THREAD, daemon=True)
    assert not writing_in_background()
    writer.start()
    assert writing_in_background()
    done.set()
    writer.join()
    assert not writing_in_background()


def test_a_lock_file_that_cannot_be_written_is_one_error(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_lock.os, "pwrite", full)
    with pytest.raises(UserError, match=r"its lock file .* cannot be used: No space left on device; remove it"):
        lock_run_dirs(_cfg(tmp_path))
    monkeypatch.undo()
    release(lock_run_dirs(_cfg(tmp_path)))  # the failed run let go of it


# A SLURM requeue: the job's first start (restart 0) crashed; its node's NFS lease keeps the lock ~90 s.
HOLDER = """
import os, sys, time
from pathlib import Path
from megatron_lite.data.tempfiles import take_lock

fd, taken = take_lock(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(2)  # then the lease runs out: the lock goes as this process ends
"""
LAUNCH = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


def _launch(monkeypatch, job=None, restart=None, run=None, attempt=None) -> None:
    """This process as started by SLURM job ``job`` (its ``restart``-th start) / torchrun run ``run``."""
    for name, value in zip(LAUNCH, (job, restart, run, attempt), strict=True):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def _holder(job=None, restart=None, run=None, attempt=None) -> dict:
    return {
        **holder_info(),
        "slurm_job": job,
        "slurm_restart": restart,
        "torchrun_run": run,
        "torchrun_restart": attempt,
    }


def _held_by(path, holder: dict) -> int:
    """``path`` locked through another open file (as another process), ``holder`` written in it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, taken = open_locked(path)
    assert taken is True
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return fd


@pytest.mark.parametrize(
    ("holder", "ours", "earlier"),
    [
        (("7", None, None, None), ("7", "1", None, None), True),  # a requeue; unset is the first start
        (("7", "1", "7", "0"), ("7", "2", "7", "0"), True),  # a requeue under torchrun: its count starts again
        (("7", "0", "7", "0"), ("7", "0", "7", "1"), True),  # torchrun's restart inside one SLURM start
        ((None, None, "r1", "0"), (None, None, "r1", "2"), True),  # torchrun --max-restarts outside SLURM
        (("7", "1", None, None), ("7", "1", None, None), False),  # two runs in one job start: live, different
        (("7", "2", None, None), ("7", "1", None, None), False),  # a later start holds it
        (("8", "0", None, None), ("7", "1", None, None), False),  # another job
        ((None, None, None, None), ("7", "1", None, None), False),  # a run outside SLURM
        (("7", "0", "7", "0"), (None, None, "7", "1"), False),  # a torchrun outside the SLURM job
        ((None, None, "none", "0"), (None, None, "none", "1"), False),  # torchrun's default run id: any run's
        ((None, None, "r1", "1"), (None, None, "r2", "2"), False),  # another torchrun run
        (("7", "x", None, None), ("7", "1", None, None), False),  # not a count
    ],
)
def test_which_holder_is_an_earlier_start_of_this_launch(monkeypatch, holder, ours, earlier):
    _launch(monkeypatch, *ours)
    assert earlier_start(_holder(*holder), holder_info()) is earlier
    assert earlier_start(None, holder_info()) is False  # an empty lock file: a run just starting


def test_a_requeue_waits_for_the_lock_of_its_crashed_first_start_and_takes_it(tmp_path, monkeypatch, caplog):
    cfg = _cfg(tmp_path, ckpt=f"file://{tmp_path}")  # one directory to lock
    env = {**os.environ, "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / LOCK_FILE)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "held\n"
    _launch(monkeypatch, "77", "1")
    fds = lock_run_dirs(cfg)
    assert holder.wait(timeout=60) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # logged once, however many tries
    assert warnings[0].startswith(
        f"log.dir={str(tmp_path)!r} is locked by an earlier start of this job (host {socket.gethostname()}, "
        f"pid {holder.pid}, started 20"
    )
    assert ", SLURM job 77), replaced by this one: waiting up to 120 s" in warnings[0]
    info = json.loads((tmp_path / LOCK_FILE).read_bytes())
    assert (info["pid"], info["slurm_job"], info["slurm_restart"]) == (os.getpid(), "77", "1")
    release(fds)


@pytest.mark.parametrize("holder", [("78", "0"), ("77", "1"), ("77", "2")])
def test_any_other_holder_is_refused_at_once(tmp_path, monkeypatch, holder):
    fd = _held_by(tmp_path / LOCK_FILE, _holder(*holder))
    _launch(monkeypatch, "77", "1")
    monkeypatch.setattr(run_lock.time, "sleep", lambda s: pytest.fail("waited for a live, different run"))
    with pytest.raises(UserError, match=rf"is in use by another run \(.*, SLURM job {holder[0]}"):
        lock_run_dirs(_cfg(tmp_path))
    release([fd])


def test_an_earlier_start_still_holding_after_the_wait_is_refused(tmp_path, monkeypatch, caplog):
    """The wait is at most half of parallel.timeout_s, which the other ranks wait in the collective after it."""
    fd = _held_by(tmp_path / LOCK_FILE, _holder("77", "0"))
    before = _state(tmp_path)
    _launch(monkeypatch, "77", "1")
    monkeypatch.setattr(run_lock, "POLL_S", 0.1)
    cfg = _cfg(tmp_path)
    cfg.parallel.timeout_s = 2.0
    with pytest.raises(UserError) as refused:
        lock_run_dirs(cfg)
    assert str(refused.value).startswith(f"log.dir={str(tmp_path)!r} is still locked by an earlier start of this job")
    assert str(refused.value).endswith(
        f"after 1 s: if that process still runs, stop it; if its node is down and the filesystem keeps its lock "
        f"(NFSv3 until the node reboots), delete {tmp_path / LOCK_FILE}; then start again"
    )
    assert [r.levelno for r in caplog.records].count(logging.WARNING) == 1
    assert _state(tmp_path) == before  # its lock file as it wrote it, and no checkpoints/ made
    release([fd])


def test_a_different_run_taking_the_lock_meanwhile_is_refused(tmp_path, monkeypatch):
    """The earlier start's lock goes and another run takes it between two tries: that one is refused."""
    held = [_held_by(tmp_path / LOCK_FILE, _holder("77", "0"))]

    def another_run_takes_it(seconds):
        release([held.pop()])
        held.append(_held_by(tmp_path / LOCK_FILE, _holder("78", "0")))

    monkeypatch.setattr(run_lock.time, "sleep", another_run_takes_it)
    _launch(monkeypatch, "77", "1")
    with pytest.raises(UserError, match=r"is in use by another run \(.*, SLURM job 78; lock file"):
        lock_run_dirs(_cfg(tmp_path))
    release(held)
