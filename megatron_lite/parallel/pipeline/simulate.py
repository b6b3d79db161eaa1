"""Time a schedule without processes: per-rank timeline, bubble, activations held, ASCII picture.

The timeline comes from :func:`schedules.replay`, i.e. the runtime's own blocking semantics, with
compute durations from :class:`Costs` and a fixed latency per transfer batch. Two bubble measures:

- ``bubble_fraction``: idle time / (ranks x makespan). 1F1B with equal per-microbatch costs gives
  (p-1)/(m+p-1) (Narayanan et al. 2021, eq. 1).
- ``bubble_ratio``: idle time / busy time, the "relative to ideal" measure. 1F1B: (p-1)/m;
  interleaved with v chunks, each 1/v of a stage's work: (p-1)/(v*m).

Activations held: a rank holds a microbatch's activations for a chunk from its forward until its
backward (B), or until its W for split backward (this runtime keeps the autograd graph alive
until W). ``peak_held`` is the most held at once, per rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from megatron_lite.parallel.pipeline.actions import Action, Op, Schedule
from megatron_lite.parallel.pipeline.replay import Event, replay


@dataclass(frozen=True)
class Costs:
    """Durations of one chunk's compute on one microbatch, and of one transfer batch.

    A full backward (B) costs ``backward_input + backward_weight``. For interleaved schedules give
    per-chunk costs (a chunk holds 1/vp of a rank's layers).
    """

    forward: float = 1.0
    backward_input: float = 1.0
    backward_weight: float = 1.0
    p2p: float = 0.0

    def of(self, op: Op) -> float:
        return {
            Op.F: self.forward,
            Op.B: self.backward_input + self.backward_weight,
            Op.I: self.backward_input,
            Op.W: self.backward_weight,
        }[op]


@dataclass(frozen=True)
class Simulation:
    """The timed replay of a schedule."""

    schedule: Schedule
    events: list[list[Event]]
    makespan: float
    busy: list[float]
    peak_held: list[int]

    @property
    def idle(self) -> list[float]:
        """Per rank: time not computing (waiting on transfers, or before start / after finish)."""
        return [self.makespan - b for b in self.busy]

    @property
    def bubble_fraction(self) -> float:
        """Idle time over all ranks / (ranks x makespan)."""
        return sum(self.idle) / (len(self.busy) * self.makespan) if self.makespan else 0.0

    @property
    def bubble_ratio(self) -> float:
        """Idle time / busy time over all ranks (the 'relative to ideal' measure)."""
        return sum(self.idle) / sum(self.busy) if sum(self.busy) else 0.0


def _peak_held(schedule: Schedule, events: list[Event]) -> int:
    held = peak = 0
    freeing = Op.W if schedule.split_backward else Op.B
    for e in events:
        kind = e.actions[0].kind
        if kind is Op.F:
            held += 1
            peak = max(peak, held)
        elif kind is freeing:
            held -= 1
    return peak


def simulate(
    schedule: Schedule,
    costs: Costs | Sequence[Costs] | Callable[[int, Action], float] = Costs(),
    p2p: float | None = None,
) -> Simulation:
    """Replay ``schedule`` with ``costs``: one :class:`Costs` for all ranks, one per rank, or a
    function giving each (rank, action)'s duration (e.g. durations measured by the runtime).

    ``p2p``: latency of one transfer batch; default ``costs.p2p`` (rank 0's), or 0 for a function.
    """
    if callable(costs):
        duration, latency = costs, p2p or 0.0
    else:
        per_rank = [costs] * schedule.pp if isinstance(costs, Costs) else list(costs)
        if len(per_rank) != schedule.pp:
            raise ValueError(f"got costs for {len(per_rank)} ranks, schedule has pp={schedule.pp}")

        def duration(rank: int, action: Action) -> float:
            return per_rank[rank].of(action.kind)

        # one latency for all ranks: a transfer's cost depends on the link, not on either end
        latency = per_rank[0].p2p if p2p is None else p2p
    events = replay(schedule, duration, latency)
    makespan = max((e.end for rank_events in events for e in rank_events), default=0.0)
    busy = [sum(e.end - e.start for e in rank_events if e.is_compute) for rank_events in events]
    peaks = [_peak_held(schedule, rank_events) for rank_events in events]
    return Simulation(schedule, events, makespan, busy, peaks)


def theory_bubble_ratio(pp: int, vp: int, microbatches: int) -> float:
    """Idle / busy of (interleaved) 1F1B with equal costs and free transfers: (p-1)/(v*m) when p
    divides m (Narayanan et al. 2021). With v > 1 the schedule runs whole groups of p microbatches
    (``schedules._one_f_one_b_slots``), so a last group of r < p leaves the ranks waiting where the
    p - r missing ones would run, (p - r)(v - 1)/v microbatches' time more: at r = 1, 1F1B's (p-1)/m."""
    short = microbatches % pp
    missing = (pp - short) * (vp - 1) if short else 0
    return (pp - 1 + missing) / (vp * microbatches)


_GLYPH = {Op.F: "F", Op.B: "B", Op.I: "b", Op.W: "W"}


def render(sim: Simulation, width: int = 100) -> str:
    """ASCII timeline: one row per rank, time left to right, ``.`` idle.

    Each compute action is drawn as its letter (F forward, B backward, b backward-input,
    W backward-weight) followed by its microbatch number when it is wide enough.
    """
    scale = sim.makespan / width if sim.makespan else 1.0
    s = sim.schedule
    lines = [
        f"{s.name} pp={s.pp} vp={s.vp} microbatches={s.microbatches}: makespan {sim.makespan:.3g}, "
        f"bubble {sim.bubble_fraction:.1%} of time ({sim.bubble_ratio:.1%} of compute); "
        "F fwd, B bwd, b bwd-input, W bwd-weight, . idle"
    ]
    for rank, rank_events in enumerate(sim.events):
        row = ["."] * width
        for e in rank_events:
            if not e.is_compute:
                continue
            a = e.actions[0]
            lo, hi = round(e.start / scale), max(round(e.end / scale), round(e.start / scale) + 1)
            label = f"{_GLYPH[a.kind]}{a.mb}" + (f".{a.chunk}" if s.vp > 1 else "")
            label = label if len(label) <= hi - lo else _GLYPH[a.kind]
            for i in range(lo, min(hi, width)):
                row[i] = label[i - lo] if i - lo < len(label) else "-"
        lines.append(f"rank {rank:>2} |{''.join(row)}| held<={sim.peak_held[rank]}")
    return "\n".join(lines)
