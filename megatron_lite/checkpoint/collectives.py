"""Whole-world object collectives for checkpoint decisions, no-ops in a single process.

Checkpoint decisions (which checkpoint to resume, whether a save succeeded) must be the same on
every rank, so each is made from data every rank has received: a broadcast from rank 0 or an
all-gather. The payloads are small JSON-able Python objects (file names, checksums, messages)
exchanged between the ranks of this job; nothing read from a checkpoint is ever unpickled.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world()[1] == 1:
        return [obj]
    out: list[Any] = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank."""
    if world()[1] > 1:
        dist.barrier()
