"""Saving sharded checkpoints: every rank writes its own file, rank 0 commits (format: ``format.py``).

One save, on every rank at the same step::

    wait for the previous save (at most one in flight) and report its failure, if any
    rank 0 prepares the staging directory (on an object store, once it found no other run's claim:
        claim.py); broadcast of its outcome (the barrier): a failure there is the same error on
        every rank, before anything is written
    copy this rank's boxes to host memory (async: always, pinned on CUDA; sync: only off-CPU)
    write rank_XXXXX.safetensors (+ rank 0: tokenizer files), fsync, hash   <- background thread
    finalize (collective): gather every rank's entries, checksums and errors; rank 0 writes
        metadata.json, renames the directory into place, replaces `latest`, prunes to `keep`
        committed checkpoints of this run (older local saves cut short are removed; another run's, and
        step directories no metadata.json shows to be this run's, are kept);
        any error before the rename instead removes the staging directory, and every rank records
        the same message (after it, failing to replace `latest` or to prune is a warning)

With ``checkpoint.async`` the write runs in a thread while training continues; the trainer asks
every step whether any rank is still writing (one all-reduce it already makes) and calls
:meth:`Checkpointer.wait` once none is, which commits the save; a failed write is raised there, on
every rank at that step (by :meth:`save` or :meth:`close` when they come first), and never commits:
``metadata.json`` is only written after every rank reported a complete file. When the training
loop fails with a save in flight, the trainer commits it only where every rank is known to stand at
the same point (``Trainer._settle_save``, :meth:`Checkpointer.settle`), else drops it.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_lite.checkpoint import collectives
from megatron_lite.checkpoint.boxes import full_box
from megatron_lite.checkpoint.claim import claimed_by_another
from megatron_lite.checkpoint.format import (
    DTYPE_CODES,
    EXTRA_FILES,
    FORMAT,
    LATEST,
    METADATA,
    SAVE_FILE,
    box_key,
    dtype_name,
    rank_file,
    sha256_file,
    step_dir_name,
    step_of,
    write_tensor_file,
)
from megatron_lite.checkpoint.shards import Piece
from megatron_lite.checkpoint.storage import Storage
from megatron_lite.errors import UserError, on_every_rank

log = logging.getLogger(__name__)
WRITER_THREAD = "megatron-lite checkpoint writer"  # the name of a checkpoint.async write's thread


def writing_in_background() -> bool:
    """Whether a background checkpoint write (``checkpoint.async``) of this process is still running:
    one abandoned when the run failed (:meth:`Checkpointer.abandon`) goes on until the process exits."""
    return any(t.name == WRITER_THREAD and t.is_alive() for t in threading.enumerate())


@dataclass
class _Save:
    """A save in flight on this rank."""

    step: int
    staging: str
    tensors: dict[str, torch.Tensor] | None
    info: dict[str, Any]  # this rank's entries, file name, coordinate, rng keys: all-gathered by finalize
    meta: dict[str, Any]  # rank 0: metadata without tensors, ranks and files
    thread: threading.Thread | None = None
    files: dict[str, dict] = field(default_factory=dict)
    error: str | None = None


class Checkpointer:
    """Writes this rank's part of each checkpoint under ``root`` (see the module docstring).

    ``extra_files``: name -> local source copied into every checkpoint by rank 0 (the tokenizer).
    ``spared``: step directories in ``root`` not this run's to prune (used on rank 0): another run's, or
    not shown to be this run's (:meth:`_prune`); a step this run saves again is its own from then on.
    """

    def __init__(
        self,
        root: str | Path,
        keep: int,
        async_save: bool,
        extra_files: dict[str, Path] | None = None,
        spared: Iterable[str] = (),
    ) -> None:
        self.storage = Storage(root)
        self.keep, self.async_save = keep, async_save
        self.spared = frozenset(spared)
        self.extra_files = {k: v for k, v in (extra_files or {}).items() if v.is_file()}
        self.rank = collectives.world()[0]
        self._pending: _Save | None = None
        self.last_step: int | None = None  # the step of the newest save started
        # Host copies for async saves, reused from save to save (a box key names the same shape
        # every time): pinned allocations are slow and a fresh 10 GB copy would fault in every page.
        # Safe to overwrite: a save starts only after the previous write finished.
        self._host: dict[str, torch.Tensor] = {}
        self.failed: str | None = None

    @property
    def writing(self) -> bool:
        """This rank's background write is still running."""
        return self._pending is not None and self._pending.thread is not None and self._pending.thread.is_alive()

    @property
    def in_flight(self) -> bool:
        """A save was started and not finalized yet."""
        return self._pending is not None

    def save(
        self,
        step: int,
        pieces: list[Piece],
        rank_tensors: dict[str, torch.Tensor],
        coordinate: tuple[int, int, int],
        meta: dict[str, Any],
    ) -> None:
        """Save this rank's ``pieces`` and ``rank_tensors`` (RNG) as the checkpoint of ``step``.
        ``meta`` (used on rank 0): the metadata fields the trainer knows (``format.py``)."""
        self.wait()
        self.last_step = step
        staging = self._begin(step)
        keyed = [(box_key(p.name, p.box), p.tensor) for p in pieces] + list(rank_tensors.items())
        tensors = {key: self._to_host(key, t) for key, t in keyed}
        if any(p.tensor.is_cuda for p in pieces):
            torch.cuda.synchronize()  # the non-blocking copies into pinned memory are complete
        entries = [
            {
                "name": p.name,
                "shape": list(p.shape),
                "dtype": DTYPE_CODES[p.tensor.dtype],
                "box": list(map(list, p.box)),
            }
            for p in pieces
        ]
        info = {
            "entries": entries,
            "file": rank_file(self.rank),
            "coordinate": list(coordinate),
            "rng": list(rank_tensors),
        }
        self._pending = _Save(step, staging, tensors, info, meta)
        if self.async_save:
            self._pending.thread = threading.Thread(
                target=self._write, args=(self._pending,), name=WRITER_THREAD, daemon=True
            )
            self._pending.thread.start()
        else:
            self._write(self._pending)
            self.wait()

    def _begin(self, step: int) -> str:
        """Rank 0 prepares the staging directory of ``step``; every rank gets its name, or the same
        :class:`UserError` when it could not be prepared (``checkpoint.dir`` became a file or
        unwritable, or another run claims the object store it is on): nothing was written, and the
        checkpoints already saved are untouched."""
        final = step_dir_name(step)
        staging, error = self.storage.staging_name(final), None
        if self.rank == 0:
            try:  # an object store has no locks: a run claims it instead, checked at each save (claim.py)
                error = claimed_by_another(self.storage) if self.storage.remote else None
                if error is None:
                    self.storage.begin(final)
            except Exception as e:  # reported on every rank below, never raised between collectives
                error = (
                    f"rank 0: cannot prepare {self.storage.url(staging)}: {type(e).__name__}: {e}; "
                    f"checkpoint.dir={self.storage.url()!r} must stay a writable directory while the run saves"
                )
        # the broadcast is also the barrier: nobody writes into the staging directory before it is clean
        error = collectives.broadcast(error)
        if error:
            raise on_every_rank(UserError(f"checkpoint of step {step} was not saved: {error}"))
        return staging

    def _to_host(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` in host memory: itself when on CPU and written synchronously, else a copy (async:
        training will change ``t``), pinned on CUDA for a fast non-blocking transfer (the caller
        synchronizes)."""
        t = t.detach()
        if t.device.type == "cpu" and not self.async_save:
            return t
        host = self._host.get(key)
        if host is None or host.shape != t.shape or host.dtype != t.dtype:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            if self.async_save:
                self._host[key] = host
        return host.copy_(t, non_blocking=t.is_cuda)

    def _write(self, save: _Save) -> None:
        """Write and publish this rank's file (rank 0: also the extra files); errors are recorded."""
        try:
            rel = f"{save.staging}/{save.info['file']}"
            local = self.storage.writable_path(rel)
            digest, nbytes = write_tensor_file(local, save.tensors)
            self.storage.publish(local, rel)
            save.files[save.info["file"]] = {"sha256": digest, "bytes": nbytes}
            if self.rank == 0:
                for name, src in self.extra_files.items():
                    self.storage.copy_in(src, f"{save.staging}/{name}")
                    save.files[name] = {"sha256": sha256_file(src), "bytes": src.stat().st_size}
        except Exception as e:  # reported by finalize on every rank; never committed
            save.error = f"{type(e).__name__}: {e}"
        finally:
            save.tensors = None  # the host copies are no longer needed

    def finalize(self) -> None:
        """Commit the save in flight, or record why it failed (collective; call only when no rank
        is writing any more: after :meth:`wait`'s join, or when the trainer's all-reduce says so).
        The save stays in flight (:meth:`unsaved_note`, :meth:`abandon`) until every rank has joined the
        gather: a rank stopped by a peer's failure while it waits there has saved nothing."""
        save = self._pending
        if save is None:
            return
        gathered = collectives.all_gather({**save.info, "files": save.files, "error": save.error})
        self._pending = None
        outcome = None
        if self.rank == 0:
            errors = [f"rank {r}: {g['error']}" for r, g in enumerate(gathered) if g["error"]]
            if not errors:
                try:
                    self._commit(save, gathered)
                except Exception as e:  # reported on every rank below, never raised between collectives
                    errors.append(f"rank 0: commit failed: {type(e).__name__}: {e}")
            if errors:
                self.storage.remove(save.staging)
                outcome = (
                    f"checkpoint of step {save.step} was not saved: {'; '.join(errors)} (checkpoint.dir="
                    f"{self.storage.url()!r}); the checkpoints saved before it are untouched: fix the cause (a full "
                    "disk: free space there, or lower checkpoint.keep), then rerun with checkpoint.resume=auto to "
                    "continue from the newest"
                )
        outcome = collectives.broadcast(outcome)
        if outcome:  # raised by wait(), which every caller of finalize is: the CLI says it once
            self.failed = self.failed or outcome
        elif self.rank == 0:
            log.info("saved checkpoint %s", self.storage.url(step_dir_name(save.step)))

    def _commit(self, save: _Save, gathered: list[dict]) -> None:
        tensors: dict[str, dict] = {}
        for g in gathered:
            for e in g["entries"]:
                t = tensors.setdefault(e["name"], {"shape": e["shape"], "dtype": e["dtype"], "shards": []})
                t["shards"].append({"file": g["file"], "key": box_key(e["name"], e["box"]), "box": e["box"]})
        meta = {
            "format": FORMAT,
            **save.meta,
            "tensors": dict(sorted(tensors.items())),
            "ranks": [{"file": g["file"], "coordinate": g["coordinate"], "rng": g["rng"]} for g in gathered],
            "files": dict(sorted((name, info) for g in gathered for name, info in g["files"].items())),
        }
        final = step_dir_name(save.step)
        self.storage.write_text(f"{save.staging}/{METADATA}", json.dumps(meta, indent=1) + "\n")
        self.storage.commit(save.staging, final)
        self.spared -= {final}  # this run's now, whatever lay there before: pruned and counted as its own
        # committed: from here on a failure (a full disk) loses nothing, and is only a warning
        for what, act in (
            (f"replace {LATEST!r} (no reader needs it)", lambda: self.storage.write_text(LATEST, final + "\n")),
            ("prune older checkpoints", lambda: self._prune(save.step)),
        ):
            try:
                act()
            except Exception as e:
                log.warning("saved checkpoint %s, but could not %s: %s: %s", final, what, type(e).__name__, e)

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep`` committed checkpoints (this one included). What a local save cut
        short left (a process killed mid-save: a ``.tmp-step_*`` directory, no other save being in
        flight now) is removed, never counted, so it cannot displace a complete checkpoint; only what a
        save writes is removed: a directory that also holds other files (an export a user put there) is
        left alone, whatever its name. A step directory without ``metadata.json`` is neither removed nor
        counted: nothing shows which run wrote it (on an object store, which has no staging directory, it
        is a save cut short, replaced when its step is saved again). The directories in ``spared``
        (another run's, and those no ``metadata.json`` shows to be this run's: ``resume.other_runs_checkpoints``)
        are neither removed nor counted either: ``checkpoint.keep`` is this run's."""
        older = [n for n in self.storage.step_dirs() if step_of(n) < step and n not in self.spared]
        committed = [n for n in older if self.storage.exists(f"{n}/{METADATA}")]
        for name in self.storage.staging_dirs():
            if self._only_save_files(name):
                log.warning("removing %s: a save cut short (never committed)", self.storage.url(name))
                self.storage.remove(name)
        for name in committed[: max(0, len(committed) - (self.keep - 1))]:
            self.storage.remove(name)

    def _only_save_files(self, name: str) -> bool:
        """Whether directory ``name`` holds nothing but files a save writes (so removing it loses nothing else)."""
        ours = (*EXTRA_FILES, *self.extra_files)
        return all(SAVE_FILE.match(n) or n in ours for n in self.storage.names(name))

    def wait(self) -> None:
        """Finish the save in flight (join, finalize) and raise if any save failed (collective)."""
        if self._pending is not None:
            if self._pending.thread is not None:
                self._pending.thread.join()
            self.finalize()
        if self.failed:
            failed, self.failed = self.failed, None
            raise on_every_rank(UserError(failed))

    def settle(self, commit: bool) -> None:
        """The training loop failed: commit the save in flight (``commit``: every rank is known to
        stand at the same point, so the collective of :meth:`finalize` cannot hang; a failure of
        that save is logged and dropped, the loop's error being the one to raise), else
        :meth:`abandon` it."""
        if not self.in_flight:
            return
        if not commit:
            self.abandon()
            return
        try:
            self.wait()
        except UserError as e:
            log.error("%s", e)

    def unsaved_note(self) -> str | None:
        """What a rank stopped by a peer's failure leaves unsaved, for its last log line, or None."""
        save = self._pending
        return None if save is None else f"checkpoint of step {save.step}, still in flight, was not saved"

    def abandon(self) -> None:
        """The run failed with a save in flight that cannot be committed here: committing needs
        every rank's complete file and a collective (:meth:`finalize`), and a peer may be gone.
        Nothing is committed: ``metadata.json`` is never written, so the checkpoints already
        saved stay the newest; a later save removes what this one wrote locally (:meth:`_prune`), and
        on an object store the save of the same step replaces it."""
        save, self._pending = self._pending, None
        if save is None:
            return
        log.warning(
            "checkpoint of step %d was not saved: it was still in flight (checkpoint.async) when the run failed; "
            "the checkpoints saved before it are untouched",
            save.step,
        )
        if save.thread is None or not save.thread.is_alive():  # else the writer still uses the spool
            self.storage.close()

    def close(self) -> None:
        """End of training: finish the save in flight, raise a failure, drop local spool files."""
        try:
            self.wait()
        finally:
            self.storage.close()


def save_weights(
    root: str | Path, step: int, state: dict[str, torch.Tensor], config: dict, files: dict[str, Path]
) -> str:
    """Write a weights-only checkpoint of a single-device state dict from one process (``convert
    from-hf``); returns its location. The trainer starts from it with a fresh optimizer. Its
    ``param_dtype`` (the dtype ``to-hf`` writes) is the one that holds every tensor's values exactly:
    theirs, or fp32 for a state that mixes dtypes (bf16 matrices beside fp32 norms)."""
    pieces = [Piece(f"model/{n}", tuple(t.shape), full_box(t.shape), t.detach().contiguous()) for n, t in state.items()]
    dtype = functools.reduce(torch.promote_types, {t.dtype for t in state.values()})
    layout = {"world_size": 1, "tp": 1, "pp": 1, "vp": 1, "dp": 1, "distributed_optimizer": False}
    meta = {
        "step": step,
        "weights_only": True,
        "config": config,
        "layout": {**layout, "param_dtype": dtype_name(dtype)},
        "optimizer": None,
        "trainer": None,
        "lineage": None,
    }
    writer = Checkpointer(root, keep=1, async_save=False, extra_files=files)
    writer.save(step, pieces, {}, (0, 0, 0), meta)
    writer.close()
    return writer.storage.url(step_dir_name(step))
