"""One run per object-store ``checkpoint.dir``: a claim object in place of a lock.

An object store (``s3://``, ``gs://``) has no locks, so rank 0 of a run claims its ``checkpoint.dir``
instead: at startup (``training/run_lock.py``, before anything reads or writes there) it reads
``<checkpoint.dir>/.megatron-lite.claim`` and, unless another run's claim is there, creates its own (the
holder details of a lock file, ``tempfiles.holder_info``, with its run id), and deletes it when the run
ends. Before each save, before anything of the step is written, rank 0 reads it again
(:meth:`Checkpointer._begin <megatron_lite.checkpoint.writer.Checkpointer>`): a claim of another run
stops this one with an error on every rank.

Where the store has a conditional create (S3's ``PutObject`` with ``If-None-Match: *``, GCS's
``ifGenerationMatch=0``; fsspec's ``pipe_file(..., mode="create")`` sends them:
:attr:`Storage.creates_exclusively <megatron_lite.checkpoint.storage.Storage>`), the claim is created
with it: one request that the store refuses when a claim object is there, so of two runs started at
the same moment exactly one claims the directory and the other is refused at startup, naming it. An
S3-compatible store may ignore the condition and write all the same, so a second create of the claim
just made must be refused too; a store that accepts it, or answers that it does not implement the
condition (501), has no conditional create. Without one (nor a client that sends it) the claim is read,
then written, two requests: of two runs started at the same moment (both read no claim, the later write
wins), the one whose claim was overwritten is refused at its first save, before it writes, and a run
that claims the directory between another run's check and the end of that run's save is seen only at
that run's next save. The startup log says which of the two the store gets.

A claim outlives a run that dies without ending (a crash, a SIGKILL). It is taken over at once by a
later start of the same launch (a SLURM requeue, a torchrun restart: ``tempfiles.earlier_start``), and
by a run in the same ``log.dir`` whose lock file named the claim's run (that run no longer holds its
``log.dir``, so it has ended). Any other run is refused, and told to delete the claim if its run is gone.
A takeover deletes the ended run's claim and then creates its own: a run starting meanwhile finds the
ended run's claim (and is refused), or competes for the create, which one of them wins. The delete is
not conditional on the object being the claim that was read (fsspec offers no conditional delete or
replace), so of two runs taking over one ended claim at the same moment (two later starts of one
launch) each may delete the claim the other just created: both start, and the one whose claim went is
refused at its first save, as without a conditional create.

A claim object that holds no holder (not the JSON this module writes: another tool's object, a claim
of another format) names no run that can be asked whether it has ended, so it is no claim to take
over either: starting a run, and each save, is refused naming the object and saying to delete it when
no run uses the directory; a run's end leaves it as it is.
"""

from __future__ import annotations

import errno
import json
import logging

from megatron_lite.checkpoint.storage import Storage
from megatron_lite.data import tempfiles
from megatron_lite.data.tempfiles import describe_info, earlier_start, read_holder
from megatron_lite.errors import UserError

CLAIM = ".megatron-lite.claim"
CLAIM_TRIES = 3  # a lost create is read again: refused when a claim is there, tried again when it went
log = logging.getLogger(__name__)


def read_claim(storage: Storage) -> dict | None:
    """The run that claims ``storage`` (:func:`~megatron_lite.data.tempfiles.read_holder`); None when none
    does. :class:`UserError` when the claim object holds no holder (see the module docstring)."""
    try:
        text = storage.read_text(CLAIM)
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        text = None
    holder = None if text is None else read_holder(text)
    if holder is None:
        shown = "bytes that are not UTF-8 text" if text is None else repr(text[:80] + ("..." if len(text) > 80 else ""))
        raise UserError(
            f"checkpoint.dir={storage.url()!r} holds a claim object {storage.url(CLAIM)} that names no run (it "
            f"holds {shown}, not a run's claim: its host, pid and start time as JSON), so whether a run still "
            f"uses this checkpoint.dir cannot be told; if none does, delete {storage.url(CLAIM)}, else choose "
            "another checkpoint.dir"
        )
    return holder


def _refusal(storage: Storage, holder: dict) -> str:
    return (
        f"checkpoint.dir={storage.url()!r} is claimed by another run ({describe_info(holder)}; claim object "
        f"{storage.url(CLAIM)}): an object store has no locks, and two runs in one checkpoint.dir overwrite each "
        "other's checkpoints; wait for that run to end, stop it, or choose another checkpoint.dir (if that run is "
        f"gone without ending, e.g. its machine crashed, delete {storage.url(CLAIM)})"
    )


def claimed_by_another(storage: Storage) -> str | None:
    """Why this process must not write into ``storage``: another run's claim is there, or a claim object
    naming no run; else None."""
    try:
        holder = read_claim(storage)
    except UserError as e:
        return str(e)
    return None if holder is None or holder.get("run") == tempfiles.RUN_ID else _refusal(storage, holder)


def claim(storage: Storage, ours: dict, ended: str | None) -> bool:
    """Claim ``storage`` for this run (``ours``: its :func:`~megatron_lite.data.tempfiles.holder_info`).
    :class:`UserError` when another run claims it, unless that run is an earlier start of this launch
    or the run ``ended`` (the run id of a holder known to have ended), whose claims are taken over.
    Returns whether the store's conditional create made the claim (False: it was read, then written)."""
    text = json.dumps(ours)
    for _ in range(CLAIM_TRIES):
        holder = read_claim(storage)
        if holder is not None and holder.get("run") != ours["run"]:
            if not (earlier_start(holder, ours) or (ended is not None and holder.get("run") == ended)):
                raise UserError(_refusal(storage, holder))
            log.info(
                "checkpoint.dir=%r: taking over the claim of %s, which has ended", storage.url(), describe_info(holder)
            )
        if not storage.creates_exclusively:
            storage.write_text(CLAIM, text)
            return False
        if holder is not None:
            storage.remove(CLAIM)  # this run's, or an ended run's: replaced by the create
        try:
            return _create(storage, text)
        except FileExistsError:
            continue  # another run created its claim first: the next read names it
    raise UserError(
        f"checkpoint.dir={storage.url()!r}: other runs' claims ({storage.url(CLAIM)}) appeared and went "
        f"{CLAIM_TRIES} times while this run claimed it: other runs start and end in it; start one run per "
        "checkpoint.dir"
    )


def _create(storage: Storage, text: str) -> bool:
    """Create the claim object with the store's conditional create (FileExistsError: another run's is
    there); False where the store turns out to have none, the claim then written all the same."""
    try:
        storage.create_text(CLAIM, text)
    except OSError as e:
        if e.errno != errno.ENOSYS:  # FileExistsError included
            raise
        storage.write_text(CLAIM, text)  # 501 Not Implemented: a store without conditional writes
        return False
    try:
        storage.create_text(CLAIM, text)  # a store that ignores the condition writes again
    except FileExistsError:
        return True
    return False


def release_claim(storage: Storage) -> None:
    """Delete this process's claim on ``storage`` (another run's, or an object naming no run, is left as it is)."""
    try:
        holder = read_claim(storage)
    except UserError:
        return
    if holder is not None and holder.get("run") == tempfiles.RUN_ID:
        storage.remove(CLAIM)
