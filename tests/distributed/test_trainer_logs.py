"""What a multi-rank run logs: the startup parameter count covers every chunk this rank holds
(interleaved pipeline, vp > 1), run-wide events (resumed, with which settings changed, preempted,
each launch's closing summary) are said once, by rank 0, and metrics.jsonl's samples, tokens/s and
MFU count the whole data-parallel batch."""

import itertools
import json
import logging
import os
import sysconfig
import types
from pathlib import Path

import pytest
from ports import free_port

from megatron_lite.config import load_config
from megatron_lite.data.corpus import prepare_default_corpus
from megatron_lite.training import metrics, trainer
from megatron_lite.training.trainer import Trainer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    files = [STDLIB / n for n in ("textwrap.py", "shlex.py")]
    return prepare_default_corpus(tmp_path_factory.mktemp("corpus"), 512, progress=False, files=files)


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _train_resume_preempt(rank: int, world: int, args: list[str], port: int) -> tuple[list[str], int]:
    """(this rank's trainer log, the parameters of all its chunks): train 2 steps, then resume and
    get preempted (only rank 1 is signalled) after step 3."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    logger, handler = logging.getLogger("megatron_lite.training.trainer"), _Messages()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        first = Trainer(load_config(None, [*args, "train.steps=2"]))
        first.fit()
        chunks = first.engine.chunks
        params = sum(p.numel() for p in {id(p): p for c in chunks for p in c.parameters()}.values())
        second = Trainer(load_config(None, [*args, "train.steps=6"]))
        second.preemption.requested = rank == 1
        second.fit()
        assert second.step == 3
    finally:
        logger.removeHandler(handler)
    return handler.messages, params


@pytest.fixture(scope="module")
def logs(world2, corpus, tmp_path_factory):
    prefix, tok = corpus
    args = [f"data.path={prefix}", f"data.tokenizer={tok}", "model.layers=4", "model.hidden=64", "model.heads=4"]
    args += ["model.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4", "optim.warmup=1"]
    args += ["parallel.pp=2", "parallel.vp=2", "parallel.schedule=interleaved", "log.progress=false"]
    args += ["data.valid_fraction=0", f"log.dir={tmp_path_factory.mktemp('logs') / 'run'}"]
    return world2.run(_train_resume_preempt, args, 29502)


def test_parameter_count_covers_every_chunk_of_the_rank(logs):
    (messages, params), _ = logs
    lines = [m for m in messages if m.startswith("model: ")]  # one per trainer: both count the same
    assert len(lines) == 2 and lines[0] == lines[1], lines
    assert lines[0].startswith(f"model: {params:,} parameters on this rank"), (lines[0], params)


def test_resume_and_preemption_are_logged_once_by_rank_zero(logs):
    (rank0, _), (rank1, _) = logs
    changed = "settings changed since the checkpoint (saved -> now): optim.decay_steps 1 -> 5; train.steps 2 -> 6"
    preempted = "stopped at step 3 on a preemption signal"
    for prefix in ("resumed from ", changed, preempted, "run summary: steps 3-3 of 6 (1 this launch) in "):
        assert sum(m.startswith(prefix) for m in rank0) == 1, rank0
        assert not any(m.startswith(prefix) for m in rank1), rank1
    # each launch's last line is its summary, the preempted one's right after saying why it stopped
    summaries = [i for i, m in enumerate(rank0) if m.startswith("run summary: ")]
    assert len(summaries) == 2 and rank0[summaries[1] - 1].startswith(preempted), rank0
    assert rank0[summaries[0]].startswith("run summary: steps 1-2 of 2 (2 this launch) in "), rank0
    # data.valid_fraction=0: each of the two trainers says once, on rank 0, that nothing is evaluated
    no_eval = "data.valid_fraction=0: no held-out split"
    assert sum(m.startswith(no_eval) for m in rank0) == 2 and not any(m.startswith(no_eval) for m in rank1)


PEAK, TICK = 1e12, 0.25  # the stand-in machine's CPU peak (FLOP/s) and clock step (s)


def _dp2_rows(rank: int, world: int, args: list[str], port: int, pinned: bool) -> tuple[list[dict], float]:
    """(rank 0's metrics.jsonl rows, FLOPs per token) of a dp=2 run stopped after step 2 and resumed, on
    a stand-in clock and CPU peak (that of the CPUs a rank may use), on one machine (LOCAL_WORLD_SIZE=2):
    its ranks sharing every CPU, as under torchrun, or ``pinned`` each to a CPU of its own, as srun's
    per-task cpusets bind them."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    clock = itertools.count()
    saved = trainer.time, metrics.cpu_peak_flops, os.sched_getaffinity(0)
    trainer.time = types.SimpleNamespace(perf_counter=lambda: TICK * next(clock))
    metrics.cpu_peak_flops = lambda: PEAK
    if pinned:
        assert len(saved[2]) >= world, f"per-task cpusets take a CPU per rank: {len(saved[2])} for {world} ranks"
        os.sched_setaffinity(0, {sorted(saved[2])[rank]})
    try:
        Trainer(load_config(None, [*args, "train.exit_after=2"])).fit()
        resumed = Trainer(load_config(None, args))
        resumed.fit()
    finally:
        trainer.time, metrics.cpu_peak_flops = saved[:2]
        os.sched_setaffinity(0, saved[2])
        del os.environ["LOCAL_WORLD_SIZE"]
    run = Path(resumed.cfg.log.dir)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []
    return rows, metrics.flops_per_token(resumed.cfg.model)


@pytest.mark.parametrize("pinned", [False, True], ids=["shared-cpus", "per-task-cpusets"])
def test_dp2_rows_count_the_global_batch_across_a_resume(world2, corpus, tmp_path, pinned):
    """MFU's CPU peak is each rank's share of the CPUs it may use, counted once: ranks that share them
    split it; ranks pinned to CPUs of their own (srun's per-task cpusets) each have its whole peak,
    which was halved again by the 2 ranks on the machine."""
    prefix, tok = corpus
    args = [f"data.path={prefix}", f"data.tokenizer={tok}", "model.layers=2", "model.hidden=64", "model.heads=4"]
    args += ["model.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=8", "train.steps=3"]
    args += ["log.every=1", "log.progress=false", "data.valid_fraction=0", f"log.dir={tmp_path / 'run'}"]
    (rows, fpt), _ = world2.run(_dp2_rows, args, free_port(), pinned)
    assert [(r["step"], r["consumed_samples"]) for r in rows] == [(1, 8), (2, 16), (3, 24)]  # 2 ranks x 2 x 2
    rank_peak = PEAK if pinned else PEAK / 2  # the peak of its own CPU; half the peak of the CPUs both use
    for r in rows:
        assert r["tokens_per_s"] == 8 * 32 / TICK  # the global batch's tokens a step, not one rank's
        assert r["mfu"] == r["tokens_per_s"] * fpt / (rank_peak * 2)  # one rank's peak, times 2 ranks
