"""Finding sharded checkpoints: the step directory to read, from a path or ``checkpoint.resume``.

A step directory is verified and read by ``step_dir.py`` (:func:`verify`, :class:`CheckpointReader`,
re-exported here). ``checkpoint.resume=auto`` takes the newest checkpoint that passes, warning about
each one skipped; a step directory without ``metadata.json`` was never committed (a save cut short)
and is no checkpoint, unless it holds the older format's ``meta.json`` (committed, though unreadable
here). When committed checkpoints exist and none passes, the run stops with an error rather than
start from scratch. A ``checkpoint.resume`` path that is no step directory is
refused, naming what it is (:func:`resolve_resume`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_lite import jsontext
from megatron_lite.checkpoint import collectives
from megatron_lite.checkpoint.format import METADATA, OLDER_METADATA, step_dir_name, step_of
from megatron_lite.checkpoint.step_dir import CheckpointReader, read_metadata, verify
from megatron_lite.checkpoint.storage import Storage, is_url
from megatron_lite.errors import UserError

log = logging.getLogger(__name__)
_AUTO = "checkpoint.resume=auto for the newest good checkpoint in checkpoint.dir"  # the other fix, in messages


def list_steps(root: str | Path) -> list[tuple[int, str]]:
    """(step, directory name) of every ``step_*`` directory under ``root``, oldest first."""
    return [(step_of(n), n) for n in Storage(root).step_dirs()]


def steps_there(root: str | Path) -> str:
    """The steps under ``root`` for a message naming what is there: ``"4, 5"``, or ``"none"``."""
    return ", ".join(str(step) for step, _ in list_steps(root)) or "none"


def _committed(storage: Storage, name: str) -> bool:
    """Whether directory ``name`` holds a commit record: ``metadata.json``, or the older format's
    ``meta.json`` (a checkpoint this version cannot read, but one a run must not save over)."""
    return storage.exists(f"{name}/{METADATA}") or storage.exists(f"{name}/{OLDER_METADATA}")


def is_step_dir(path: str | Path) -> bool:
    """Whether ``path`` is one committed checkpoint (a step directory holding ``metadata.json``, or
    ``meta.json`` of the older format), whatever its name, rather than a run's checkpoint root."""
    return _committed(*_split(path))


def committed_steps(root: str | Path) -> list[int]:
    """Steps of the committed checkpoints under ``root`` (their ``metadata.json``, or the older
    format's ``meta.json``, exists), oldest first; not verified. One process's cheap look (no
    collectives, no checksums): the trainer asks it whether ``checkpoint.resume=none`` would save
    over an earlier run."""
    storage = Storage(root)
    return [step_of(n) for n in storage.step_dirs() if _committed(storage, n)]


def peek_checkpoint(path: str | Path) -> CheckpointReader | None:
    """Step directory ``path``, or the newest committed step under it, its metadata checked but its
    files not verified (None when there is none or it is unusable): the preflight's cheap look (no
    checksums, no collectives) at what a run would start from (config, files, tensor shapes)."""
    try:
        storage, name = _split(path)
        if not storage.exists(f"{name}/{METADATA}"):
            steps = committed_steps(path)
            if not steps:
                return None
            storage, name = Storage(path), step_dir_name(steps[-1])
        meta, problem = read_metadata(storage, name)
    except Exception:  # unreadable or unreachable: the trainer's own (verified) load reports it
        return None
    return None if problem else CheckpointReader(storage, name, meta)


def _list_on_rank0(storage: Storage) -> list[str]:
    """Rank 0's listing on every rank (so all walk the same candidates); a listing error on all."""
    listing: tuple[list[str], str | None] = ([], None)
    if collectives.world()[0] == 0:
        try:
            listing = (storage.step_dirs(), None)
        except Exception as e:  # locally an OSError; an object store raises its client's (no endpoint...)
            if not (storage.remote or isinstance(e, OSError)):
                raise
            listing = ([], f"cannot list checkpoints under {storage.url()}: {type(e).__name__}: {e}")
    names, error = collectives.broadcast(listing)
    if error:
        raise UserError(error)
    return names


