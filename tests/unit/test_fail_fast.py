"""The verdicts ranks agree on before joining the process group (``launcher/fail_fast.py``), with
every rank a thread of its own on one in-memory store: no world is started."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch.distributed as dist

from megatron_lite.errors import UserError
from megatron_lite.launcher.fail_fast import agree_before_joining, fail_fast_setup


def test_fail_fast_setup_in_one_process_passes_errors_through():
    with pytest.raises(ValueError, match="boom"), fail_fast_setup("setup"):
        raise ValueError("boom")
    with fail_fast_setup("setup"):
        pass


def test_verdicts_before_joining_are_per_torchrun_attempt(monkeypatch):
    """torchrun's agent store outlives a restart (--max-restarts): a restarted rank 0 read the last
    attempt's verdicts and went on to join while rank 1 had not even come."""
    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=1))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    ranks = [threading.Thread(target=agree_before_joining, args=(store, r, 2, None, False)) for r in (0, 1)]
    for t in ranks:
        t.start()
    for t in ranks:
        t.join()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(dist.DistStoreError):  # waits for rank 1's verdict of this attempt
        agree_before_joining(store, 0, 2, None, False)


def _verdicts_before_joining(world: int, failing: set[int]) -> list[str]:
    """Each rank's error message from ``agree_before_joining`` where the ranks in ``failing`` post a
    bad config key, every rank in a thread of its own on one store."""
    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=10))
    messages: list[str] = []

    def rank(r: int) -> None:
        error = UserError("unknown config key 'train.stepz'") if r in failing else None
        with pytest.raises(UserError) as raised:
            agree_before_joining(store, r, world, error, False)
        messages.append(str(raised.value))

    ranks = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in ranks:
        t.start()
    for t in ranks:
        t.join()
    assert len(messages) == world
    return messages


def test_a_verdict_names_the_other_failed_ranks_in_plain_words():
    """One other failed rank is 'rank 1', several are listed, and a large world's are counted past
    the eighth, so a bad config on 512 ranks is not a line of 511 numbers."""
    first = "rank 0 failed before joining the process group: unknown config key 'train.stepz'"
    assert set(_verdicts_before_joining(2, {0, 1})) == {f"{first} (rank 1 failed too)"}
    assert set(_verdicts_before_joining(3, {0, 2})) == {f"{first} (rank 2 failed too)"}
    assert set(_verdicts_before_joining(4, {0, 1, 3})) == {f"{first} (ranks 1, 3 failed too)"}
    assert set(_verdicts_before_joining(12, set(range(12)))) == {
        f"{first} (ranks 1, 2, 3, 4, 5, 6, 7, 8 and 3 more failed too)"
    }
    assert set(_verdicts_before_joining(2, {1})) == {
        "rank 1 failed before joining the process group: unknown config key 'train.stepz'"
    }
