"""Schedules as data: every generator is valid and deadlock-free over (pp, vp, microbatches), and the
validator rejects broken schedules with a message naming the problem.

The full space (pp <= 16, vp <= 4, m <= 64, four schedules: ~15,000 schedules) validates in about
four minutes; this test takes every corner of it and a fixed random sample (~10 s on 2 cores).
"""

from __future__ import annotations

import random

import pytest

from megatron_lite.errors import UserError
from megatron_lite.parallel.pipeline.actions import COMPUTE, FORWARD_ONLY, Action, Op, Schedule, ScheduleError
from megatron_lite.parallel.pipeline.schedules import (
    SCHEDULES,
    build_forward_schedule,
    build_schedule,
    forward_table,
    validate,
)
from megatron_lite.parallel.pipeline.simulate import Costs, simulate


def _names(vp: int) -> list[str]:
    return [n for n in SCHEDULES if not (n == "1f1b" and vp > 1)]


def _space() -> list[tuple[int, int, int]]:
    corners = {
        (pp, vp, m)
        for pp in (1, 2, 3, 16)
        for vp in ((1,) if pp == 1 else (1, 2, 4))
        for m in (1, pp - 1, pp, pp + 1, 2 * pp - 1, 2 * pp, 2 * pp + 1, 63, 64)
        if 1 <= m <= 64
    }
    rng = random.Random(0)
    sample = set()
    while len(sample) < 40:
        pp = rng.randint(1, 16)
        sample.add((pp, 1 if pp == 1 else rng.randint(1, 4), rng.randint(1, 64)))
    return sorted(corners | sample)


def test_every_schedule_is_valid_over_the_space():
    space = _space()
    assert {(1, 1, 1), (16, 4, 64), (16, 4, 1), (2, 4, 3), (16, 1, 64)} <= set(space)
    for pp, vp, m in space:
        for name in _names(vp):
            s = build_schedule(name, pp, vp, m)  # validates: static rules + deadlock-free replay
            assert (s.pp, s.vp, s.microbatches) == (pp, vp, m)


def test_one_f_one_b_phases():
    s = build_schedule("1f1b", 4, 1, 8)
    for rank, actions in enumerate(s.actions):
        compute = [a for a in actions if a.kind in (Op.F, Op.B)]
        # warmup: pp - rank - 1 forwards, then strict alternation, then the cooldown's backwards
        warmup = 4 - rank - 1
        assert [a.kind for a in compute[: warmup + 1]] == [Op.F] * (warmup + 1)
        steady = compute[warmup : warmup + 2 * (8 - warmup)]
        assert [a.kind for a in steady] == [Op.F, Op.B] * (8 - warmup)
        assert [a.mb for a in compute if a.kind is Op.B] == list(range(8))


def test_zb_h1_runs_each_w_after_its_i_and_before_the_next_forward():
    s = build_schedule("zb-h1", 4, 1, 8)
    for actions in s.actions:
        compute = [a for a in actions if a.kind in (Op.F, Op.I, Op.W)]
        for i, a in enumerate(compute):
            if a.kind is Op.I:
                rest = compute[i + 1 :]
                w = rest.index(Action(Op.W, a.mb, a.chunk))
                assert all(b.kind is not Op.F for b in rest[:w]), "a forward before the pending W"


def test_interleaved_is_depth_first_in_groups_of_pp():
    assert forward_table(2, 2, 5) == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1), (4, 0), (4, 1)]
    s = build_schedule("interleaved", 2, 2, 4)
    rank0 = [(a.mb, a.chunk) for a in s.actions[0] if a.kind is Op.F]
    assert rank0 == forward_table(2, 2, 4)


def test_forward_schedule_runs_forwards_only_in_order_without_a_bubble_after_the_fill():
    """Evaluation's schedule over the space: valid (deadlock-free), each rank's forwards in
    forward_table's order, and, with unit forwards and free transfers, done in vp*m + pp - 1 (the
    fill, then no rank idle) whenever the groups of pp microbatches are full."""
    for pp, vp, m in _space():
        s = build_forward_schedule(pp, vp, m)  # validates
        for actions in s.actions:
            assert [(a.mb, a.chunk) for a in actions if a.kind in COMPUTE] == forward_table(pp, vp, m)
            assert {a.kind for a in actions} <= {Op.F, Op.SEND_F, Op.RECV_F}
        if m % pp == 0:
            assert simulate(s, Costs(forward=1.0)).makespan == vp * m + pp - 1, (pp, vp, m)


def test_interleaved_with_one_chunk_is_1f1b():
    assert build_schedule("interleaved", 4, 1, 6).actions == build_schedule("1f1b", 4, 1, 6).actions


@pytest.mark.parametrize(
    "args, message",
    [
        (("pipedream", 2, 1, 4), "^parallel.schedule='pipedream' is not one of: "),
        (("1f1b", 2, 2, 4), "^parallel.schedule=1f1b .*set parallel.schedule=interleaved for parallel.vp=2"),
        (("interleaved", 1, 2, 4), r"^parallel.vp=2 needs pipeline parallelism: set parallel.pp > 1 or parallel.vp=1$"),
        (("gpipe", 2, 1, 0), "^need parallel.pp, .*microbatches=0"),
    ],
)
def test_bad_requests_are_user_errors(args, message):
    with pytest.raises(UserError, match=message):
        build_schedule(*args)


