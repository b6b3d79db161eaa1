"""``preprocess --workers N``: sentencepiece encoding in N worker processes, the output unchanged.

The parent still does everything that decides what is written: it reads and decompresses the
inputs, parses JSON lines (so a bad line gives the same error, naming its file and line, as one
process does), cuts documents into pieces (``preprocess.Splitter``) and writes the ids. The
workers only turn piece text into ids, over 90% of the time (BENCHMARKS.md). Batch ``k`` of pieces
goes to worker ``k % N`` and its ids are written in ``k`` order, so the ``.bin``/``.idx`` are byte
for byte those of ``--workers 1``.

Memory stays bounded: each worker holds one batch (~``_BATCH_CHARS`` characters, or one long
piece); the next goes to it only once its ids are back (so neither side can block sending to the
other), and before the parent writes them, so it encodes while the parent writes and reads on.

Each worker has a pipe of its own, and nothing else is shared: no helper threads, queues or locks
that a Ctrl-C or a killed worker could leave half-used (``ProcessPoolExecutor`` hangs at exit when
a worker is terminated in the middle of sending a result; ``Pool`` waits forever for the tasks of a
worker that died). A worker that dies is seen as the end of its pipe, and reported. Workers are
spawned (never forked: the parent may hold threads, e.g. tqdm's or torch's) and load the tokenizer
once, from the parent's model bytes. They ignore SIGINT: Ctrl-C reaches the whole process group, and
the parent alone reacts, by terminating them before it re-raises; a parent killed outright takes its
workers with it (``launcher/orphan.py``).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import traceback
from collections.abc import Iterable, Iterator
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from megatron_lite.data.tokenizer import Tokenizer
from megatron_lite.errors import UserError
from megatron_lite.launcher.orphan import exit_with_parent

_BATCH_CHARS = 1 << 18  # text per batch: ~0.1 s of sentencepiece, against ~0.1 ms of pickling
_BATCH_ITEMS = 1 << 14  # and at most this many pieces and document ends (a run of empty documents)


def allowed_cpus() -> set[int]:
    """The ids of the CPUs this process may run on: its affinity (taskset, a cpuset, SLURM's binding);
    every CPU where there is none (not Linux)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return set(range(os.cpu_count() or 1))


def usable_cpus() -> int:
    """The CPUs this process may use: a container's or taskset's share, not the host's. Its CPU
    affinity (:func:`allowed_cpus`), and a cgroup v2 CPU quota below it (Docker's ``--cpus``, a
    Kubernetes limit: :func:`cgroup_cpu_quota`), rounded up to whole CPUs."""
    cpus = len(allowed_cpus())
    return min(cpus, cgroup_cpu_quota() or cpus)


def cgroup_cpu_quota(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The whole CPUs (rounded up) the cgroup v2 ``cpu.max`` files allow this process, or None: no
    quota (``max``), cgroup v1 (its ``cpu.cfs_quota_us`` is not read), or not Linux. A quota on any
    ancestor binds too (a systemd slice's ``CPUQuota``, a Kubernetes pod's limit above its
    containers'): the lowest one from the process's cgroup up to the root counts."""
    try:
        path = next(line[3:] for line in Path(proc).read_text().splitlines() if line.startswith("0::"))
    except (OSError, StopIteration):
        return None
    parts = [p for p in path.strip().split("/") if p]
    quotas = []
    for depth in range(len(parts), -1, -1):  # a folder missing here (another cgroup namespace) is skipped
        try:
            quota, period = Path(root, *parts[:depth], "cpu.max").read_text().split()
            quotas += [] if quota == "max" else [max(1, -(-int(quota) // int(period)))]
        except (OSError, ValueError):
            continue
    return min(quotas, default=None)


def resolve_workers(value: int | str) -> int:
    """``--workers``: a positive integer up to the usable CPUs, or ``auto`` for all of them (each
    worker holds a tokenizer, some 50-90 MB: more workers than CPUs only cost memory)."""
    cpus = usable_cpus()
    if str(value).strip().lower() == "auto":
        return cpus
    try:
        workers = int(value)
    except (TypeError, ValueError):
        workers = 0
    if workers < 1:
        raise UserError(
            f"--workers {value}: give the number of tokenizing processes, 1 or more (1: tokenize in this "
            "process), or auto for one per CPU"
        )
    if workers > cpus:
        raise UserError(
            f"--workers {value}: this process may run on {cpus} CPUs, and a worker beyond one per CPU adds only "
            f"memory (a tokenizer each); give at most {cpus}, or auto"
        )
    return workers


def _serve(conn: Connection, path: str, model: bytes, parent: int) -> None:
    """A worker: answer each batch of pieces with ``(True, ids of each)`` or ``(False, error)``
    until the parent sends None or goes away. Ids are int32 (every id fits; half int64's pickle)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C (module docstring)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked since before the spawn
    exit_with_parent(parent)
    tok, load_error = None, None
    try:
        tok = Tokenizer(path, model)
    except Exception as e:  # reported for the first batch, in input order like any other error
        load_error = e
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return
        if batch is None:
            return
        try:
            if load_error is not None:
                raise load_error
            reply = (True, [None if p is None else np.array(tok.encode(p), dtype=np.int32) for p in batch])
        except UserError as e:
            reply = (False, e)
        except Exception:  # a bug: keep its traceback, whatever the exception pickles to
            reply = (False, RuntimeError(f"in a tokenizing worker:\n{traceback.format_exc()}"))
        conn.send(reply)


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Start processes with Ctrl-C held: they inherit a blocked SIGINT (the signal mask survives
    exec) until :func:`_serve` ignores it, and this process raises a Ctrl-C that came meanwhile only
    once they are started and known, not in the middle of starting one (which would leave it
    untracked, or die on half its start-up data)."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks, and no SIGINT to a process group
        yield
        return
    # The first spawn would start multiprocessing's resource tracker, which unblocks SIGINT after
    # starting its own process (CPython's fix of the same race, bpo-33613): have it running first.
    resource_tracker.ensure_running()
    main = threading.current_thread() is threading.main_thread()  # the only thread KeyboardInterrupt reaches
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum)) if main else None
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # this thread's: its children inherit it
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if main:
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
            if caught:
                signal.raise_signal(signal.SIGINT)  # now handled as it would have been


def _batches(pieces: Iterable[str | None]) -> Iterator[list[str | None]]:
    batch: list[str | None] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += 0 if piece is None else len(piece)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_ITEMS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class EncodingPool:
    """``workers`` processes encoding with ``tok``'s model; use as a context manager, which ends
    every worker on exit (at once on an error or Ctrl-C)."""

    def __init__(self, tok: Tokenizer, workers: int) -> None:
        ctx = mp.get_context("spawn")
        args = (str(tok.path), tok.model_bytes, os.getpid())
        self._procs: list[mp.process.BaseProcess] = []
        self._conns: list[Connection] = []
        try:
            with _sigint_held():
                for _ in range(workers):
                    ours, theirs = ctx.Pipe()
                    self._procs.append(ctx.Process(target=_serve, args=(theirs, *args), daemon=True))
                    self._conns.append(ours)
                    self._procs[-1].start()
                    theirs.close()  # the worker's copy is its own: its death is the end of our pipe
        except BaseException as e:  # a Ctrl-C held while they started, or a failed start
            self.__exit__(type(e), e, e.__traceback__)
            raise

    def _died(self, i: int) -> UserError:
        proc = self._procs[i]
        proc.join(timeout=5)  # it closed its pipe: it is exiting, if not gone already
        code = proc.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return UserError(
            f"tokenizing worker {i + 1} of --workers {len(self._procs)} (pid {proc.pid}) ended unexpectedly "
            f"({how}; its own error, if any, is printed above); a SIGKILL is mostly the out-of-memory killer: "
            "run again with fewer --workers, or --workers 1"
        )

    def _send(self, k: int, batch: list[str | None]) -> None:
        try:
            self._conns[k % len(self._conns)].send(batch)
        except OSError as e:  # BrokenPipeError: the worker is gone
            raise self._died(k % len(self._conns)) from e

    def _receive(self, k: int) -> list[np.ndarray | None]:
        try:
            ok, value = self._conns[k % len(self._conns)].recv()
        except (EOFError, OSError) as e:
            raise self._died(k % len(self._conns)) from e
        if not ok:
            raise value
        return value

    def _feed(self, batches: Iterator[list[str | None]], sent: int, received: int) -> bool:
        """Send batch ``sent`` (the next of ``batches``) to its worker; False when there is none."""
        try:
            batch = next(batches)
        except StopIteration:
            return False
        except Exception:
            # An input error (a bad JSON line) comes after every batch in flight, so a failure among
            # those is the error one process would have met first.
            for k in range(received, sent):
                self._receive(k)
            raise
        self._send(sent, batch)
        return True

    def encode(self, pieces: Iterable[str | None]) -> Iterator[np.ndarray | None]:
        """The ids of each of ``pieces`` (None, a document's end, passes through), in input order."""
        batches = _batches(pieces)
        sent = 0
        while sent < len(self._conns) and self._feed(batches, sent, 0):
            sent += 1
        received = 0
        while received < sent:
            ids = self._receive(received)
            received += 1
            if self._feed(batches, sent, received):  # that worker is free: the next batch, before writing
                sent += 1
            yield from ids

    def __enter__(self) -> EncodingPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for conn, proc in zip(self._conns, self._procs, strict=True):
            if exc_type is None:
                with contextlib.suppress(OSError):
                    conn.send(None)  # every result is in: the worker exits on its own
            elif proc.pid is not None:
                proc.terminate()
        for conn, proc in zip(self._conns, self._procs, strict=True):
            if proc.pid is not None:
                proc.join()
            conn.close()
