"""Checks the trainer runs at startup, before the data is built or any step is taken.

Each one turns a mistake that would otherwise surface late (a traceback at the first save, after
all the training; a crash at the first step) into one :class:`UserError` naming the config key,
the value and the fix. They touch only the local filesystem or the checkpoint listing and have no
collectives inside, so the trainer runs them in a ``fail_fast_setup`` block: on rank 0 ``log.dir``
(only it writes there), the fresh-start check and the checks of the checkpoint a run on the embedded
corpus starts from (its metadata alone, before the corpus is built); the kernel and
``checkpoint.dir`` checks on every rank (each rank writes its own file into every checkpoint, and on
several machines without a shared filesystem only that machine's ranks can tell whether the
directory is writable there).
:func:`check_shared_checkpoint_dir` is the exception: a collective, it checks that all ranks see
one directory.

Before these, rank 0 has locked ``log.dir`` and ``checkpoint.dir`` for the whole run
(``run_lock.py``): a second run into them is refused before it reads or writes anything there.

Rank 0 also logs :func:`setup_warnings`: valid settings that are probably mistakes (``optim.warmup``
longer than the run, a learning-rate decay that ends before it, a model ``convert to-hf`` will
refuse, a run that reads its training data more than once, an evaluation longer than the held-out
split, a peak memory estimate above the device's), each naming the key and the fix.

An object-store ``checkpoint.dir`` (``s3://...``) gets the same probe: one small object written
and deleted (a missing bucket, wrong credentials or an unreachable endpoint fail here, not at
the first save hours later).
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import socket
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_lite import kernels
from megatron_lite.checkpoint.lineage import recorded_datasets, run_corpus_way
from megatron_lite.checkpoint.reader import CheckpointReader, committed_steps, peek_checkpoint
from megatron_lite.checkpoint.storage import Storage, is_url
from megatron_lite.config import Config, config_warnings, fill_defaults
from megatron_lite.data.corpus import locate_default_corpus
from megatron_lite.data.gpt_dataset import GPTDataset
from megatron_lite.errors import UserError
from megatron_lite.launcher.fail_fast import fail_fast_setup
from megatron_lite.training import resume
from megatron_lite.training.build import resolve_dtype
from megatron_lite.training.trackers import DROPPED_FILE, METRICS_FILE

LOG_DIR_FILES = ("config.yaml", METRICS_FILE, DROPPED_FILE)  # what a run writes in log.dir
SHARED_WAIT_S = 5.0  # how long a rank waits to see rank 0's file in a shared checkpoint.dir


def probe_dir(key: str, path: str | Path) -> None:
    """Create directory ``path`` (with its parents) and write and remove a file in it; a
    :class:`UserError` naming ``key``, the path and the OS's reason when that fails."""
    where = Path(path)
    probe = where / f".megatron-lite-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or str(e)
        culprit = f" ({e.filename})" if e.filename and str(e.filename) != str(probe) else ""
        if isinstance(e, FileExistsError):
            reason = "it exists and is not a directory"
        raise UserError(
            f"{key}={str(path)!r} is not a writable directory: {reason}{culprit}; choose a directory "
            "this process can create and write to"
        ) from None


def check_log_dir(cfg: Config) -> None:
    """``log.dir`` exists (created here) and is writable (rank 0's: no other rank writes there), and
    none of the files a run writes there is a directory (or anything else but a file)."""
    probe_dir("log.dir", cfg.log.dir)
    for name in LOG_DIR_FILES:
        path = Path(cfg.log.dir) / name
        if path.exists() and not path.is_file():
            raise UserError(
                f"log.dir={cfg.log.dir!r} holds {str(path)!r}, which is not a file, where the run writes its "
                f"{name}: move it out of the way, or choose another log.dir"
            )