# ---- the validator catches broken schedules ------------------------------------------------------


def _one_microbatch(rank0: list[Action], rank1: list[Action]) -> Schedule:
    return Schedule("hand", 2, 1, 1, (tuple(rank0), tuple(rank1)))


F0, B0 = Action(Op.F, 0, 0), Action(Op.B, 0, 0)
SEND_F, RECV_F = Action(Op.SEND_F, 0, 0, 1), Action(Op.RECV_F, 0, 0, 0)
SEND_B, RECV_B = Action(Op.SEND_B, 0, 0, 0), Action(Op.RECV_B, 0, 0, 1)
GOOD_RANK1 = [RECV_F, F0, B0, SEND_B]


def test_hand_written_schedule_is_valid():
    validate(_one_microbatch([F0, SEND_F, RECV_B, B0], GOOD_RANK1))


@pytest.mark.parametrize(
    "rank0, message",
    [
        ([F0, RECV_B, B0], r"rank 0: missing SEND_F of microbatch 0, chunk 0"),
        ([F0, SEND_F, RECV_B, B0, B0], r"rank 0: B0.0 appears twice"),
        ([B0, F0, SEND_F, RECV_B], r"rank 0: F must precede B \(microbatch 0, chunk 0\)"),
        ([F0, SEND_F, B0, RECV_B], r"rank 0: RECV_B must precede B"),
        ([F0, Action(Op.SEND_F, 0, 0, 0), RECV_B, B0], r"SEND_F0.0->0 has the wrong peer \(expected 1\)"),
        ([F0, SEND_F, RECV_B, B0, Action(Op.F, 1, 0)], r"rank 0: unexpected actions"),
        # each rank waits for the other: rank 0 receives the gradient before sending the activation
        (
            [F0, RECV_B, B0, SEND_F],
            r"deadlocks: rank 0 blocked at \[RECV_B0.0<-1\]; rank 1 blocked at \[RECV_F0.0<-0\]",
        ),
    ],
)
def test_validator_names_the_broken_rule(rank0, message):
    with pytest.raises(ScheduleError, match=message):
        validate(_one_microbatch(rank0, GOOD_RANK1))


def test_validator_names_a_broken_rule_on_the_last_rank_or_of_a_split_backward():
    # rank 1 sends the gradient to itself: the static check names it before any replay
    with pytest.raises(ScheduleError, match=r"rank 1: SEND_B0.0->1 has the wrong peer \(expected 0\)$"):
        validate(_one_microbatch([F0, SEND_F, RECV_B, B0], [RECV_F, F0, B0, Action(Op.SEND_B, 0, 0, 1)]))
    # zero-bubble: the weight gradient W needs the input gradient I's saved tensors
    i0, w0 = Action(Op.I, 0, 0), Action(Op.W, 0, 0)
    rank1 = [RECV_F, F0, w0, i0, SEND_B]
    with pytest.raises(ScheduleError, match=r"rank 1: I must precede W \(microbatch 0, chunk 0\)$"):
        validate(_one_microbatch([F0, SEND_F, RECV_B, i0, w0], rank1))


def test_validator_refuses_a_backward_in_a_forward_only_schedule():
    ok = build_forward_schedule(2, 1, 1)
    validate(ok)
    rank1 = (*ok.actions[1], B0)
    with pytest.raises(ScheduleError, match=r"rank 1: unexpected actions .*Op.B: 'B'>, 0, 0"):
        validate(Schedule(FORWARD_ONLY, 2, 1, 1, (ok.actions[0], rank1)))
    with pytest.raises(ScheduleError, match=r"rank 0: missing SEND_F of microbatch 0, chunk 0$"):
        validate(Schedule(FORWARD_ONLY, 2, 1, 1, (ok.actions[0][:1], ok.actions[1])))


def test_validator_matches_messages_in_order():
    f = [Action(Op.F, mb, 0) for mb in range(2)]
    b = [Action(Op.B, mb, 0) for mb in range(2)]
    rank0 = [f[0], Action(Op.SEND_F, 0, 0, 1), f[1], Action(Op.SEND_F, 1, 0, 1)]
    rank0 += [Action(Op.RECV_B, 0, 0, 1), b[0], Action(Op.RECV_B, 1, 0, 1), b[1]]
    # rank 1 receives microbatch 1 first: the first message from rank 0 is microbatch 0's
    rank1 = [Action(Op.RECV_F, 1, 0, 0), Action(Op.RECV_F, 0, 0, 0), f[0], b[0], Action(Op.SEND_B, 0, 0, 0)]
    rank1 += [f[1], b[1], Action(Op.SEND_B, 1, 0, 0)]
    with pytest.raises(
        ScheduleError, match=r"message #0 from rank 0 to rank 1 is sent as SEND_F0.0->1 but received as"
    ):
        validate(Schedule("hand", 2, 1, 2, (tuple(rank0), tuple(rank1))))
