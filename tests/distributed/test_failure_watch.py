"""The training loop's failure watch in a real gloo world (what a failure does to the other ranks,
which ends their processes, is in tests/e2e/test_fail_together.py): a failure of an earlier torchrun
attempt and a clean end trip nothing."""

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import torch.distributed as dist

from megatron_lite.errors import UserError
from megatron_lite.launcher.fail_fast import FailureWatch

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
            for key in ("failure", *(f"read/{r}" for r in range(dist.get_world_size()))):
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