def check_checkpoint_dir(cfg: Config, world_size: int = 1) -> None:
    """``checkpoint.dir`` exists (created here when local) and this process can write to it. Every
    rank runs it: a directory that one machine cannot write would otherwise fail the first save."""
    ckpt = str(cfg.checkpoint.dir)
    if not is_url(ckpt):
        try:
            probe_dir("checkpoint.dir", ckpt.removeprefix("file://"))
        except UserError as e:
            if world_size == 1:
                raise
            raise UserError(
                f"{e} (every rank writes its own file there: on several machines it must be a shared "
                "filesystem or an object store)"
            ) from None
        return
    store, probe = Storage(ckpt), f".megatron-lite-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        store.write_text(probe, "probe")
        store.remove(probe)
    except Exception as e:  # the client's own errors: no such bucket, access denied, no endpoint, ...
        raise UserError(
            f"checkpoint.dir={ckpt!r} is not writable: {type(e).__name__}: {e}; check the bucket, the "
            "credentials and the endpoint (AWS_ENDPOINT_URL)"
        ) from None


def _appears(marker: Path, token: str) -> bool:
    """Whether ``marker`` holds ``token`` within ``SHARED_WAIT_S`` (a network filesystem may show
    another machine's new file a moment late)."""
    deadline = time.monotonic() + SHARED_WAIT_S
    while True:
        with contextlib.suppress(OSError):
            if marker.read_text() == token:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


def check_shared_checkpoint_dir(cfg: Config, rank: int, world_size: int) -> None:
    """Collective: every rank sees the same local ``checkpoint.dir``. Each rank writes its own shard
    there and rank 0 commits the checkpoint, so a directory that is local to each machine (not a
    shared filesystem) would make every multi-node save fail, or commit shards rank 0 cannot see.
    Rank 0 writes a file with a fresh token; every rank then reads it back."""
    ckpt = str(cfg.checkpoint.dir)
    if world_size == 1 or is_url(ckpt):
        return
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = Path(ckpt.removeprefix("file://")) / f".megatron-lite-shared-{token[0][:12]}"
    with fail_fast_setup("checking that checkpoint.dir is shared"):
        if rank == 0:
            marker.write_text(token[0])
    try:
        with fail_fast_setup("checking that checkpoint.dir is shared"):
            if not _appears(marker, token[0]):
                raise UserError(
                    f"checkpoint.dir={ckpt!r} is not the same directory on every machine: rank {rank} (host "
                    f"{socket.gethostname()}) does not see the file rank 0 wrote there; every rank writes its "
                    "shard of each checkpoint there, so use a filesystem all machines share (or an s3:// "
                    "checkpoint.dir)"
                )
    finally:
        if rank == 0:
            marker.unlink(missing_ok=True)


def memory_warning(cfg: Config, world_size: int, device: torch.device, local_world_size: int = 1) -> str | None:
    """A warning when ``megatron-lite plan``'s peak estimate for one rank exceeds what this rank has
    (the GPU's memory, or the machine's RAM shared by its local ranks), else None. Only a warning:
    the estimate can err, but an out-of-memory kill (the kernel's OOM killer on CPU) says nothing."""
    from megatron_lite.plan import make_plan, over_memory  # the planner imports the model: only when asked

    planned = copy.deepcopy(cfg)
    if planned.train.dtype == "auto":  # plan takes auto as a GPU's bf16; this run's is its device's (fp32 on CPU)
        planned.train.dtype = "bf16" if resolve_dtype("auto", device) == torch.bfloat16 else "fp32"
    try:
        need = make_plan(planned, world_size).memory_bytes_per_rank
    except UserError:  # a layout plan cannot model (the trainer checked it already): no estimate, no warning
        return None
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, f"{device} holds"
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local_world_size)
        where = f"this machine's RAM is, per local rank ({local_world_size}),"
    return over_memory(need, have, where)


def eval_warning(cfg: Config, valid: GPTDataset | None) -> str | None:
    """A warning when one evaluation reads more samples than the held-out split serves before it
    repeats one (``GPTDataset.distinct_samples``: in a blend, the dataset that runs out first for its
    weight sets it): it would only repeat them, ``train.eval_iters / needed`` times slower; else None."""
    t = cfg.train
    if valid is None:
        return None
    held, wanted = valid.distinct_samples, t.eval_iters * t.global_batch_size
    if wanted <= held:
        return None
    if held < t.global_batch_size:  # no train.eval_iters helps: one batch already repeats samples
        fix = (
            f"one evaluation batch of {t.global_batch_size} holds the same sample more than once; raise "
            "data.valid_fraction (or give the dataset more documents)"
        )
    else:
        fix = f"set train.eval_iters to at most {held // t.global_batch_size:,} (or raise data.valid_fraction)"
    return (
        f"train.eval_iters={t.eval_iters:,} x train.global_batch_size={t.global_batch_size} = {wanted:,} samples "
        f"per evaluation, but the held-out split serves {held:,} before it repeats one: each evaluation would read "
        f"{wanted / max(held, 1):,.1f} times that many, repeating samples; {fix}"
    )


