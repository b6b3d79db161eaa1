"""ParallelMesh on real gloo worlds: every layout's groups are the documented ranks and actually
communicate; the TP RNG tracker agrees where it must and differs where it must."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.parallel import comm
from megatron_lite.parallel.mesh import MESH_DIMS, ParallelDims, ParallelMesh, group_ranks
from megatron_lite.parallel.random import seed_tensor_parallel


def _check_layouts(rank: int, world: int) -> None:
    for tp, pp in ((2, 1), (2, 2), (1, 2), (4, 1)):
        dims = ParallelDims.resolve(world, tp=tp, pp=pp)
        mesh = ParallelMesh.build(dims)
        assert mesh.coordinate == (mesh.pp_rank, mesh.dp_rank, mesh.tp_rank)
        assert (mesh.tp_size, mesh.dp_size, mesh.pp_size) == (dims.tp, dims.dp, dims.pp)
        for dim in MESH_DIMS:
            group, expected = mesh.group(dim), group_ranks(rank, dims, dim)
            assert comm.group_size(group) == len(expected)
            # the sum of global ranks over the group proves who is actually in it
            assert comm.all_reduce(torch.tensor([float(rank)]), group).item() == sum(expected), (dims, dim)
        assert comm.group_rank(mesh.tp_group) == mesh.tp_rank


def test_mesh_layouts_world4(world4):
    world4.run(_check_layouts)


def _check_rng_tracker(rank: int, world: int) -> None:
    tracker = seed_tensor_parallel(1234, tp_rank=rank)
    default_a = torch.rand(8)
    with tracker.fork():
        tp_a = torch.rand(8)
    default_b = torch.rand(8)
    with tracker.fork():
        tp_b = torch.rand(8)
    # forking neither advanced nor reset the default stream
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(8), default_a) and torch.equal(torch.rand(8), default_b)
    # the model-parallel stream continues where it stopped
    assert not torch.equal(tp_a, tp_b)
    gathered = [torch.empty(16) for _ in range(world)]
    dist.all_gather(gathered, torch.cat([default_a, tp_a]))
    assert all(torch.equal(g[:8], default_a) for g in gathered), "default stream must agree across TP ranks"
    assert not torch.equal(gathered[0][8:], gathered[1][8:]), "model-parallel stream must differ per TP rank"


def test_rng_tracker_world2(world2):
    world2.run(_check_rng_tracker)
