"""The simulator against pipeline theory (equal costs, free transfers unless stated).

- 1F1B and GPipe: bubble fraction (p-1)/(m+p-1) (Narayanan et al. 2021).
- interleaved with v chunks of 1/v the work each: idle/busy = (p-1)/(v*m) when pp divides m; a
  last group of r < p microbatches adds (p - r)(v - 1)/v microbatches' idle time (whole groups run).
- zb-h1 (backward split into I and W, W off the critical path, 1F1B's activation count): makespan
  m*(F+I+W) + (p-1)*(F+I), below 1F1B's (m+p-1)*(F+I+W).
"""

from __future__ import annotations

import pytest

from megatron_lite.parallel.pipeline.schedules import build_schedule
from megatron_lite.parallel.pipeline.simulate import Costs, render, simulate, theory_bubble_ratio


@pytest.mark.parametrize("name", ["1f1b", "gpipe"])
@pytest.mark.parametrize("p, m", [(2, 1), (2, 5), (4, 3), (4, 4), (4, 13), (8, 8), (8, 16)])
def test_one_f_one_b_and_gpipe_bubble(name, p, m):
    sim = simulate(build_schedule(name, p, 1, m))
    assert sim.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)


@pytest.mark.parametrize(
    "p, v, m",
    [(2, 2, 2), (2, 4, 8), (4, 2, 8), (4, 3, 4), (4, 2, 16), (8, 2, 16)]
    # a short last group: of 1 (as long as 1F1B), 2, 3; fewer microbatches than stages
    + [(4, 2, 9), (4, 2, 10), (4, 4, 7), (8, 2, 15), (2, 3, 3), (8, 4, 3)],
)
def test_interleaved_bubble_ratio(p, v, m):
    sim = simulate(build_schedule("interleaved", p, v, m), Costs(1 / v, 1 / v, 1 / v))
    assert sim.bubble_ratio == pytest.approx(theory_bubble_ratio(p, v, m), abs=1e-12)
    # and it beats 1F1B's (p-1)/m, but for one microbatch past a multiple of p
    one_f_one_b = simulate(build_schedule("1f1b", p, 1, m)).bubble_ratio
    assert sim.bubble_ratio < one_f_one_b or m % p == 1 and sim.bubble_ratio == pytest.approx(one_f_one_b)


@pytest.mark.parametrize("p, v, m", [(4, 2, 5), (4, 2, 7), (4, 2, 9), (2, 2, 3), (8, 2, 15)])
def test_interleaved_off_multiples_is_never_worse_than_1f1b(p, v, m):
    sim = simulate(build_schedule("interleaved", p, v, m), Costs(1 / v, 1 / v, 1 / v))
    assert sim.bubble_ratio <= simulate(build_schedule("1f1b", p, 1, m)).bubble_ratio + 1e-12


@pytest.mark.parametrize("p, m", [(2, 2), (4, 4), (4, 8), (4, 9), (8, 24)])
def test_zb_h1_bubble_is_below_1f1b_at_the_same_activation_count(p, m):
    costs = Costs(forward=1.0, backward_input=1.2, backward_weight=0.8)
    zb, one = simulate(build_schedule("zb-h1", p, 1, m), costs), simulate(build_schedule("1f1b", p, 1, m), costs)
    # approx (rel 1e-6): the simulator adds the float costs action by action, the closed form multiplies
    assert zb.makespan == pytest.approx(m * 3.0 + (p - 1) * 2.2)
    assert one.makespan == pytest.approx((m + p - 1) * 3.0)
    assert zb.bubble_fraction < one.bubble_fraction
    assert zb.peak_held == one.peak_held


def test_peak_activations_held():
    assert simulate(build_schedule("1f1b", 4, 1, 8)).peak_held == [4, 3, 2, 1]
    assert simulate(build_schedule("1f1b", 4, 1, 2)).peak_held == [2, 2, 2, 1]
    assert simulate(build_schedule("gpipe", 4, 2, 8)).peak_held == [16] * 4
    # Megatron's interleaved warmup: 2 (p - r - 1) + (v - 1) p forwards, then one more
    assert simulate(build_schedule("interleaved", 4, 2, 8)).peak_held == [11, 9, 7, 5]


def test_p2p_latency_and_per_rank_costs():
    s = build_schedule("1f1b", 2, 1, 4)
    base, slow = simulate(s), simulate(s, Costs(p2p=0.5))
    assert slow.makespan > base.makespan
    # a slower last stage stretches the whole pipeline
    uneven = simulate(s, [Costs(), Costs(forward=2.0)])
    assert uneven.makespan > base.makespan and uneven.idle[0] > uneven.idle[1]
    with pytest.raises(ValueError, match="costs for 3 ranks"):
        simulate(s, [Costs()] * 3)


def test_render_draws_one_row_per_rank():
    sim = simulate(build_schedule("zb-h1", 4, 1, 4))
    text = render(sim, width=60)
    lines = text.splitlines()
    assert len(lines) == 5 and "bubble" in lines[0]
    assert all(line.startswith(f"rank  {r} |") for r, line in enumerate(lines[1:]))
    assert all(len(line.split("|")[1]) == 60 for line in lines[1:])
    assert "F0" in lines[1] and "W" in lines[4] and "." in lines[1]


def test_measured_durations_per_action_replay_like_costs():
    s = build_schedule("zb-h1", 4, 1, 6)
    by_kind = simulate(s, Costs(forward=1.0, backward_input=2.0, backward_weight=0.5, p2p=0.1))
    per_action = simulate(s, lambda rank, a: {"F": 1.0, "I": 2.0, "W": 0.5}[a.kind.value], p2p=0.1)
    assert per_action.makespan == by_kind.makespan and per_action.busy == by_kind.busy
