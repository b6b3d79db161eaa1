"""init_distributed end to end: two processes, one launched with torchrun's variables and one with
a bare ``srun``'s, resolve to the same world, build a mesh, all-reduce, and shut down leaving no
gloo thread behind (one left running can abort a finished rank at interpreter exit)."""

from __future__ import annotations

import os
import subprocess
import sys

from ports import free_port

RANK_SCRIPT = """
import torch, torch.distributed as dist
from megatron_lite.parallel.mesh import ParallelDims, ParallelMesh, init_distributed, shutdown_distributed
env = init_distributed(timeout_s=30)
mesh = ParallelMesh.build(ParallelDims.resolve(env.world_size, tp=2))
t = torch.tensor([float(env.rank + 1)])
dist.all_reduce(t, group=mesh.tp_group)
print(env.launcher, env.rank, t.item())
del mesh  # holds the groups: shutdown joins the gloo threads only of groups no one holds
print("gloo threads left", shutdown_distributed())
"""


def test_torchrun_and_srun_envs_join_one_world():
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    srun = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "127.0.0.1"}
    srun.update(SLURM_STEP_ID="0", MASTER_PORT=port)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT],
            env={**base, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for extra in (torchrun, srun)
    ]
    try:
        outs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0].splitlines()[-2:] == ["torchrun 0 3.0", "gloo threads left 0"], outs[0]
    assert outs[1].splitlines()[-2:] == ["slurm 1 3.0", "gloo threads left 0"], outs[1]
