"""The vocabulary of pipeline schedules: what one rank does at one step (:class:`Action`), and a
whole schedule (:class:`Schedule`: each rank's list of actions). Generators and the validator live
in ``schedules.py``, the blocking replay in ``replay.py``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Op(enum.Enum):
    """What an action does. I and W split B for zero-bubble schedules."""

    F = "F"  # forward
    B = "B"  # backward: input and weight gradients
    I = "I"  # noqa: E741  backward for the input gradient only (zero-bubble's "B")
    W = "W"  # backward for the weight gradients, deferred after I
    SEND_F = "SEND_F"  # send an activation to the next virtual stage
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"  # send an input gradient to the previous virtual stage
    RECV_B = "RECV_B"


COMPUTE = frozenset({Op.F, Op.B, Op.I, Op.W})
SENDS = frozenset({Op.SEND_F, Op.SEND_B})
COUNTERPART = {Op.SEND_F: Op.RECV_F, Op.SEND_B: Op.RECV_B}


FORWARD_ONLY = "forward-only"  # the name of an evaluation schedule: forwards and their transfers, no backward


class ScheduleError(ValueError):
    """A schedule that breaks a rule, cannot run, or would deadlock."""


@dataclass(frozen=True)
class Action:
    """One step of a rank: ``kind`` on microbatch ``mb`` of local chunk ``chunk``; ``peer`` is the
    other pipeline rank (pp-group rank) of a transfer."""

    kind: Op
    mb: int
    chunk: int
    peer: int | None = None

    def __str__(self) -> str:
        peer = "" if self.peer is None else ("->" if self.kind in SENDS else "<-") + str(self.peer)
        return f"{self.kind.value}{self.mb}.{self.chunk}{peer}"


@dataclass(frozen=True)
class Schedule:
    """Every rank's action list for one optimizer step of ``microbatches`` microbatches."""

    name: str
    pp: int
    vp: int
    microbatches: int
    actions: tuple[tuple[Action, ...], ...]

    def vstage(self, rank: int, chunk: int) -> int:
        """Virtual stage of ``chunk`` on ``rank``: its position in the model."""
        return chunk * self.pp + rank

    @property
    def forward_only(self) -> bool:
        """True for an evaluation schedule (``schedules.build_forward_schedule``): no backward."""
        return self.name == FORWARD_ONLY

    @property
    def split_backward(self) -> bool:
        """True when backward is split into I and W (zero-bubble)."""
        return any(a.kind is Op.W for a in self.actions[0])


def batch_end(actions: tuple[Action, ...], start: int) -> int:
    """End (exclusive) of the transfer batch starting at ``start``: the next compute action."""
    end = start
    while end < len(actions) and actions[end].kind not in COMPUTE:
        end += 1
    return end
