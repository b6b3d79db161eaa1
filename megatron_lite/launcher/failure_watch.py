"""Stop every rank promptly, with its error, when one rank fails where its peers wait in a collective.

In the training loop there is no collective-free stretch to guard: the rank that raises (a batch
holding a token id beyond the vocabulary, a failed write, an out-of-memory error, a bug) leaves
while its peers are already blocked in the step's next collective, where no exception can reach
them. The same holds for the setup after the mesh exists (the model built, the checkpoint
restored: an out-of-memory error on one rank). :class:`FailureWatch` guards those stretches
instead, over the rendezvous store (the trainer runs one around its setup once the process group
exists, reporting ``rank R failed during setup``, and one around the loop):

- the rank whose loop raises posts ``rank R failed at step S: <message>`` (the first post wins),
  then waits up to :data:`PEER_WAIT_S` (at most ``parallel.timeout_s``) for every rank to read it,
  so that a rank hosting the store (rank 0 of an ``srun`` or plain launch) or the torchrun agent's
  node outlives the others' reading, and then raises its own error as before;
- every rank runs a daemon thread that looks for a post every :data:`POLL_S` (less often in a world of
  more than :data:`STORE_LOOKS_PER_S` ranks, which the store serves all together) over a connection of
  its own (``Store.clone``: the main thread may hold the shared one in a blocking wait). When a peer
  failed it logs that rank's error, step and message and ends the process at once with ``os._exit``
  (its main thread sits inside a gloo/NCCL wait that no exception interrupts), exit status 2 for a
  ``UserError``, 130 for an interrupt, 128 + N for signal N during setup, else 1: the status of the
  rank that failed;
- a clean end (training done, ``train.exit_after``, a preemption signal) stops the thread and posts
  nothing. Keys are per torchrun attempt (``TORCHELASTIC_RESTART_COUNT``): torchrun's agent store
  outlives a restart, which must not read the failure that caused it.

A rank that dies without raising (killed for memory, a segfault) posts nothing; where rank 0 hosts
the store and is the one gone, the others notice that the store stopped answering and stop too,
after :data:`STORE_LOST_GRACE_S` (the end of rank 0's run looks the same for a moment). A survivor
whose collective then fails because that peer is gone (gloo's "Connection closed by peer", a
``DistNetworkError``: :func:`peer_gone`) is not the rank that failed: it reports the post of the rank
that did, if there is one, else posts ``rank R found at step S that a peer rank is gone (its
collective failed: ...)``, and waits only until every rank but one has read it (the gone one never
will), for at most :data:`PEER_GONE_WAIT_S`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType

import torch.distributed as dist

from megatron_lite import jsontext
from megatron_lite.errors import UserError, mark_explained
from megatron_lite.launcher.fail_fast import attempt_key, describe

log = logging.getLogger(__name__)

POLL_S = 1.0  # each rank asks the store this often whether a peer failed: one tiny request
STORE_LOOKS_PER_S = 500  # at most this many such requests a second from the whole world (large worlds look less often)
PEER_WAIT_S = 15.0  # a failing rank waits at most this long for the others to read its failure
STORE_LOST_GRACE_S = 10.0  # a store that stopped answering: rank 0 is gone, unless the loop ends meanwhile
PEER_GONE_WAIT_S = 3.0  # the same wait where the failure is a peer gone: some readers never come
STORE_OP_TIMEOUT_S = 30.0  # the watch's own store requests (a host that vanished without a reset)
# Once every rank has read a failure, the rank that failed leaves first: the launcher's summary
# (torchrun's "Root Cause", srun's first failed task) then names it, not a rank it stopped.
FAILED_LINGER_S, STOPPED_LINGER_S = 0.5, 2.0
# a collective that failed because a peer process is gone (gloo, NCCL, the TCP store beneath them)
PEER_GONE_PATTERNS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "remote process exit",  # NCCL: "remote process exited or there was a network error"
    "ncclremoteerror",
)
_handling = threading.Event()  # set once this process stops for a failure (``failure_being_handled``)


def failure_being_handled() -> bool:
    """Whether a :class:`FailureWatch` of this process is stopping it for a failure (its own or a
    peer's): a preemption signal then can no longer get a checkpoint saved (``training/fault.py``)."""
    return _handling.is_set()


def peer_gone(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because a peer process is gone, not this rank's
    own failure: a ``DistNetworkError``, or a ``RuntimeError`` (``DistBackendError``, gloo's plain
    one) whose message says the peer closed or reset the connection, or NCCL's remote error."""
    network = getattr(dist, "DistNetworkError", None)
    if network is not None and isinstance(error, network):
        return True
    if not isinstance(error, RuntimeError):
        return False
    text = str(error).lower()
    return any(pattern in text for pattern in PEER_GONE_PATTERNS)


def _exit_status(error: BaseException) -> int:
    """The CLI's exit status for ``error`` (``cli.main``), which the other ranks exit with too."""
    if isinstance(error, UserError):
        return 2
    if isinstance(error, KeyboardInterrupt):
        return 130
    return getattr(error, "exit_status", 1)  # SetupInterrupted: 128 + the signal's number


def poll_interval(poll_s: float, world: int) -> float:
    """Seconds between one rank's looks at the store: ``poll_s``, longer where the whole world's
    looks would exceed :data:`STORE_LOOKS_PER_S` (4096 ranks: every 8.2 s)."""
    return max(poll_s, world / STORE_LOOKS_PER_S)


def _failure_text(report: dict) -> str:
    where = report.get("where") or f"at step {report['step']}"
    if report.get("peer_gone"):
        return (
            f"rank {report['rank']} found {where} that a peer rank is gone (its collective failed: {report['error']})"
        )
    return f"rank {report['rank']} failed {where}: {report['error']}"


class FailureWatch:
    """Make every rank stop promptly, with its error, when one rank's training loop raises (see the
    module docstring). A context manager around the loop; set :attr:`step` to the step being worked
    on, which a failure names. A no-op without a process group or with one rank.

    ``wait_s``: how long a failing rank waits for the others to read its failure (capped at
    :data:`PEER_WAIT_S`: pass ``parallel.timeout_s``). ``settle``: called with the loop's error on
    the rank that raised it, once the watch is stopped and before the failure is posted (the trainer
    commits or drops a checkpoint in flight); a rank that a peer's failure is ending never gets
    there. ``note``: called when a peer's failure ends this rank, for a sentence to add to the log
    line (what this rank leaves unfinished), or None. ``where``: the stage a failure is reported
    in (``during setup``), instead of the step.

    An error that every rank raises together (``UserError.raised_on_every_rank``: a
    :func:`fail_fast_setup` verdict inside the watch, training diverged, a checkpoint not saved) is
    settled but not posted: no rank is left waiting for it, and none is the rank that failed.
    """

    FAILURE = "failure"

    def __init__(
        self,
        wait_s: float = PEER_WAIT_S,
        poll_s: float = POLL_S,
        settle: Callable[[BaseException], None] | None = None,
        note: Callable[[], str | None] | None = None,
        where: str | None = None,
    ) -> None:
        self.wait_s, self.poll_s = min(wait_s, PEER_WAIT_S), poll_s
        self.settle, self.note, self.where = settle, note, where
        self.step = 0
        self._store: dist.Store | None = None
        self._stop = threading.Event()
        self._acting = threading.Lock()  # held while stopping the process, or while the loop leaves
        self._thread: threading.Thread | None = None
        self.rank, self.world = 0, 1

    def __enter__(self) -> FailureWatch:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.poll_s = poll_interval(self.poll_s, self.world)
        shared = dist.distributed_c10d._get_default_store()
        # a connection of its own (torch >= 2.8): a connection serves one request at a time, and the
        # main thread may hold the shared one in a blocking wait (a NCCL communicator's first use)
        try:
            own = shared.clone() if hasattr(shared, "clone") else shared
            own.set_timeout(timedelta(seconds=STORE_OP_TIMEOUT_S))
        except (RuntimeError, OSError) as e:
            log.warning("rank %d cannot watch for failing ranks (rendezvous store: %s)", self.rank, e)
            return self
        self._store = dist.PrefixStore(f"megatron_lite/loop/{attempt_key()}", own)
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="megatron-lite-failure-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._store is not None:
            with self._acting:  # a peer's failure found before this: the process ends inside _halt
                self._stop.set()
            self._thread.join(self.poll_s + 1)  # its request in flight, then it sees the stop
        clean_exit = isinstance(error, SystemExit) and error.code in (0, None)
        if error is None or clean_exit:
            self._store = None  # closes this watch's connection
            return
        try:
            if self.settle is not None:
                self.settle(error)
        finally:
            if self._store is not None and not getattr(error, "raised_on_every_rank", False):
                self._post(error)
            self._store = None
            _handling.clear()  # the error goes on up: a later run in this process starts afresh

    def _watch(self) -> None:
        """The thread: look for a peer's failure every ``poll_s`` until the loop ends."""
        while not self._stop.wait(self.poll_s):
            try:
                if not self._store.check([self.FAILURE]):
                    continue
                report = jsontext.loads(self._store.get(self.FAILURE))
                self._mark_read()
            except (RuntimeError, OSError) as e:  # DistNetworkError and DistStoreError are RuntimeErrors
                self._store_lost(e)
                return
            self._halt(_failure_text(report), report["status"], report.get("peer_gone", False))
            return

    def _mark_read(self) -> None:
        self._store.set(f"read/{self.rank}", "")
        self._store.add("readers", 1)  # counted too: a wait for all but the gone rank(s) asks once

    def _store_lost(self, error: Exception) -> None:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent went away; its ranks get SIGTERM and save (launcher/orphan.py), so
            # the job may still end well: say so, never stop the rank for it
            log.warning("the rendezvous store stopped answering (%s): a failing rank cannot stop this one now", error)
            return
        if self._stop.wait(STORE_LOST_GRACE_S):  # rank 0 finished its loop and left: no failure
            return
        self._halt(f"rank 0 is gone: the rendezvous store it hosts stopped answering ({error})", 1)

    def _halt(self, why: str, status: int, peer_gone: bool = False) -> None:
        """End this process now, with ``why`` as its last log line (unless the loop already ended);
        ``peer_gone``: a rank is gone, and will never read the failure this one waits to be read."""
        with self._acting:
            if self._stop.is_set():
                return
            _handling.set()
            extra = None
            with contextlib.suppress(Exception):  # the note is a courtesy; nothing may keep the rank alive
                extra = self.note() if self.note else None
            log.error("%s; stopping rank %d too%s", why, self.rank, f" ({extra})" if extra else "")
            self._wait_for_readers(STOPPED_LINGER_S, peer_gone)
            logging.shutdown()  # flush every handler: os._exit skips the interpreter's cleanup
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(status)

    def _post(self, error: BaseException) -> None:
        """Tell every rank that this one failed, then wait until all of them have read it. A peer
        gone (:func:`peer_gone`) is reported as such, or as the failure a peer posted before."""
        _handling.set()
        gone = peer_gone(error)
        report = {"rank": self.rank, "step": self.step, "where": self.where, "error": describe(error)}
        report.update(status=_exit_status(error), peer_gone=gone)
        if not gone:
            log.error("%s; stopping every rank", _failure_text(report))
        try:
            first = jsontext.loads(self._store.compare_set(self.FAILURE, "", json.dumps(report)))
            self._mark_read()
        except (RuntimeError, OSError) as e:
            if gone:  # the store's host (rank 0 of a plain launch or srun) may be the gone peer
                log.error("%s; stopping", _failure_text(report))
                mark_explained(error)
            log.warning(
                "could not tell the other ranks (the rendezvous store did not answer: %s); they stop at their "
                "next collective's timeout (parallel.timeout_s)",
                e,
            )
            return
        if gone and first["rank"] != self.rank:  # the peer's failure is the cause: name it, not this error
            log.error("%s; this rank's collective failed with it (%s)", _failure_text(first), describe(error))
        elif gone:
            log.error("%s; stopping every rank", _failure_text(report))
        if gone:  # its traceback would only show where this rank's collective was
            mark_explained(error)
        elif first["rank"] != self.rank:
            log.error("(%s first)", _failure_text(first))
        told = self._wait_for_readers(FAILED_LINGER_S, gone or first.get("peer_gone", False))
        if told and isinstance(error, UserError):
            error.told_every_rank = True

    def _wait_for_readers(self, linger_s: float, peer_gone: bool = False) -> bool:
        """Whether every rank read the failure within ``wait_s`` (a rank may be dead); then linger
        ``linger_s`` more: the store's host, rank 0 or the torchrun agent beside it, must outlive
        the others' last request, or they would see a lost store instead of the failure. With a
        ``peer_gone``, every rank but one is enough, within :data:`PEER_GONE_WAIT_S`."""
        readers = [f"read/{r}" for r in range(self.world)]
        deadline = time.monotonic() + (min(self.wait_s, PEER_GONE_WAIT_S) if peer_gone else self.wait_s)
        try:
            while not (self._store.add("readers", 0) >= self.world - 1 if peer_gone else self._store.check(readers)):
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.1)
        except (RuntimeError, OSError):  # the store's host left: nobody can read any more
            return False
        time.sleep(linger_s)
        return True