def _newest_good(storage: Storage, fix: str, *, resuming: bool = False) -> CheckpointReader | None:
    """The newest checkpoint under ``storage`` that passes; None when there is none; a UserError
    ending with ``fix`` when committed ones exist and none passes. Each one skipped is a warning;
    ``resuming`` (a run that saves into ``storage``) adds that the run's next save of that step
    replaces it: a reader that only reads leaves it as it is."""
    names = _list_on_rank0(storage)
    committed, newest_problem = 0, None
    for name in reversed(names):
        meta, problem = verify(storage, name)
        if meta is not None:
            return CheckpointReader(storage, name, meta)
        if not problem.startswith(METADATA + " is missing"):
            committed += 1
            newest_problem = newest_problem or f"{name}: {problem}"
        if collectives.world()[0] == 0:
            advice = (
                "; the run replaces it when it saves that step again (move it out of checkpoint.dir now to keep it)"
            )
            log.warning("skipping checkpoint %s: %s%s", storage.url(name), problem, advice if resuming else "")
    if committed:
        raise UserError(
            f"every checkpoint under {storage.url()} is incomplete or corrupt (newest: {newest_problem}; "
            f"see the warnings above); {fix}"
        )
    return None


def _finish_interrupted_commit(storage: Storage) -> None:
    """Rank 0 of the run resuming in ``storage``: put back a step whose re-save was killed mid-commit."""
    try:
        for name in storage.finish_interrupted_commit():
            log.warning("%s: a save was killed while replacing it; put back the complete copy", storage.url(name))
    except OSError as e:  # the listing that follows reports an unreadable directory on every rank
        log.warning("could not check %s for a save killed mid-commit: %s", storage.url(), e)


def _split(path: str | Path) -> tuple[Storage, str]:
    text = str(path).rstrip("/")
    parent, _, name = text.rpartition("/")
    return Storage(parent or "."), name


def open_step(path: str | Path) -> CheckpointReader:
    """The checkpoint in step directory ``path``, verified (collective)."""
    storage, name = _split(path)
    if not is_url(path) and not _committed(storage, name):
        committed = ", ".join(map(str, committed_steps(Path(path).parent))) or "none"
        raise UserError(
            f"{str(path)!r} is not a checkpoint: it has no {METADATA} (a save cut short is never committed); give a "
            f"committed step directory (steps in {str(Path(path).parent)!r}: {committed}), or use {_AUTO}"
        )
    meta, problem = verify(storage, name)
    if problem:
        others = ", ".join(str(step_of(n)) for n in storage.step_dirs() if n != name and _committed(storage, n))
        raise UserError(
            f"checkpoint {storage.url(name)} is unusable: {problem}; give another step directory (the other "
            f"committed steps in {storage.url()}: {others or 'none'})"
        )
    return CheckpointReader(storage, name, meta)


def find_checkpoint(path: str | Path) -> CheckpointReader:
    """A step directory as given, or the newest good checkpoint under a checkpoint root (collective)."""
    if is_step_dir(path):
        return open_step(path)
    fix = "fix or replace them, or point at a good step directory (step_XXXXXXXX)"
    found = _newest_good(Storage(path), fix) if Storage(path).exists("") else None
    if found is None:
        hint = "" if is_url(path) else _not_found_hint(Path(path))
        raise UserError(
            f"no checkpoint found at {str(path)!r} (expected a step_XXXXXXXX directory or its parent){hint}"
        )
    return found


def _not_found_hint(path: Path) -> str:
    """What a local path that holds no checkpoint is, and the one to give instead: a run's ``log.dir``
    (its ``checkpoints``), a file (the directory holding it: ``latest``, a step's ``metadata.json``;
    a run's own files, its ``checkpoints``), a step that is not there (the steps that are) or one that
    was never committed (the committed ones)."""
    if (path / "checkpoints").is_dir():  # a run's log.dir
        return f"; a run directory keeps its checkpoints in {str(path / 'checkpoints')!r}"
    if path.is_file():
        if (path.parent / "checkpoints").is_dir():  # config.yaml, metrics.jsonl of a run's log.dir
            return f"; it is a file of a run directory, whose checkpoints are in {str(path.parent / 'checkpoints')!r}"
        return f"; it is a file: give the directory holding it, {str(path.parent)!r}"
    if not path.exists() and list_steps(path.parent):  # a step that was never saved, or was pruned
        return f"; it does not exist, and the steps in {str(path.parent)!r} are {steps_there(path.parent)}"
    if path.is_dir() and path.name in [name for _, name in list_steps(path.parent)]:  # no commit record
        committed = ", ".join(map(str, committed_steps(path.parent))) or "none"
        return (
            f"; it holds no {METADATA}: a save that never committed (cut short, or still being written); the "
            f"committed steps in {str(path.parent)!r} are {committed}"
        )
    return ""


