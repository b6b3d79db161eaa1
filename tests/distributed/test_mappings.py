"""Each f/g mapping: forward and backward against the collective its docstring names; and the
in-place flat-buffer collectives of ``comm`` that the data-parallel grad buckets use.

Every rank r builds x_r = full input + r (distinct per rank, known to all), so each expected value
is computed locally. All exact: sums of at most 4 small integers' worth of fp32 are exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_lite.parallel import comm, mappings

B, T, H = 2, 8, 8


def _inputs(rank: int, world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-rank inputs and upstream grads, integer-valued so every sum is exact."""
    xs = [torch.arange(B * T * H, dtype=torch.float32).view(B, T, H) + 100 * r for r in range(world)]
    gs = [torch.arange(B * T * H, dtype=torch.float32).view(B, T, H).flip(-1) - 10 * r for r in range(world)]
    return xs, gs


def check_mappings(rank: int, world: int) -> None:
    group = dist.group.WORLD if world > 1 else None
    xs, gs = _inputs(rank, world)
    x, g, x_sum, g_sum = xs[rank], gs[rank], sum(xs), sum(gs)

    def mine(t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.chunk(world, dim)[rank]

    full_gs = [torch.cat(gs, 1) * (r + 1) for r in range(world)]  # rank-dependent full-T grads
    # rank r fed its own chunk r of g_r: the all-gather in backward concatenates those
    mine_of_each_g = {d: torch.cat([t.chunk(world, d)[r] for r, t in enumerate(gs)], d) for d in (1, -1)}
    m = mappings
    cases = {
        # name: (wrapper, grad fed to the output, expected output, expected input grad)
        "copy_to_tp": (m.copy_to_tp_region, g, x, g_sum),
        "reduce_from_tp": (m.reduce_from_tp_region, g, x_sum, g),
        "scatter_to_tp": (m.scatter_to_tp_region, mine(g, -1), mine(x, -1), mine_of_each_g[-1]),
        "gather_from_tp": (m.gather_from_tp_region, torch.cat(gs, -1), torch.cat(xs, -1), g),
        "scatter_to_sp": (m.scatter_to_sequence_parallel_region, mine(g, 1), mine(x, 1), mine_of_each_g[1]),
        "gather_from_sp": (
            m.gather_from_sequence_parallel_region,
            full_gs[rank],
            torch.cat(xs, 1),
            mine(sum(full_gs), 1),
        ),
        "reduce_scatter_to_sp": (
            m.reduce_scatter_to_sequence_parallel_region,
            mine(g, 1),
            mine(x_sum, 1),
            mine_of_each_g[1],
        ),
    }
    for name, (fn, grad_out, want_y, want_grad) in cases.items():
        x_leaf = x.clone().requires_grad_(True)
        y = fn(x_leaf, group)
        y.backward(grad_out)
        assert torch.equal(y.detach(), want_y), name
        assert torch.equal(x_leaf.grad, want_grad), name


def check_inplace_collectives(rank: int, world: int) -> None:
    group = dist.group.WORLD if world > 1 else None
    n = 300_001  # large enough for gloo to chunk its transfers
    base = (torch.arange(world * n) % 7).float()  # small integers: every sum is exact

    x = base * (rank + 1)
    assert comm.start_all_reduce_(x, group).wait() is x
    assert torch.equal(x, base * sum(range(1, world + 1)))

    x = base * (rank + 1)
    mine = comm.start_reduce_scatter_(x, group).wait()
    assert mine.data_ptr() == x.view(world, n)[rank].data_ptr()  # the result lives in the buffer
    assert torch.equal(mine, (base * sum(range(1, world + 1))).view(world, n)[rank])

    x = torch.zeros(world * n)
    x.view(world, n)[rank] = rank + 1.0
    assert comm.start_all_gather_(x, group).wait() is x
    assert torch.equal(x, torch.arange(1.0, world + 1).repeat_interleave(n))


def test_inplace_collectives_world4(world4):
    world4.run(check_inplace_collectives)


def test_mappings_single_process_are_identity():
    check_inplace_collectives(0, 1)
    check_mappings(0, 1)
    x = torch.ones(2, 4)
    assert mappings.copy_to_tp_region(x, None) is x  # no autograd node at size 1


def test_mappings_world2(world2):
    world2.run(check_mappings)


def test_mappings_world4(world4):
    world4.run(check_mappings)


def _none_group_in_a_world(rank: int, world: int) -> str:
    with pytest.raises(ValueError, match="group=None means 'no process group'") as info:
        comm.group_size(None)
    return str(info.value)


def test_none_group_is_refused_in_a_multi_rank_world(world2):
    assert "pass the mesh's group" in world2.run(_none_group_in_a_world)[0]
