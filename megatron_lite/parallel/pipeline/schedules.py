"""Pipeline schedules as data: for each pipeline rank, the ordered list of actions it runs.

A schedule is built in two steps: a generator orders each rank's compute actions (F forward,
B full backward, or zero-bubble's I backward-for-input then W backward-for-weights) into slots,
then :func:`_with_comm` puts one transfer batch between consecutive slots: the sends of what the
previous slot produced, the receives of what the next slot consumes. The runtime (``runtime.py``)
executes the lists as they are; the simulator (``simulate.py``) times them. The action types are
in ``actions.py``. Evaluation runs :func:`build_forward_schedule`: the same forwards and transfers,
no backward.

Virtual stage ``s = chunk * pp + rank`` (see ``partition.py``); activations flow s -> s+1, input
gradients s -> s-1, so with vp > 1 the last rank sends to rank 0 (the wrap-around).

Blocking semantics (shared by the runtime, ``replay.py`` and the validator):

- a maximal run of consecutive transfers is ONE batch: posted together (``batch_isend_irecv``)
  and waited together; each of its ops completes once its counterpart is posted (rendezvous, the
  strictest case: NCCL may block a send until the receive is posted);
- messages from rank a to rank b match in FIFO order across kinds (NCCL matches point-to-point
  ops per peer in issue order; no tags), so the k-th send a -> b must be the k-th receive at b from
  a, for the same kind, microbatch and adjacent virtual stage.

:func:`validate` checks the static rules (every (microbatch, chunk) forward and backward exactly
once, a forward-only schedule's forward alone, forward before backward, I before W, receive before
use, send after produce, right peers) and then :func:`replay` proves the schedule deadlock-free and
every send matched: a rank blocked forever is an error naming each rank's stuck batch.
"""

from __future__ import annotations

import functools

from megatron_lite.errors import UserError
from megatron_lite.parallel.pipeline.actions import FORWARD_ONLY, Action, Op, Schedule, ScheduleError
from megatron_lite.parallel.pipeline.replay import replay

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")


# ---- compute orders -----------------------------------------------------------------------------
# A generator returns each rank's compute as SLOTS: lists of compute actions that run back to back.
# Between two slots :func:`_with_comm` puts one batch: the sends of what the previous slot
# produced and the receives of what the next slot consumes.

Slots = list[list[Action]]


def forward_table(pp: int, vp: int, m: int) -> list[tuple[int, int]]:
    """(microbatch, chunk) order of forwards on every rank, depth-first like Megatron's interleaving.

    Microbatches go in groups of ``pp``; a group runs through chunk 0, then chunk 1, ... before the
    next group starts, so the wrap-around activation from the last rank arrives as it is needed.
    The last group is smaller when ``m % pp != 0``.
    """
    table = []
    for start in range(0, m, pp):
        table += [(mb, c) for c in range(vp) for mb in range(start, min(start + pp, m))]
    return table


def _gpipe_slots(pp: int, vp: int, m: int, rank: int) -> Slots:
    """All forwards, then all backwards (deepest chunk first); holds m * vp activations."""
    fwd = forward_table(pp, vp, m)
    # fill: every microbatch through every local chunk
    slots = [[Action(Op.F, mb, c)] for mb, c in fwd]
    # drain: backwards in the same order, chunks reversed
    slots += [[Action(Op.B, mb, vp - 1 - c)] for mb, c in fwd]
    return slots


