"""Rank topology and launch-environment logic, without any process group."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from megatron_lite.errors import UserError
from megatron_lite.launcher.env import DistEnv, parse_nodelist, resolve_env, slurm_job_port
from megatron_lite.parallel.mesh import (
    ParallelDims,
    ParallelMesh,
    coordinate_table,
    group_ranks,
    init_distributed,
    rank_coordinates,
)
from megatron_lite.parallel.random import seed_tensor_parallel


def test_resolve_derives_dp():
    assert ParallelDims.resolve(8, tp=2, pp=2) == ParallelDims(tp=2, pp=2, dp=2, vp=1)
    assert ParallelDims.resolve(1) == ParallelDims()


def test_resolve_errors_show_every_factor():
    with pytest.raises(
        UserError, match=r"parallel.tp=2 x parallel.pp=3 x parallel.dp=1 = 6 does not equal world size 4"
    ):
        ParallelDims.resolve(4, tp=2, pp=3, dp=1)
    with pytest.raises(UserError, match=r"= 1 does not equal world size 2: .* or launch 1 rank$"):
        ParallelDims.resolve(2, tp=1, pp=1, dp=1)
    with pytest.raises(UserError, match=r"parallel.tp=3 x parallel.pp=1 = 3 does not divide world size 4"):
        ParallelDims.resolve(4, tp=3, pp=1)
    with pytest.raises(UserError, match=r"parallel.tp=0 must be a positive integer"):
        ParallelDims.resolve(4, tp=0)
    with pytest.raises(UserError, match=r"^parallel.pp=True must be a positive integer$"):  # bool is an int subclass
        ParallelDims.resolve(4, pp=True)
    with pytest.raises(UserError, match=r"parallel.vp=2 needs pipeline parallelism"):
        ParallelDims.resolve(4, tp=2, pp=1, vp=2)


def test_rank_coordinates_tp_innermost_pp_outermost():
    dims = ParallelDims(tp=2, pp=3, dp=2)
    coords = [rank_coordinates(r, dims) for r in range(dims.world_size)]
    assert coords[:4] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert coords[4] == (1, 0, 0) and coords[11] == (2, 1, 1)
    assert len(set(coords)) == 12
    with pytest.raises(ValueError, match="rank 12 is outside world size 12"):
        rank_coordinates(12, dims)


def test_group_ranks():
    dims = ParallelDims(tp=2, pp=2, dp=2)
    assert group_ranks(5, dims, "tp") == [4, 5]
    assert group_ranks(5, dims, "dp") == [5, 7]
    assert group_ranks(5, dims, "pp") == [1, 5]
    # every dim partitions the world
    for dim in ("tp", "dp", "pp"):
        groups = {tuple(group_ranks(r, dims, dim)) for r in range(8)}
        assert sorted(r for g in groups for r in g) == list(range(8))
    with pytest.raises(ValueError, match=r"^unknown mesh dim 'cp'; choose one of \('pp', 'dp', 'tp'\)$"):
        group_ranks(0, dims, "cp")


def test_coordinate_table():
    table = coordinate_table(ParallelDims(tp=2, pp=2, dp=1))
    lines = table.splitlines()
    assert lines[0].startswith("world 4 = pp 2 x dp 1 x tp 2 (vp 1)")
    assert lines[2].split() == ["0", "0", "0", "0"] and lines[5].split() == ["3", "1", "0", "1"]
    long = coordinate_table(ParallelDims(dp=100), max_rows=3).splitlines()
    assert len(long) == 2 + 3 + 1 and long[-1] == "... 97 more ranks"


def test_single_process_mesh_needs_no_process_group():
    mesh = ParallelMesh.build(ParallelDims())
    assert mesh.tp_group is None and mesh.dp_group is None and mesh.pp_group is None
    assert (mesh.tp_size, mesh.tp_rank, mesh.coordinate, mesh.ranks("tp")) == (1, 0, (0, 0, 0), [0])
    with pytest.raises(
        UserError, match=r"parallel.tp=2 x parallel.pp=1 x parallel.dp=1 = 2 ranks, but this is a single process"
    ):
        ParallelMesh.build(ParallelDims(tp=2))


def test_env_none():
    assert resolve_env({}) == DistEnv()


def test_env_half_set_by_hand_is_refused_not_one_process():
    """WORLD_SIZE=2 alone (no torchrun) trained as one process without a word."""
    for name, value, other in (("WORLD_SIZE", "2", "RANK"), ("RANK", "1", "WORLD_SIZE")):
        with pytest.raises(UserError) as e:
            resolve_env({name: value})
        assert str(e.value) == (
            f"environment variable {name}={value} is set but {other} is not, so this process would train alone: "
            "launch the ranks with torchrun (launch/torchrun.sh), which sets RANK, WORLD_SIZE, LOCAL_RANK and "
            f"MASTER_ADDR, or unset {name} to train as one process"
        )
    assert resolve_env({"WORLD_SIZE": "1"}) == DistEnv()
    srun = {"WORLD_SIZE": "4", "SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "MASTER_ADDR": "n0"}
    assert resolve_env(srun).rank == 1  # an srun step's own variables place it


def test_env_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"}
    assert resolve_env(env) == DistEnv(3, 4, 1, "n0", 1234, "torchrun")
    assert resolve_env({**env, "LOCAL_WORLD_SIZE": "2"}).local_world_size == 2  # the ranks sharing this machine
    with pytest.raises(
        UserError, match=r"MASTER_ADDR is not: launch with torchrun .*or set MASTER_ADDR to rank 0's host"
    ):
        resolve_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match=r"RANK='x' is not an integer"):
        resolve_env({**env, "RANK": "x"})
    with pytest.raises(UserError, match="rank 4 is outside world size 4"):
        resolve_env({**env, "RANK": "4"})
    with pytest.raises(UserError, match="local rank -1 is outside world size 4 .*LOCAL_RANK"):
        resolve_env({**env, "LOCAL_RANK": "-1"})  # torch.cuda.set_device(-1) is a no-op: all on GPU 0


def test_env_slurm():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    env["SLURM_STEP_ID"] = "0"  # an srun task
    assert resolve_env(env) == DistEnv(5, 8, 1, "gpu07", 29500, "slurm")
    # "2(x3)": 2 tasks on each of 3 nodes; the step's own layout wins over the job's
    assert resolve_env({**env, "SLURM_TASKS_PER_NODE": "2(x3)"}).local_world_size == 2
    assert resolve_env({**env, "SLURM_TASKS_PER_NODE": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}).local_world_size == 4
    assert resolve_env({**env, "MASTER_PORT": "6000"}).master_port == 6000
    assert resolve_env({**env, "MASTER_ADDR": "head"}).master_addr == "head"
    assert resolve_env(env, hostnames=lambda nodelist: ["from-scontrol"]).master_addr == "from-scontrol"
    # torchrun inside srun: torchrun's variables describe the real world
    both = {**env, "RANK": "0", "WORLD_SIZE": "16", "MASTER_ADDR": "gpu07"}
    assert resolve_env(both).launcher == "torchrun"
    with pytest.raises(UserError, match="MASTER_PORT=70000 is not a TCP port"):  # torch: a ValueError traceback
        resolve_env({**env, "MASTER_PORT": "70000"})
    with pytest.raises(
        UserError, match=r"cannot find the master host; run it in an sbatch or salloc allocation .*set MAST"
    ):
        resolve_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEPID": "0"})


def test_env_slurm_port_is_the_jobs_own_and_the_batch_script_is_no_rank():
    step = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "n[1-2]"}
    # two jobs on one node must not meet at one rendezvous port: the sbatch templates' formula
    assert resolve_env({**step, "SLURM_JOB_ID": "123457"}).master_port == 20000 + 123457 % 10000
    assert resolve_env({**step, "SLURM_JOB_ID": "123457", "MASTER_PORT": "6000"}).master_port == 6000
    assert slurm_job_port("7") == 20007 and slurm_job_port("x") == 29500
    # the batch shell of a 2-node x 2-task job (no SLURM_STEP_ID): one process, not rank 0 of 4
    batch = {k: v for k, v in step.items() if k != "SLURM_STEP_ID"}
    assert resolve_env({**batch, "SLURM_JOB_ID": "9"}) == DistEnv()
    # torchrun started from it: torchrun's world
    torchrun = {**batch, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "29400"}
    assert resolve_env(torchrun) == DistEnv(1, 2, 0, "n1", 29400, "torchrun")


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[01-03,7],login1", ["gpu01", "gpu02", "gpu03", "gpu7", "login1"]),  # width per range
        ("a[1-2]-b[1-2]", ["a1-b1", "a1-b2", "a2-b1", "a2-b2"]),
        ("n[9-11]", ["n9", "n10", "n11"]),
    ],
)
def test_parse_nodelist(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


def test_init_distributed_without_launcher_is_a_no_op():
    assert init_distributed(timeout_s=5, environ={}) == DistEnv()
    assert not dist.is_initialized()


def test_launch_env_is_read_without_importing_torch():
    """launch/torchrun.sh checks MASTER_ADDR before torchrun starts; that check, like every launch
    variable, lives in launcher/env.py, which needs no torch (mesh.py re-exports its names)."""
    code = (
        "import sys; from megatron_lite.launcher.env import check_master_resolves, resolve_env; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from megatron_lite.parallel import mesh

    assert mesh.resolve_env is resolve_env and mesh.DistEnv is DistEnv


def _draws(tp_rank: int, pp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(default stream, model-parallel stream) draws of a fresh tracker on that (tp, pp) rank."""
    tracker = seed_tensor_parallel(1234, tp_rank, pp_rank=pp_rank)
    default = torch.rand(8)
    with tracker.fork():
        return default, torch.rand(8)


def test_pipeline_stages_draw_their_own_random_streams():
    """Megatron's seeds: stage s seeds its streams from seed + 100 s, so two stages (other layers)
    never draw the same dropout masks, while TP ranks of one stage share the default stream."""
    (default_0, tp_0), (default_1, tp_1) = _draws(0, pp_rank=0), _draws(0, pp_rank=1)
    assert not torch.equal(default_0, default_1)
    assert not torch.equal(tp_0, tp_1)
    other_tp_default, other_tp = _draws(1, pp_rank=1)
    assert torch.equal(other_tp_default, default_1) and not torch.equal(other_tp, tp_1)
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(8), default_0)  # stage 0 keeps the plain seed
