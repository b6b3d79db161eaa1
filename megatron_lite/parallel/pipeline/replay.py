"""Execute every rank's action list under the runtime's blocking semantics, without processes.

Semantics (``schedules.py`` explains why): a maximal run of consecutive transfers is one batch,
posted together and waited together; an op completes once its counterpart is posted; messages
from rank a to rank b match in FIFO order across kinds. :func:`replay` proves a schedule
deadlock-free (or names each rank's stuck batch) and, given durations, times it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from megatron_lite.parallel.pipeline.actions import (
    COMPUTE,
    COUNTERPART,
    SENDS,
    Action,
    Op,
    Schedule,
    ScheduleError,
    batch_end,
)


@dataclass(frozen=True)
class Event:
    """One executed step of a rank: a compute action, or one batch of transfers (posted at
    ``start``, complete at ``end``)."""

    actions: tuple[Action, ...]
    start: float
    end: float

    @property
    def is_compute(self) -> bool:
        return self.actions[0].kind in COMPUTE


class _Channels:
    """Posted sends and receives per directed rank pair, matched in FIFO order."""

    def __init__(self, s: Schedule) -> None:
        self.s = s
        self.sends: dict[tuple[int, int], list[tuple[Action, float]]] = defaultdict(list)
        self.recvs: dict[tuple[int, int], list[tuple[Action, float]]] = defaultdict(list)

    def post(self, rank: int, batch: tuple[Action, ...], t: float) -> list[tuple[Action, tuple, int]]:
        posted = []
        for a in batch:
            is_send = a.kind in SENDS
            key = (rank, a.peer) if is_send else (a.peer, rank)
            queue = (self.sends if is_send else self.recvs)[key]
            posted.append((a, key, len(queue)))
            queue.append((a, t))
        return posted

    def completion(self, posted: list[tuple[Action, tuple, int]], latency: float) -> float | None:
        """When the posted batch completes, or None while a counterpart is not posted yet."""
        done = 0.0
        for a, key, idx in posted:
            is_send = a.kind in SENDS
            mine, other = (self.sends, self.recvs) if is_send else (self.recvs, self.sends)
            if len(other[key]) <= idx:
                return None
            self._check_pair(key, idx, *((a, other[key][idx][0]) if is_send else (other[key][idx][0], a)))
            done = max(done, mine[key][idx][1], other[key][idx][1])
        return done + latency

    def _check_pair(self, key: tuple[int, int], idx: int, send: Action, recv: Action) -> None:
        src, dst = key
        step = 1 if send.kind is Op.SEND_F else -1
        ok = (
            COUNTERPART[send.kind] is recv.kind
            and send.mb == recv.mb
            and self.s.vstage(src, send.chunk) + step == self.s.vstage(dst, recv.chunk)
        )
        if not ok:
            raise ScheduleError(
                f"message #{idx} from rank {src} to rank {dst} is sent as {send} but received as {recv}"
            )


def replay(
    s: Schedule, duration: Callable[[int, Action], float] | None = None, latency: float = 0.0
) -> list[list[Event]]:
    """Execute every rank's list under the blocking semantics; returns each rank's events.

    ``duration(rank, action)`` gives compute times (0 when None: just the order is checked);
    a transfer completes ``latency`` after both sides have posted. Raises :class:`ScheduleError`
    on a deadlock (no rank can move and some are unfinished) or a mismatched message.
    """
    pp = s.pp
    pc, clock = [0] * pp, [0.0] * pp
    waiting: list[tuple[list, float, int] | None] = [None] * pp  # (posted ops, post time, end pc)
    events: list[list[Event]] = [[] for _ in range(pp)]
    channels = _Channels(s)
    moved = True
    while moved:
        moved = False
        for r in range(pp):
            acts = s.actions[r]
            while pc[r] < len(acts):
                if waiting[r] is None:
                    if acts[pc[r]].kind in COMPUTE:
                        d = duration(r, acts[pc[r]]) if duration else 0.0
                        events[r].append(Event((acts[pc[r]],), clock[r], clock[r] + d))
                        clock[r] += d
                        pc[r] += 1
                        moved = True
                        continue
                    end = batch_end(acts, pc[r])
                    waiting[r] = (channels.post(r, acts[pc[r] : end], clock[r]), clock[r], end)
                    moved = True
                posted, t_post, end = waiting[r]
                done = channels.completion(posted, latency)
                if done is None:
                    break
                events[r].append(Event(acts[pc[r] : end], t_post, done))
                clock[r], pc[r], waiting[r] = done, end, None
                moved = True
    stuck = [r for r in range(pp) if pc[r] < len(s.actions[r])]
    if stuck:
        lines = [f"rank {r} blocked at [{', '.join(map(str, s.actions[r][pc[r] : waiting[r][2]]))}]" for r in stuck]
        raise ScheduleError(
            f"{s.name} pp={s.pp} vp={s.vp} microbatches={s.microbatches} deadlocks: " + "; ".join(lines)
        )
    return events