def _one_f_one_b_slots(pp: int, vp: int, m: int, rank: int, split: bool) -> Slots:
    """1F1B (vp=1) or interleaved 1F1B (vp>1); with ``split`` each B becomes I, then W (zb-h1).

    vp=1 puts a batch after every compute (Megatron's 1F1B: send_forward_recv_backward, then
    send_backward_recv_forward). vp>1 pairs each steady-state forward with a backward in one slot
    and exchanges all four transfers in one batch between slots (Megatron's interleaved schedule):
    with a batch between the two, the wrap-around transfers would wait on each other in a cycle.
    For vp>1 and ``m % pp != 0`` the schedule is built for m rounded up to a multiple of pp and the
    actions of the phantom microbatches are dropped: every rank keeps the lockstep of full groups
    (a short or long group instead makes the wrap-around transfers wait in a cycle or serialise).

    zb-h1: W runs after the batch that sends I's input gradient, so the gradient leaves before W
    (W is off the critical path). In the steady state W opens the next forward's slot: that batch
    also receives the next forward's input, and the previous rank's matching batch (its activation
    send plus our gradient) must not wait for W. In the cooldown W gets its own slot and fills the
    wait for the next gradient (vp=1; with vp>1 it opens the next backward's slot, since a ring of
    lone wrap-around gradient sends deadlocks). W is not deferred further: this runtime frees a
    microbatch's activations only at W, and W before the next forward keeps 1F1B's count.
    """
    padded = m if vp == 1 else -(-m // pp) * pp
    fwd = forward_table(pp, vp, padded)
    bwd = [(mb, vp - 1 - c) for mb, c in fwd]  # backwards visit chunks in reverse
    total = len(fwd)
    # vp>1, Megatron's count: the round trip to the last rank and back (2 per later rank) plus one
    # group of pp microbatches per extra chunk, so rank r's first backward input has arrived.
    warmup = min(pp - rank - 1 if vp == 1 else (pp - rank - 1) * 2 + (vp - 1) * pp, total)

    def forward(k: int) -> list[Action]:
        return [Action(Op.F, *fwd[k])] if fwd[k][0] < m else []  # [] for a phantom microbatch

    def backward(k: int) -> tuple[list[Action], list[Action]]:
        """The k-th backward and the W it leaves pending: ([I], [W]) for zb-h1, else ([B], [])."""
        mb, c = bwd[k]
        if mb >= m:
            return [], []
        return ([Action(Op.I, mb, c)], [Action(Op.W, mb, c)]) if split else ([Action(Op.B, mb, c)], [])

    # warmup: forwards only, filling the pipeline
    slots = [forward(k) for k in range(warmup)]
    # steady state: one forward, one backward; activations held stay at warmup + 1
    w_prev: list[Action] = []
    for k in range(total - warmup):
        f = w_prev + forward(warmup + k)
        b, w_prev = backward(k)
        slots += [f, b] if vp == 1 else [f + b]
    # cooldown: the remaining backwards drain the pipeline
    for k in range(total - warmup, total):
        w = w_prev
        b, w_prev = backward(k)
        # vp>1: the ring of wrap-around gradient sends deadlocks if each waits alone before W
        slots += [w, b] if vp == 1 else [w + b]
    return [slot for slot in slots + [w_prev] if slot]


def _message_key(pp: int, rank: int, a: Action) -> tuple[int, int, int]:
    """Identity of the message an op sends or receives: (direction, microbatch, sender's vstage).

    Both ends compute the same key, so sorting a batch by it gives both ends the same order of
    messages on a shared rank pair (with pp=2 and vp>1 activations and gradients both go 1 -> 0).
    """
    v = a.chunk * pp + rank
    sender = {Op.SEND_F: v, Op.SEND_B: v, Op.RECV_F: v - 1, Op.RECV_B: v + 1}[a.kind]
    return (0 if a.kind in (Op.SEND_F, Op.RECV_F) else 1, a.mb, sender)


def _transfers(a: Action, rank: int, pp: int, vp: int) -> tuple[list[Action], list[Action]]:
    """(receives before, sends after) a compute action: activations flow s -> s+1, gradients back."""
    s, last, prev, nxt = a.chunk * pp + rank, pp * vp - 1, (rank - 1) % pp, (rank + 1) % pp
    recvs, sends = [], []
    if a.kind is Op.F:
        recvs += [Action(Op.RECV_F, a.mb, a.chunk, prev)] if s > 0 else []
        sends += [Action(Op.SEND_F, a.mb, a.chunk, nxt)] if s < last else []
    elif a.kind in (Op.B, Op.I):
        recvs += [Action(Op.RECV_B, a.mb, a.chunk, nxt)] if s < last else []
        sends += [Action(Op.SEND_B, a.mb, a.chunk, prev)] if s > 0 else []
    return recvs, sends


def _with_comm(pp: int, vp: int, slots_per_rank: list[Slots]) -> tuple[tuple[Action, ...], ...]:
    """Flatten slots, with one batch between slots: previous slot's sends, next slot's receives."""
    out = []
    for rank, slots in enumerate(slots_per_rank):
        actions: list[Action] = []
        sends: list[Action] = []
        for slot in slots:
            recvs = [r for a in slot for r in _transfers(a, rank, pp, vp)[0]]
            actions += sorted(sends + recvs, key=lambda op, r=rank: _message_key(pp, r, op)) + slot
            sends = [t for a in slot for t in _transfers(a, rank, pp, vp)[1]]
        out.append(tuple(actions + sorted(sends, key=lambda op, r=rank: _message_key(pp, r, op))))
    return tuple(out)


def build_schedule(name: str, pp: int, vp: int, microbatches: int) -> Schedule:
    """The validated schedule ``name`` (one of :data:`SCHEDULES`) for every pipeline rank.

    ``gpipe``: all forwards then all backwards (any vp). ``1f1b``: one-forward-one-backward
    (vp=1). ``interleaved``: 1F1B over vp virtual chunks per rank (vp=1 gives 1f1b exactly).
    ``zb-h1``: the 1F1B/interleaved order with each backward split into I then W; see
    :func:`_one_f_one_b_slots` and ``simulate.py`` for its bubble.
    """
    if name not in SCHEDULES:
        raise UserError(f"parallel.schedule={name!r} is not one of: {', '.join(SCHEDULES)}")
    _check_sizes(pp, vp, microbatches)
    if name == "1f1b" and vp > 1:
        raise UserError(
            f"parallel.schedule=1f1b runs one chunk per rank; set parallel.schedule=interleaved for "
            f"parallel.vp={vp}, or parallel.vp=1"
        )
    if name == "gpipe":
        slots = [_gpipe_slots(pp, vp, microbatches, r) for r in range(pp)]
    else:
        slots = [_one_f_one_b_slots(pp, vp, microbatches, r, name == "zb-h1") for r in range(pp)]
    schedule = Schedule(name, pp, vp, microbatches, _with_comm(pp, vp, slots))
    validate(schedule)
    return schedule


@functools.lru_cache(maxsize=16)  # each evaluation asks again: built and validated once per size
def build_forward_schedule(pp: int, vp: int, microbatches: int) -> Schedule:
    """The validated forward-only schedule (evaluation): every rank runs its forwards in
    :func:`forward_table`'s order, i.e. the fill of every training schedule, so microbatches follow
    each other through the pipeline; with vp > 1 a rank starts the next microbatches' first chunk
    while the wrap-around activation of the earlier ones is still on its way. (One microbatch at a
    time through every virtual stage would leave all ranks but one idle and take
    ``(vp - 1) * pp + 1`` chunk times per microbatch instead of ``vp``.)
    """
    _check_sizes(pp, vp, microbatches)
    slots = [[[Action(Op.F, mb, c)] for mb, c in forward_table(pp, vp, microbatches)] for _ in range(pp)]
    schedule = Schedule(FORWARD_ONLY, pp, vp, microbatches, _with_comm(pp, vp, slots))
    validate(schedule)
    return schedule


def _check_sizes(pp: int, vp: int, microbatches: int) -> None:
    if pp < 1 or vp < 1 or microbatches < 1:
        raise UserError(
            f"need parallel.pp, parallel.vp and microbatches (train.global_batch_size / (micro_batch_size x dp)) "
            f">= 1; got parallel.pp={pp}, parallel.vp={vp}, microbatches={microbatches}"
        )
    if pp == 1 and vp > 1:
        raise UserError(f"parallel.vp={vp} needs pipeline parallelism: set parallel.pp > 1 or parallel.vp=1")


# ---- validation --------------------------------------------------------------------------------


def _check_rank(s: Schedule, rank: int) -> None:
    """Static rules on one rank: exactly-once compute, order, and the transfers around it."""
    where: dict[tuple[Op, int, int], int] = {}
    for i, a in enumerate(s.actions[rank]):
        key = (a.kind, a.mb, a.chunk)
        if key in where:
            raise ScheduleError(f"rank {rank}: {a} appears twice (positions {where[key]} and {i})")
        where[key] = i
    last, split = s.pp * s.vp - 1, s.split_backward
    expected = {(a.kind, a.mb, a.chunk) for a in s.actions[rank]}
    for mb in range(s.microbatches):
        for c in range(s.vp):
            v = s.vstage(rank, c)
            bwd = [] if s.forward_only else [Op.I, Op.W] if split else [Op.B]
            need = [Op.F, *bwd] + ([Op.RECV_F] if v > 0 else []) + ([Op.SEND_F] if v < last else [])
            if bwd:
                need += ([Op.SEND_B] if v > 0 else []) + ([Op.RECV_B] if v < last else [])
            for op in need:
                if (op, mb, c) not in where:
                    raise ScheduleError(f"rank {rank}: missing {op.value} of microbatch {mb}, chunk {c}")
                expected.discard((op, mb, c))
            _check_order(s, rank, where, mb, c, bwd[0] if bwd else Op.B)
    if expected:
        raise ScheduleError(f"rank {rank}: unexpected actions {sorted(str(k) for k in expected)}")


def _check_order(s: Schedule, rank: int, where: dict, mb: int, c: int, bwd: Op) -> None:
    chain = [(Op.RECV_F, Op.F), (Op.F, Op.SEND_F), (Op.F, bwd), (Op.RECV_B, bwd), (bwd, Op.SEND_B), (Op.I, Op.W)]
    for before, after in chain:
        i, j = where.get((before, mb, c)), where.get((after, mb, c))
        if i is not None and j is not None and i > j:
            raise ScheduleError(f"rank {rank}: {before.value} must precede {after.value} (microbatch {mb}, chunk {c})")
    nxt, prev = (rank + 1) % s.pp, (rank - 1) % s.pp
    for op, peer in ((Op.SEND_F, nxt), (Op.RECV_B, nxt), (Op.RECV_F, prev), (Op.SEND_B, prev)):
        i = where.get((op, mb, c))
        if i is not None and s.actions[rank][i].peer != peer:
            raise ScheduleError(f"rank {rank}: {s.actions[rank][i]} has the wrong peer (expected {peer})")


def validate(s: Schedule) -> None:
    """Check the static rules on every rank, then :func:`replay` (deadlock and matching)."""
    if len(s.actions) != s.pp:
        raise ScheduleError(f"schedule has {len(s.actions)} rank lists for pp={s.pp}")
    for rank in range(s.pp):
        _check_rank(s, rank)
    replay(s)
