"""The training loop's failure watch in a real gloo world (what a failure does to the other ranks,
which ends their processes, is in tests/e2e/test_fail_together.py): a failure of an earlier torchrun
attempt and a clean end trip nothing, a run that diverges on every rank still commits the async save
in flight, together, reporting no rank as the one that failed, and a preemption signal that reaches
one rank stops every rank at the same step with a checkpoint that resumes bitwise."""

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import torch.distributed as dist
from test_trainer_parity import corpus, overrides  # noqa: F401 (corpus is a fixture)

from megatron_lite.config import Config, load_config
from megatron_lite.errors import UserError
from megatron_lite.launcher.fail_fast import agree_on_config, fail_fast_setup
from megatron_lite.launcher.failure_watch import FailureWatch
from megatron_lite.training.fault import DivergenceError
from megatron_lite.training.trainer import Trainer

NEVER_S = 3600.0  # a watch that never looks: these ranks all fail together, none may stop another


@contextlib.contextmanager
def torchrun_attempt(n: str) -> Iterator[dist.PrefixStore]:
    """TORCHELASTIC_RESTART_COUNT=n for the block; yields the attempt's keys, removed afterwards (the
    world's store outlives the job, as torchrun's agent store outlives an attempt)."""
    before = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    os.environ["TORCHELASTIC_RESTART_COUNT"] = n
    keys = dist.PrefixStore(f"megatron_lite/loop/{n}", dist.distributed_c10d._get_default_store())
    try:
        yield keys
    finally:
        if before is None:
            del os.environ["TORCHELASTIC_RESTART_COUNT"]
        else:
            os.environ["TORCHELASTIC_RESTART_COUNT"] = before
        dist.barrier()
        if dist.get_rank() == 0:
            for key in ("failure", "readers", *(f"read/{r}" for r in range(dist.get_world_size()))):
                keys.delete_key(key)


def _watching() -> int:
    return sum(t.name == "megatron-lite-failure-watch" for t in threading.enumerate())


def _restart_after_a_failed_attempt(rank: int, world: int) -> dict:
    with torchrun_attempt("7"):
        error = UserError(f"rank {rank}'s data is bad")
        with contextlib.suppress(UserError), FailureWatch(poll_s=NEVER_S) as watch:
            watch.step = 5
            raise error
        told = error.told_every_rank  # every rank read a failure: this one prints its own at once
        with torchrun_attempt("8") as keys:  # the restart: attempt 7's failure stays in the store
            with FailureWatch(poll_s=0.05):
                during = _watching()
                time.sleep(0.5)  # ten looks at the store
                dist.barrier()
            return {"told": told, "during": during, "after": _watching(), "posted": keys.check(["failure"])}


def test_restart_and_clean_end_trip_nothing(world2):
    assert world2.run(_restart_after_a_failed_attempt) == [{"told": True, "during": 1, "after": 0, "posted": False}] * 2


def _collective_failing_after_a_peers_post(rank: int, world: int) -> dict:
    """Rank 1 fails and posts; rank 0's collective then fails as rank 1 leaves (gloo: "Connection
    closed by peer"). Rank 0 logged that as its own failure, and waited 15 s for readers."""
    with torchrun_attempt("gone") as keys, caught_logs() as logs:
        if rank == 1:
            error: Exception = UserError("rank 1's data is bad")
        else:
            keys.wait(["failure"])
            error = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:3498")
        start = time.monotonic()
        with contextlib.suppress(type(error)), FailureWatch(poll_s=NEVER_S) as watch:
            watch.step = 5
            raise error
        return {"logs": logs, "prompt": time.monotonic() - start < 5}


def test_a_collective_failing_for_a_peer_that_posted_reports_the_peers_failure(world2):
    rank0, rank1 = world2.run(_collective_failing_after_a_peers_post)
    assert rank1 == {"logs": ["rank 1 failed at step 5: rank 1's data is bad; stopping every rank"], "prompt": True}
    assert rank0["prompt"] and len(rank0["logs"]) == 1, rank0
    assert rank0["logs"][0].startswith("rank 1 failed at step 5: rank 1's data is bad; this rank's collective failed")


