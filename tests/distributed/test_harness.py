"""The spawn harness itself: collectives work, and failures surface fast with the rank's traceback."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from harness import World, WorldError, run_world


def _all_reduce_rank(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _raise_on_rank1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom from rank 1")
    dist.all_reduce(torch.ones(1))  # rank 0 blocks here: its peer never joins


def _hang_on_rank0(rank: int, world_size: int) -> None:
    if rank == 0:
        time.sleep(600)


def test_all_reduce_world2(world2):
    assert world2.run(_all_reduce_rank) == [3.0, 3.0]


def test_run_world_one_shot():
    assert run_world(2, _all_reduce_rank, timeout=30) == [3.0, 3.0]


def test_failure_is_fast_and_carries_traceback_then_timeout_kills():
    world = World(2)
    world.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(WorldError, match=r"(?s)rank 1 raised:.*ValueError: boom from rank 1"):
            world.run(_raise_on_rank1, timeout=30)
        # far below the 60 s process-group timeout rank 0 was blocked on (margin for a loaded machine)
        assert time.monotonic() - t0 < 15.0
        assert not world.alive
        t0 = time.monotonic()
        with pytest.raises(WorldError, match=r"timed out: rank\(s\) \[0\]"):
            world.run(_hang_on_rank0, timeout=1.0)  # restarts the killed world first
        assert not world.alive
    finally:
        world.close()