def repeat_warning(cfg: Config, train: GPTDataset) -> str | None:
    """A warning when the run reads more training samples (``train.steps`` global batches, from step
    0) than the training split serves before it repeats one (``GPTDataset.first_repeat``): it trains
    on a dataset more than once (epochs, each in a new order), or, past one global batch, on the same
    sample more than once in one step; else None. Several epochs may be meant, so it only warns."""
    t = cfg.train
    held, prefix = train.first_repeat
    wanted = t.steps * t.global_batch_size
    if wanted <= held:
        return None
    first = " (the first of data.path to run out, for its weight)" if len(train.prefixes) > 1 else ""
    if t.global_batch_size > held:
        why = f"; one global batch of {t.global_batch_size} holds the same sample more than once"
        fix = f"a train.global_batch_size of at most {held:,}"
    else:
        why, fix = "", f"at most train.steps={held // t.global_batch_size:,} (one epoch)"
    return (
        f"train.steps={t.steps:,} x train.global_batch_size={t.global_batch_size} = {wanted:,} training samples, "
        f"but the training split serves {held:,} before it repeats one: the run reads dataset {prefix}{first} "
        f"{wanted / held:,.1f} times over (epochs, each in a new order){why}; if that is not meant, give more data "
        f"(data.path) or {fix}"
    )


def setup_warnings(
    cfg: Config, world_size: int, device: torch.device, local: int, train: GPTDataset, valid: GPTDataset | None
) -> list[str]:
    """Every startup warning rank 0 logs: settings that are probably mistakes, training data read more
    than once, evaluation, memory."""
    found = [
        *config_warnings(cfg),
        repeat_warning(cfg, train),
        eval_warning(cfg, valid),
        memory_warning(cfg, world_size, device, local),
    ]
    return [w for w in found if w]


def check_fresh_start(cfg: Config) -> None:
    """``checkpoint.resume=none`` must not save over another run's committed checkpoints."""
    c = cfg.checkpoint
    if c.resume != "none":
        return
    try:
        steps = committed_steps(c.dir)
    except Exception as e:  # an unreachable object store, missing credentials, ...
        raise UserError(f"checkpoint.dir={c.dir!r} cannot be listed: {type(e).__name__}: {e}") from None
    if steps:
        raise UserError(
            f"checkpoint.dir={c.dir!r} already holds checkpoints of an earlier run (newest: step {steps[-1]}) and "
            "checkpoint.resume=none would save over them; set checkpoint.resume=auto to continue that run, "
            "or choose a new checkpoint.dir (or log.dir) to start a fresh one"
        )


def _resumed(cfg: Config) -> tuple[str, str] | None:
    """(key, path) of the run's own checkpoint the trainer will resume: ``checkpoint.resume`` when it
    is a path, else ``checkpoint.dir`` when ``resume=auto`` finds a checkpoint there; None otherwise."""
    c = cfg.checkpoint
    if c.resume not in ("auto", "none"):
        return "checkpoint.resume", c.resume
    if c.resume == "auto" and peek_checkpoint(c.dir) is not None:
        return "checkpoint.dir", c.dir
    return None


def check_start_tokenizer(cfg: Config) -> None:
    """A run on the embedded corpus (empty ``data.path``) must not start from weights that carry no
    tokenizer, such as a ``convert from-hf`` import of a byte-level BPE model (GPT-2, Llama 3): the
    corpus's ids are megatron-lite's own tokenizer's and mean nothing to that model's vocabulary.
    The start is what the trainer will load: the run's own checkpoint (:func:`_resumed`: the run's
    own checkpoints come first), else ``checkpoint.init_from``."""
    if cfg.data.path:
        return
    key, start = _resumed(cfg) or ("checkpoint.init_from", cfg.checkpoint.init_from)
    if not start:
        return
    reader = peek_checkpoint(start)
    if reader is not None and "tokenizer.model" not in reader.meta["files"]:
        raise UserError(
            f"{key}={start!r} holds weights that carry no tokenizer megatron-lite can use (an import of a "
            "byte-level BPE model such as GPT-2 or Llama 3), and data.path is empty: this run would train them "
            "on the embedded corpus, whose token ids mean nothing to their vocabulary; set data.path and "
            "data.tokenizer to datasets tokenized with the model's own tokenizer"
        )