def resolve_resume(root: str | Path, resume: str) -> CheckpointReader | None:
    """The checkpoint to resume from: ``none`` -> None; a path -> it (verified; anything but a step
    directory is refused, naming what it is); ``auto`` -> the newest good one under ``root``, None
    when there is none (collective)."""
    if resume == "none":
        return None
    if resume == "auto":
        fix = "refusing to start from scratch. Fix or move them, or start a fresh run in a new checkpoint.dir"
        storage = Storage(root)
        if collectives.world()[0] == 0:
            _finish_interrupted_commit(storage)
        return _newest_good(storage, fix, resuming=True)
    if not is_url(resume):
        _refuse_resume_path(Path(resume), resume, root)
    return open_step(resume)


def _refuse_resume_path(path: Path, resume: str, root: str | Path) -> None:
    """``checkpoint.resume`` that is neither ``auto``, ``none`` nor a step directory: one error saying
    what it is (a word such as ``latest``, a step name or number, a missing step, a file, a checkpoint
    root) and the fix. A bare step (``step_00000300``, ``300``) is a path like any other, relative to
    the current directory: the error names its path in ``checkpoint.dir`` (``root``) when it is
    there, and lists the steps there (Megatron's ``--ckpt-step``: here the step directory's path)."""
    key = f"checkpoint.resume={resume!r}"
    if path.is_dir():
        steps = list_steps(path)
        if not (path / METADATA).is_file() and steps:
            newest = path / steps[-1][1]
            if not is_url(root) and path.resolve() == Path(root).resolve():
                raise UserError(
                    f"{key} is checkpoint.dir itself (holding steps {steps_there(path)}), not one step's directory: "
                    f"use checkpoint.resume=auto for its newest good one, or name one ({newest})"
                )
            raise UserError(
                f"{key} is a checkpoint directory holding steps {steps_there(path)}, not one step's directory: "
                f"name one ({newest}), or set checkpoint.dir={str(path)!r} with checkpoint.resume=auto for its "
                "newest good one"
            )
        return
    if path.exists():
        raise UserError(f"{key} is a file, not a checkpoint's step directory (step_XXXXXXXX); give one or use {_AUTO}")
    if path.parent == Path():  # one word: "latest" (Megatron's name for the newest checkpoint), a step, a number
        step = re.fullmatch(r"(?:step_)?(\d+)", resume)
        found = [name for n, name in list_steps(root) if step and n == int(step.group(1))]
        there = f"checkpoint.dir={str(root)!r} holds steps {steps_there(root)}"
        if found:
            raise UserError(
                f"{key} is no directory here: give the step's path, checkpoint.resume={Storage(root).url(found[0])!r} "
                f"({there}), or use {_AUTO}"
            )
        raise UserError(f"{key} is not auto, none or an existing step directory ({there}); use {_AUTO}")
    if not path.parent.is_dir():
        raise UserError(f"{key} does not exist, nor does {str(path.parent)!r}; give a step directory or use {_AUTO}")
    raise UserError(
        f"{key} does not exist (steps in {path.parent}: {steps_there(path.parent)}); name one of them, or use {_AUTO}"
    )


def iter_model_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the model in step directory ``path`` (verified by the caller: no checks
    here), one at a time, in the dtype the run trained in (the stored weights are its fp32 masters)."""
    storage, name = _split(path)
    meta = jsontext.loads(storage.read_text(f"{name}/{METADATA}"))
    dtype = getattr(torch, meta["layout"]["param_dtype"])
    reader = CheckpointReader(storage, name, meta)
    for param, t in reader.model_tensors():
        yield param, t.to(dtype)
