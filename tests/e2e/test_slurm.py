"""The shipped sbatch template on a real two-node SLURM cluster (tests/e2e/slurm_cluster.py):
`megatron-lite launch slurm --cpu` renders and submits it, 2 nodes x 2 CPU ranks train a tiny model
with tp=2 and dp=2, and the per-step losses equal the one-process run's. Both launch styles:
`srun torchrun` (one task per node) and plain `srun` (one task per rank)."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def _job_log(run: Path) -> str:
    return "\n".join(p.read_text()[-4000:] for p in (run / "slurm").glob("slurm-*.out"))


def test_a_busy_master_port_fails_the_job_at_once_naming_it(slurm_cluster, tiny_args, tmp_path):
    """A port another job's rendezvous holds (here: any listener on the first node) must not be
    joined: torchrun's agent would connect to that job's store and die with it."""
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):  # node1 is 127.0.0.1
        cmd = [sys.executable, "-m", "megatron_lite.cli", "launch", "slurm", "--cpu", "--nodes", "2"]
        cmd += ["--procs-per-node", "2", "--master-port", str(port), "--wait"]
        env = clean_env(SLURM_CONF=str(slurm_cluster.conf))
        start = time.monotonic()
        r = subprocess.run(
            [*cmd, *tiny_args, "parallel.tp=2"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
    log = _job_log(tmp_path / "run")
    assert r.returncode == 2, f"{r.stdout}\n{r.stderr}\n{log}"
    assert f"MASTER_PORT={port} is already in use on node1" in log, log
    assert time.monotonic() - start < 60
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_train_in_the_batch_script_itself_is_one_process_not_rank_0_of_the_job(slurm_cluster, tiny_args, tmp_path):
    """The batch shell of a 4-task job has SLURM_PROCID=0 and SLURM_NTASKS=4 but is no srun task:
    `megatron-lite train` there is one process (it waited for 3 ranks that never come)."""
    script = tmp_path / "job.sh"
    args = " ".join(shlex.quote(a) for a in [*tiny_args, "train.steps=2", "parallel.timeout_s=60"])
    script.write_text(f"#!/bin/bash\n{shlex.quote(sys.executable)} -m megatron_lite.cli train {args}\n")
    cmd = ["sbatch", "--wait", "--nodes=2", "--ntasks-per-node=2", f"--output={tmp_path / 'job.out'}", str(script)]
    env = clean_env(SLURM_CONF=str(slurm_cluster.conf))
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = (tmp_path / "job.out").read_text()
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{out}"
    assert len(losses(tmp_path / "run")) == 2


def test_sigusr1_to_the_job_saves_and_the_job_completes(slurm_cluster, tiny_args, tmp_path):
    """`scancel --signal=USR1` (what `sbatch --signal=USR1@120` sends before the time limit) reaches
    every process of the step, torchrun too: it must pass it on, not die of it (the step then failed
    and SLURM killed the ranks KillWait seconds later), so the ranks save and the job completes."""
    cmd = [sys.executable, "-m", "megatron_lite.cli", "launch", "slurm", "--cpu", "--nodes", "2"]
    cmd += ["--procs-per-node", "2", "--wait", *tiny_args, "parallel.tp=2", "train.steps=100000"]
    cmd += ["checkpoint.every=0"]
    env = clean_env(SLURM_CONF=str(slurm_cluster.conf))
    run = tmp_path / "run"
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        job = next(line.split()[-1] for line in proc.stdout if line.startswith("submitted job"))
        deadline = time.monotonic() + 120
        metrics = run / "metrics.jsonl"  # created empty at setup: wait for a step, all ranks in the loop
        while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
            time.sleep(0.5)
        subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    log = _job_log(run)
    assert proc.returncode == 0, f"{out}\n{log}"
    assert "on a preemption signal; the checkpoint is saved" in log
    assert "User defined signal" not in log
    for rank in range(4):  # each rank's line says which rank it is
        assert f"[rank {rank}/4] WARNING megatron_lite.training.fault: received SIGUSR1" in log, log
    step = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 0 < step < 100000 and len(losses(run)) == step
    # the job log's last word on the launch: one summary, by rank 0, naming the checkpoint it saved
    summary = (
        f"[rank 0/4] INFO megatron_lite.training.trainer: run summary: steps 1-{step} of 100000 ({step} this launch)"
    )
    said = [line for line in log.splitlines() if "run summary: " in line]
    assert len(said) == 1 and summary in said[0], said
    assert said[0].endswith(f" | checkpoint {run / 'checkpoints' / f'step_{step:08d}'}"), said
