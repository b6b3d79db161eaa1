"""The shipped sbatch template on a real two-node SLURM cluster (tests/e2e/slurm_cluster.py):
`megatron-lite launch slurm --cpu` renders and submits it, 2 nodes x 2 CPU ranks train a tiny model
with tp=2 and dp=2, and the per-step losses equal the one-process run's. Both launch styles:
`srun torchrun` (one task per node) and plain `srun` (one task per rank)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from slurm_cluster import slurm_cluster_fixture  # noqa: F401  (the `slurm_cluster` fixture)
from test_torchrun_launch import LOSS_RTOL, clean_env, free_port, losses

from megatron_lite.cli import main


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_sbatch_template_trains_tp2_dp2_on_two_nodes(slurm_cluster, tiny_args, tmp_path, launcher):
    assert main(["train", *tiny_args[:-1], f"log.dir={tmp_path / 'ref'}"]) == 0
    cmd = [sys.executable, "-m", "megatron_lite.cli", "launch", "slurm", "--cpu", "--nodes", "2"]
    cmd += ["--procs-per-node", "2", "--launcher", launcher, "--master-port", str(free_port()), "--wait"]
    env = clean_env(SLURM_CONF=str(slurm_cluster.conf))  # no launcher variables of an enclosing job
    r = subprocess.run([*cmd, *tiny_args, "parallel.tp=2"], env=env, cwd=tmp_path, capture_output=True, text=True)
    job_logs = "\n".join(p.read_text()[-4000:] for p in (tmp_path / "run" / "slurm").glob("slurm-*.out"))
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{job_logs}\n{slurm_cluster.logs()}"
    assert "layout ok: 2 nodes x 2 = 4 ranks = pp 1 x dp 2 x tp 2" in r.stdout
    assert (tmp_path / "run" / "slurm" / "train.sbatch").is_file()
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "ref"), rel=LOSS_RTOL)
