"""The checkpoint a run starts from (:func:`start_from`: its own to resume, ``checkpoint.resume=auto``
or a path, else ``checkpoint.init_from``'s weights) and the checks on one it is about to resume.

A resumed run must be the same run: the model it continues is the checkpoint's. Tensor shapes
are checked against the checkpoint's global shapes (``checkpoint/shards.py``); settings that keep
every shape (``model.rope_theta``, ``model.seq_len``, ``model.norm_eps``...) are caught here, by
comparing the checkpoint's saved ``model`` section with this run's, both resolved (defaults that
depend on other fields and the tokenizer's vocabulary filled in). Starting a *new* run from the
weights with other settings is what ``checkpoint.init_from`` is for, and is not checked here.
``model.init_std`` is the exception: it is read only to initialise weights, which a resume loads.
The tokenizer is checked too (:func:`check_tokenizer`): another one with the same vocabulary size
fits every tensor, yet each token id then stands for other text.

Every other setting may change on resume; the trainer logs each one changed and warns about those
whose effect is not plain from the value (``resume_changes.py``: :func:`config_changes`,
:func:`resume_warnings`, re-exported here).

A resume by path to an earlier step (a rewind, e.g. past a loss spike) is refused while
``checkpoint.dir`` holds committed checkpoints of later steps: the run would save over them one by
one, and after a crash ``checkpoint.resume=auto`` would take the newest of them, continuing the
abandoned run instead of this one. ``auto`` itself only passes over newer checkpoints that are
incomplete or corrupt; they are replaced when the run saves those steps again.

A resumed run never reads ``checkpoint.init_from``: its weights are its own checkpoint's. Another
``checkpoint.init_from`` than the one the run started from is warned about (:func:`keep_init_from`),
not refused (``checkpoint.init_from`` is the start of a run that has no checkpoint yet, as Megatron's
``--pretrained-checkpoint`` is, which ``--load`` overrides; a moved import must not block the run),
and the run keeps recording its true start. A weights-only checkpoint (``convert from-hf``'s) that
``checkpoint.resume`` names is such a start, recorded as the run's ``checkpoint.init_from``.

A resume from a checkpoint in ``checkpoint.dir`` that a run with another ``log.dir`` saved (a config
naming that run's ``checkpoint.dir``) is warned about at startup (:func:`other_run_note`), not refused:
this run continues that run's step and saves among its checkpoints, which is how a finished run is
trained on under a new ``log.dir``; its ``checkpoint.keep`` prunes none of that run's
(:func:`other_runs_checkpoints`), and a run still holding that directory is refused by its lock.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from megatron_lite.checkpoint.format import METADATA, sha256_file, step_dir_name
from megatron_lite.checkpoint.lineage import recorded_workdir, run_corpus_way
from megatron_lite.checkpoint.reader import CheckpointReader, committed_steps, find_checkpoint, resolve_resume
from megatron_lite.checkpoint.shards import check_shapes, shape_problems
from megatron_lite.checkpoint.step_dir import read_metadata
from megatron_lite.checkpoint.storage import Storage, is_url
from megatron_lite.config import Config, ParallelConfig
from megatron_lite.errors import UserError
from megatron_lite.training.resume_changes import (  # noqa: F401  re-exported
    config_changes,
    corpus_vocab_change,
    data_order_changes,
    model_changes,
    resume_warnings,
)

log = logging.getLogger(__name__)


def check_resume(cfg: Config, reader: CheckpointReader, rank: int, tokenizer: Path) -> None:
    """Refuse a full resume whose model settings differ from the checkpoint's (:func:`check_model_settings`)
    or whose ``tokenizer`` is not its run's (:func:`check_tokenizer`); warn (rank 0) when ``train.seed``
    or ``data.valid_fraction`` differs and a step is left to train (its samples change:
    :func:`data_order_changes`). Every rank gets the same verdict (the metadata is rank 0's, broadcast)."""
    if reader.weights_only:  # e.g. `convert from-hf`: a start from weights, like checkpoint.init_from
        return
    saved = reader.meta.get("config") or {}
    check_model_settings(cfg, reader)
    check_shapes(cfg.model, reader, ("model",))  # no saved config to compare: the shapes must fit
    check_tokenizer(reader, tokenizer, embedded=not cfg.data.path)
    if rank == 0 and reader.step < cfg.train.steps:  # else no step trains: the samples do not change
        for warning in data_order_changes(saved, cfg, reader.step):
            log.warning("%s", warning)


def check_model_settings(cfg: Config, reader: CheckpointReader) -> None:
    """Refuse to resume ``reader`` (a full checkpoint) when its saved model settings differ from
    ``cfg``'s (resolved): one UserError listing every change (:func:`model_changes`), whose fix is
    ``checkpoint.init_from`` when the weights fit this model, else a new run. Reads only the metadata
    (saved config, tensor shapes): the trainer's preflight runs it on an unverified checkpoint too."""
    saved = reader.meta.get("config") or {}
    changes = model_changes(saved, cfg) if "model" in saved else []
    if not changes:
        return
    try:
        check_shapes(cfg.model, reader, ("model",))
        other = (
            f"start a new run from these weights with checkpoint.init_from={reader.location} and a new "
            "checkpoint.dir (or log.dir)"
        )
    except UserError:  # the weights do not fit this model either
        other = "train this model as a new run, in a new checkpoint.dir (or log.dir)"
    raise UserError(
        f"checkpoint {reader.location} was saved with other model settings: {'; '.join(changes)}. "
        f"Resume with the checkpoint's values of these settings, or {other}"
    )


def check_tokenizer(reader: CheckpointReader, tokenizer: Path, embedded: bool = False) -> None:
    """Refuse a ``tokenizer`` file other than the one the checkpoint's run trained with (the sha256 its
    lineage records; a checkpoint without one, or with a lineage no save writes, is not checked).
    ``embedded``: this run trains on the embedded corpus, whose tokenizer is its own (built from this
    Python's standard library); where the checkpoint's run did too, the way on is that run's corpus, as
    the lineage records it (a run on data of its own: its tokenizer, as for any other resume)."""
    lineage = reader.meta.get("lineage")
    saved = lineage.get("tokenizer") if isinstance(lineage, dict) else None  # from a file: maybe no record
    if not isinstance(saved, dict) or "sha256" not in saved or saved["sha256"] == sha256_file(tokenizer):
        return
    was = saved.get("path")
    copy = f" (a copy: {reader.location}/tokenizer.model)" if "tokenizer.model" in reader.meta["files"] else ""
    run_data = (reader.meta.get("config") or {}).get("data") or {}
    run_embedded = embedded and not run_data.get("path") and not run_data.get("tokenizer")
    way = (run_embedded and run_corpus_way(lineage)) or f"data.tokenizer={was} and data tokenized with it"
    raise UserError(
        f"the tokenizer {tokenizer} is not the one checkpoint {reader.location} was trained with, {was}{copy}: "
        "the vocabulary size is the same, so every tensor fits, but each token id would stand for other text than "
        f"the model learned it for. Resume with {way}, or start a new run from these weights with "
        f"checkpoint.init_from={reader.location} and a new checkpoint.dir (or log.dir)"
    )


def check_rewind(cfg: Config, reader: CheckpointReader) -> None:
    """Refuse ``checkpoint.resume=<path>`` to a step before committed checkpoints in ``checkpoint.dir``
    (see the module docstring). Every rank lists the same shared directory: the same verdict."""
    c = cfg.checkpoint
    if c.resume in ("auto", "none"):
        return
    newer = [step_dir_name(s) for s in committed_steps(c.dir) if s > reader.step]
    if newer:
        shown = ", ".join(newer[:4]) + (f" and {len(newer) - 4} more" if len(newer) > 4 else "")
        raise UserError(
            f"checkpoint.resume={c.resume!r} rewinds to step {reader.step}, but checkpoint.dir={c.dir!r} holds "
            f"checkpoints of later steps ({shown}): this run would save over them, and a restart with "
            "checkpoint.resume=auto would continue from them instead of from this run; move them out of "
            "checkpoint.dir (they are the run being rewound), or choose a new checkpoint.dir (or log.dir)"
        )


def start_from(cfg: Config, rank: int, tokenizer: Path) -> tuple[CheckpointReader, dict | None] | None:
    """(checkpoint, single-device weights for a weights-only start or None) the trainer starts from,
    or None for a fresh run: this run's own checkpoint (``checkpoint.resume``, checked by
    :func:`check_resume` against this config and ``tokenizer``, and by :func:`check_rewind`), else
    ``checkpoint.init_from``'s weights. Collective: every rank reaches the same verdict."""
    c = cfg.checkpoint
    reader = resolve_resume(c.dir, c.resume)
    if reader is None and c.init_from:
        reader = find_checkpoint(c.init_from)
        check_init_from(cfg, reader)
        return reader, reader.model_state()
    if reader is None:
        return None
    check_resume(cfg, reader, rank, tokenizer)
    check_rewind(cfg, reader)
    if reader.weights_only:  # e.g. made by `convert from-hf`: a start from its weights
        record_weights_start(cfg, reader, rank)
        return reader, reader.model_state()
    keep_init_from(cfg, reader, rank)
    if rank == 0 and (note := other_run_note(cfg, reader)):
        log.warning("%s", note)
    return reader, None


def writer_log_dir(meta: dict) -> Path | None:
    """The ``log.dir`` of the run that saved a checkpoint (its metadata ``meta``), as its saved config
    names it, a relative one taken against the directory that run started in (its lineage's
    ``workdir``; this one where it records none); None where the saved config names none."""
    saved = ((meta.get("config") or {}).get("log") or {}).get("dir")
    if not isinstance(saved, str) or not saved:
        return None
    return Path(recorded_workdir(meta.get("lineage")) or os.getcwd()) / saved


def _saves_into(meta: dict, checkpoint_dir: str) -> bool:
    """Whether the run that saved a checkpoint (metadata ``meta``) saves into ``checkpoint_dir``: its saved
    ``checkpoint.dir`` (a relative one against the directory it started in, as :func:`writer_log_dir`) is
    that directory, or is not recorded. False for a run directory copied here, whose original saves in its own."""
    saved = ((meta.get("config") or {}).get("checkpoint") or {}).get("dir")
    if not isinstance(saved, str) or not saved:
        return True
    if is_url(saved) or is_url(checkpoint_dir):
        return saved.rstrip("/") == checkpoint_dir.rstrip("/")
    theirs = Path(recorded_workdir(meta.get("lineage")) or os.getcwd()) / saved
    return os.path.realpath(theirs) == os.path.realpath(checkpoint_dir)


def other_run(cfg: Config, meta: dict) -> Path | None:
    """The ``log.dir`` of the run that saved a checkpoint (metadata ``meta``) when it is not this run's
    (:func:`writer_log_dir`, both resolved), else None: this run's own, however its path is spelled,
    and that of a run directory moved (renamed) to this ``log.dir``: its log.dir is gone, and both runs'
    ``checkpoint.dir`` is their ``<log.dir>/checkpoints``, the checkpoints that moved with it."""
    theirs = writer_log_dir(meta)
    if theirs is None or os.path.realpath(theirs) == os.path.realpath(cfg.log.dir):
        return None
    saved = meta["config"].get("checkpoint")
    saved_dir = saved.get("dir") if isinstance(saved, dict) else None
    in_its_log_dir = saved_dir == str(Path(meta["config"]["log"]["dir"]) / "checkpoints")
    if "checkpoint.dir" in cfg.derived and in_its_log_dir and not theirs.exists():
        return None
    return theirs


def other_runs_checkpoints(cfg: Config, rank: int) -> list[str]:
    """The step directories in ``checkpoint.dir`` that this run's ``checkpoint.keep`` leaves alone (the
    ``Checkpointer``'s ``spared``: neither pruned nor counted), so that pruning deletes only what this run
    provably saved: those a run with another ``log.dir`` saved (:func:`other_run`), so a run continued
    from another's checkpoint deletes none of that run's, and those whose ``metadata.json`` proves nothing,
    being missing (never committed: a copy still arriving, or on an object store a save cut short,
    replaced when its step is saved again), unreadable, not valid JSON or not of the schema. Each of the
    latter is logged here, once a launch, naming it and why; a local directory and an object store are
    treated alike. Read on rank 0 only, which prunes (none elsewhere)."""
    if rank != 0:
        return []
    storage = Storage(cfg.checkpoint.dir)
    try:
        names = storage.step_dirs()
    except Exception:  # nothing listed, nothing pruned: the save reports the directory
        return []
    spared = []
    for name in names:
        meta, problem = _metadata(storage, name)
        if meta is None:
            log.warning(
                "checkpoint.keep leaves %s alone (%s): nothing in it shows that this run saved it; delete it "
                "yourself if no run needs it",
                storage.url(name),
                problem,
            )
        if meta is None or other_run(cfg, meta) is not None:
            spared.append(name)
    return spared


def _metadata(storage: Storage, name: str) -> tuple[dict | None, str | None]:
    """:func:`read_metadata`, an object store client's own error being a problem too (a local OSError is one)."""
    try:
        return read_metadata(storage, name)
    except Exception as e:
        return None, f"{METADATA} cannot be read: {type(e).__name__}: {e}"


def other_run_note(cfg: Config, reader: CheckpointReader) -> str | None:
    """The warning for a resume from a checkpoint in ``checkpoint.dir`` that a run with another
    ``log.dir`` saved (:func:`other_run`): this run continues that run's step and saves among its
    checkpoints (a variant started from a config that names that run's ``checkpoint.dir``); None for
    a run's own checkpoint (a relaunch, a requeue) or one resumed by path from elsewhere. Not refused:
    continuing a finished run under a new ``log.dir`` is a way to train it on (Megatron's ``--load`` and
    ``--save`` in one directory), nothing of that run is deleted (:func:`other_runs_checkpoints`), and
    a run still holding the directory is refused by its lock (``run_lock.py``). Both ``log.dir`` are
    shown as :func:`other_run` compares them, resolved and absolute, so that they read side by side."""
    c, theirs = cfg.checkpoint, other_run(cfg, reader.meta)
    if theirs is None:
        return None
    if c.resume != "auto" and not _same_start(c.dir, reader.location):
        return None  # saved elsewhere: this run's checkpoints do not go among that run's
    fresh = "checkpoint.dir=DIR (an empty or new directory)"
    if "checkpoint.dir" not in cfg.derived:  # set, not <log.dir>/checkpoints: unsetting it is the way back
        fresh += f", or checkpoint.dir=null for this log.dir's own ({Path(cfg.log.dir) / 'checkpoints'})"
    relaunch = (
        "a relaunch of that run then resumes from this one's"
        if _saves_into(reader.meta, c.dir)
        else "that run saves in its own checkpoint.dir, from which these were copied"
    )
    return (
        f"checkpoint.dir={c.dir!r} holds the checkpoints of another run (log.dir {theirs.resolve()}): this run "
        f"(log.dir {Path(cfg.log.dir).resolve()}) resumes from its step {reader.step} and saves its checkpoints "
        f"there too, next to that run's, which checkpoint.keep={c.keep} leaves alone (it prunes this run's only); "
        f"{relaunch}. To start fresh instead, add to the train command {fresh}"
    )


def record_weights_start(cfg: Config, reader: CheckpointReader, rank: int) -> None:
    """A run that ``checkpoint.resume`` starts from a weights-only checkpoint starts from its weights as
    ``checkpoint.init_from`` would: this run's config records that checkpoint as its
    ``checkpoint.init_from``, so its checkpoints and ``config.yaml`` name where the weights come from;
    rank 0 warns when this run names another ``checkpoint.init_from``, which is not loaded."""
    now, source = cfg.checkpoint.init_from, reader.location
    cfg.checkpoint.init_from = source
    if _same_start(now, source):
        return
    if rank == 0:
        log.warning(
            "checkpoint.init_from=%r is not loaded: this run starts from %s (checkpoint.resume=%r), a weights-only "
            "checkpoint, and its checkpoints record that as checkpoint.init_from; to start from %r instead, "
            "set checkpoint.resume=none",
            now,
            source,
            cfg.checkpoint.resume,
            now,
        )


def _same_start(given: str | None, start: str | None) -> bool:
    """``given`` (this run's ``checkpoint.init_from``) names the checkpoint ``start`` the run's weights
    come from: unset, the same text, or a local path to that step directory or to its root."""
    if given is None or given == start:
        return True
    if not start or is_url(given) or is_url(start):
        return False
    return Path(given).resolve() in (Path(start).resolve(), Path(start).resolve().parent)


def check_init_from(cfg: Config, reader: CheckpointReader) -> None:
    """Refuse ``checkpoint.init_from`` weights that do not fit this model: a tensor missing, extra
    or of another shape, checked against the whole single-device model (the same verdict in every
    layout: a pipeline stage alone cannot tell that the checkpoint has layers past its own), naming
    the model settings that differ from the checkpoint's as the fix."""
    shown = shape_problems(cfg.model, reader, ("model",))
    if shown is None:
        return
    saved = reader.meta.get("config") or {}
    changes = model_changes(saved, cfg) if saved.get("model") else []
    fix = (
        f"its model settings differ: {'; '.join(changes)}. Set them as the checkpoint has them"
        if changes
        else "set model.* to the model it holds"
    )
    raise UserError(
        f"checkpoint.init_from={cfg.checkpoint.init_from!r}: the weights in {reader.location} do not fit this "
        f"model ({shown}); {fix}, or drop checkpoint.init_from to train this model from scratch"
    )


def keep_init_from(cfg: Config, reader: CheckpointReader, rank: int) -> None:
    """A resumed run continues its own checkpoint's weights and never reads ``checkpoint.init_from``:
    this run's config takes back the ``checkpoint.init_from`` the checkpoint's run started from, so
    its checkpoints and ``config.yaml`` keep naming where the weights come from; rank 0 warns when
    this run names another one (Megatron's ``--load`` likewise wins over ``--pretrained-checkpoint``)."""
    saved = (reader.meta.get("config") or {}).get("checkpoint", {})
    if "init_from" not in saved:
        return
    before, now = saved["init_from"], cfg.checkpoint.init_from
    cfg.checkpoint.init_from = before
    if _same_start(now, before):
        return
    if rank == 0:
        origin = f"checkpoint.init_from={before!r}" if before else "a random initialisation (no checkpoint.init_from)"
        log.warning(
            "checkpoint.init_from=%r is not loaded: this run resumes from its own checkpoint %s at step %d, "
            "whose weights started from %s, and its checkpoints keep recording that start; to train from %r "
            "instead, start a new run with a new log.dir (or checkpoint.dir)",
            now,
            reader.location,
            reader.step,
            origin,
            now,
        )


def read_rng(reader: CheckpointReader, rank: int, world: int, p: ParallelConfig) -> dict[str, torch.Tensor] | None:
    """This rank's saved RNG states when the layout is the checkpoint's (then rank r is rank r
    again), else None: another layout's rank r held other work."""
    saved = reader.meta["layout"]
    now = {"world_size": world, "tp": p.tp, "pp": p.pp, "dp": p.dp}
    if not all(saved.get(k) == v for k, v in now.items()):
        return None
    return {key: reader.rank_tensor(rank, key) for key in reader.meta["ranks"][rank]["rng"]}


def set_rng(rng: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """Restore what :func:`read_rng` read (nothing for None)."""
    rng = rng or {}
    if "rng/torch" in rng:
        torch.set_rng_state(rng["rng/torch"])
    if "rng/cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["rng/cuda"], device)