@contextlib.contextmanager
def caught_logs() -> Iterator[list[str]]:
    """The failure watch's log lines of the block."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("megatron_lite.launcher.failure_watch")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def _setup_verdict_inside_a_watch(rank: int, world: int) -> dict:
    """Every rank raises a fail_fast_setup verdict together: none is left waiting, so none posts
    (the others would stop each other with a second copy of the error)."""
    with torchrun_attempt("setup") as keys:
        watch = FailureWatch(poll_s=0.05, where="during setup")
        with pytest.raises(UserError) as error, watch, fail_fast_setup("loading the checkpoint"):
            if rank == 1:
                raise UserError("shard 1 is unreadable")
        dist.barrier()  # both ranks alive: no watch stopped a process
        return {"error": str(error.value), "posted": keys.check(["failure"])}


def test_a_verdict_every_rank_raises_in_a_watch_is_not_posted(world2):
    expected = {"error": "rank 1 failed during loading the checkpoint: shard 1 is unreadable", "posted": False}
    assert world2.run(_setup_verdict_inside_a_watch) == [expected] * 2


def _configs_that_differ(rank: int, world: int) -> list[str]:
    """Rank 1 given train.steps=5 where rank 0 has 8: unchecked, gloo aborts the process at the first
    collective that does not match (exit 134, a C++ trace) and NCCL hangs."""
    cfg = Config()
    agree_on_config(cfg.to_dict())  # the same on every rank: passes
    cfg.train.steps = 8 if rank == 0 else 5
    cfg.log.dir = "runs/a" if rank == 0 else "runs/b"
    with pytest.raises(UserError) as error:
        agree_on_config(cfg.to_dict())
    return [str(error.value)]


def test_ranks_with_different_configs_are_refused_on_every_rank_naming_the_keys(world2):
    messages = world2.run(_configs_that_differ)
    assert messages[0] == messages[1], messages
    assert messages[0][0] == (
        "the ranks resolved different configs: log.dir=runs/a on rank 0 but runs/b on rank 1, train.steps=8 on "
        "rank 0 but 5 on rank 1; give every rank the same config file and overrides"
    )


def _diverge_with_a_save_in_flight(rank: int, world: int, args: list[str], port: int) -> str:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    trainer = Trainer(load_config(None, args))
    trainer.skip_watch.limit = 1
    step = trainer.engine.step

    def step_3_not_finite(micro: list, lr: float) -> dict:
        out = step(micro, lr)
        return {**out, "loss": float("nan"), "skipped": True} if trainer.step == 2 else out

    trainer.engine.step = step_3_not_finite
    with torchrun_attempt("diverged") as keys:
        with pytest.raises(DivergenceError) as error:
            trainer.fit()
        return {"error": str(error.value), "posted": keys.check(["failure"])}


def test_divergence_on_every_rank_commits_the_async_save_in_flight(world2, corpus, tmp_path):  # noqa: F811
    """And it is no rank's failure: posted, each rank logged "rank R failed at step 3: training
    diverged ...; stopping every rank", then "(rank 0 failed at step 3 ... first)"."""
    args = [*overrides(*corpus, str(tmp_path / "run")), "train.steps=6", "checkpoint.every=2", "checkpoint.async=true"]
    outcomes = world2.run(_diverge_with_a_save_in_flight, args, 29503)
    assert outcomes[0] == outcomes[1] and not outcomes[0]["posted"], outcomes
    assert outcomes[0]["error"].startswith("training diverged: 1 steps in a row"), outcomes
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000002" and (ckpt / "step_00000002/metadata.json").exists()


def _preempt_one_rank_then_resume(rank: int, world: int, args: list[str], port: int) -> dict:
    """SIGTERM to rank 1 alone during step 3 (the save of step 2 may still be in flight), a relaunch
    to the end, and the uninterrupted run beside it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    log_dir = next(a for a in args if a.startswith("log.dir="))
    run = [a for a in args if not a.startswith(("log.dir=", "checkpoint.resume="))]
    straight = Trainer(load_config(None, [*run, f"{log_dir}/straight"])).fit()
    trainer = Trainer(load_config(None, [*run, f"{log_dir}/preempted"]))
    step = trainer.train_step

    def signalled_in_step_3() -> dict:
        out = step()
        if trainer.step == 3 and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler: stop after this step, saved
        return out

    trainer.train_step = signalled_in_step_3
    first = trainer.fit()
    resumed = Trainer(load_config(None, [*run, f"{log_dir}/preempted"])).fit()
    return {
        "stopped_at": trainer.step,
        "losses": [r["loss"] for r in first + resumed],
        "straight": [r["loss"] for r in straight],
    }


def test_a_signal_to_one_rank_stops_every_rank_with_a_checkpoint_that_resumes_bitwise(
    world2,
    corpus,  # noqa: F811
    tmp_path,
):
    args = [*overrides(*corpus, str(tmp_path)), "train.steps=6", "checkpoint.every=2", "checkpoint.async=true"]
    outcomes = world2.run(_preempt_one_rank_then_resume, args, 29504)
    for outcome in outcomes:
        assert outcome["stopped_at"] == 3 and outcome["losses"] == outcome["straight"], outcome
        assert len(outcome["straight"]) == 6, outcome
    ckpt = tmp_path / "preempted" / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000004", "step_00000006"]  # keep: 2