def check_start_vocab(cfg: Config) -> None:
    """A resume on the embedded corpus with its own tokenizer (empty ``data.path`` and ``data.tokenizer``)
    and another ``data.vocab_size`` than its checkpoint's is refused here, with the message the resume
    check gives (:func:`resume.check_model_settings`), before a corpus for the new vocabulary is built
    (minutes). That tokenizer holds exactly ``data.vocab_size`` pieces (sentencepiece's hard vocabulary
    limit), so the model settings resolve here as the trainer resolves them once the corpus is open.
    Then the corpus itself: :func:`check_start_corpus`."""
    d = cfg.data
    resumed = None if d.path or d.tokenizer else _resumed(cfg)
    reader = peek_checkpoint(resumed[1]) if resumed else None
    if reader is None or reader.weights_only:  # a weights-only start is checked as checkpoint.init_from is
        return
    saved, now = reader.meta.get("config") or {}, fill_defaults(copy.deepcopy(cfg), vocab_size=d.vocab_size)
    if "model" in saved and resume.corpus_vocab_change(saved, now):
        resume.check_model_settings(now, reader)
    check_start_corpus(cfg, reader)


def check_start_corpus(cfg: Config, reader: CheckpointReader) -> None:
    """A resume of ``reader`` (a full checkpoint) on the embedded corpus that this Python would not give
    the run's tokenizer is refused here, before the corpus is built (minutes on the standard library)
    and the resume's tokenizer check (:func:`resume.check_tokenizer`) refuses it. Built here for this
    Python's standard library (``corpus.locate_default_corpus``), the corpus's tokenizer is checked
    as that check will; not built yet, the run's corpus is another one when the lineage records another
    Python and names another folder than this Python builds (the name holds a hash of the standard
    library's files: a patch release with the same files builds the same corpus). The refusal names
    both Pythons and the run's own corpus as the way on (``lineage.run_corpus_way``)."""
    lineage, data = reader.meta.get("lineage"), (reader.meta.get("config") or {}).get("data") or {}
    saved = lineage.get("tokenizer") if isinstance(lineage, dict) else None  # from a file: maybe no record
    if not isinstance(saved, dict) or "sha256" not in saved or data.get("path") or data.get("tokenizer"):
        return  # no record to check, or the run trained on data of its own: the resume checks judge it
    folder, ready = locate_default_corpus(cfg.data.cache_dir, cfg.data.vocab_size)
    if ready:
        resume.check_tokenizer(reader, folder / "tokenizer.model", embedded=True)
        return
    ran, now, way = lineage.get("python"), platform.python_version(), run_corpus_way(lineage)
    if (
        not ran
        or ran == now
        or way is None
        or Path(str(recorded_datasets(lineage)[0].get("prefix"))).parent.name == folder.name
    ):
        return  # this Python's build is the run's corpus, as far as the lineage tells
    raise UserError(
        f"checkpoint {reader.location}'s run trained on the embedded corpus built by Python {ran}; this Python, "
        f"{now}, would build it from another standard library (into {folder}) with another tokenizer, so each token "
        f"id would stand for other text than the model learned it for. Resume with {way}, or start a new run from "
        f"these weights with checkpoint.init_from={reader.location} and a new checkpoint.dir (or log.dir)"
    )


def check_kernels(backend: str, device: torch.device) -> None:
    """``kernels.backend=triton`` needs Triton and somewhere to run its kernels."""
    if backend != "triton":
        return
    problem = kernels.triton_problem(device)
    if problem:
        raise UserError(f"kernels.backend=triton {problem}; use kernels.backend=auto")


def kernel_report(device: torch.device) -> str:
    """One line per op: what runs on ``device`` and why (for the startup log)."""
    return "\n".join(f"  {op:<18} {how}" for op, how in kernels.describe(device).items())
