"""Launching under torchrun, for real: two "machines" on 127.0.0.1 resume a one-process run to its losses,
a bad rendezvous host or a layout that cannot fill the world fails in seconds with one clear line,
and a rank that fails during setup takes every rank down with its own error, said in one line."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ports import free_port
from train_checks import job_log_error

from megatron_lite.cli import main

REPO = Path(__file__).resolve().parents[2]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_", "SLURM_")
LOSS_RTOL = 1e-5  # fp32; TP and DP only reassociate sums (tests/distributed/test_model_parity.py)
FAIL_SCRIPT = """
import os, sys
from megatron_lite import cli
from megatron_lite.errors import UserError
from megatron_lite.launcher.fail_fast import fail_fast_setup
from megatron_lite.parallel.mesh import init_distributed

env = init_distributed(timeout_s=300)
print(f"rank {env.rank} CUDA_DEVICE_MAX_CONNECTIONS={os.environ['CUDA_DEVICE_MAX_CONNECTIONS']}", flush=True)
try:
    with fail_fast_setup("building the model"):
        if env.rank == 1:
            raise ValueError("boom")
except UserError as e:
    print(f"rank {env.rank} agreed: {e}", flush=True)
    cli._report(e)  # as `megatron-lite train` reports it
    sys.exit(2)
"""


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VARS)}, **extra}


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def communicate_all(procs: list[subprocess.Popen], timeout_s: float) -> list[str]:
    """Outputs of ``procs`` (each started in its own session). When one fails, or the time is up,
    the others are killed (their process groups) so the test reports every output at once."""
    outs: list[str] = [""] * len(procs)

    def read(i: int) -> None:  # drain each pipe in a thread, so no process blocks on a full pipe
        outs[i] = procs[i].communicate()[0]

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(procs))]
    for r in readers:
        r.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs):
            time.sleep(5)  # let the others notice and report the failure themselves
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    for r in readers:
        r.join()
    return outs


def test_a_one_process_run_relaunched_on_two_machines_resumes_to_the_one_process_losses(tiny_args, tmp_path):
    """A one-process run stopped at step 3 is relaunched from its config.yaml by torchrun on two
    "machines" of two ranks (tp 2, and dp, derived from the world size, 1 -> 2): it resumes from the
    checkpoint and trains to the losses of an uninterrupted one-process run."""
    assert main(["train", *tiny_args[:-1], f"log.dir={tmp_path / 'ref'}"]) == 0
    assert main(["train", *tiny_args, "train.exit_after=3"]) == 0
    relaunch = ["--config", str(tmp_path / "run" / "config.yaml"), "parallel.tp=2"]
    port = free_port()
    nodes = [
        subprocess.Popen(
            ["bash", str(REPO / "launch" / "torchrun.sh"), *relaunch],
            env=clean_env(
                NNODES="2",
                NODE_RANK=str(node),
                NPROC_PER_NODE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),  # and no RDZV_ID: the two machines agree on the script's default
                PYTHON=sys.executable,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for node in (0, 1)
    ]
    outs = communicate_all(nodes, timeout_s=300)
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-4000:] for o in outs)
    # every rank freed its process groups, so no gloo thread can abort the finished rank at exit
    assert not any("gloo threads outlive" in o for o in outs), "\n".join(o[-4000:] for o in outs)
    # the failure watch ran on every rank (over torchrun's agent store) and the clean end tripped nothing
    assert not any("fail_fast" in o or "failure_watch" in o for o in outs), "\n".join(o[-4000:] for o in outs)
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "ref"), rel=LOSS_RTOL)
    assert not any("OMP_NUM_THREADS" in o for o in outs), outs[0][:2000]  # torchrun's warning: the script sets it
    assert "resumed from" in outs[0] and "at step 3" in outs[0], outs[0][-4000:]
    assert "parallel.dp 1 -> 2" in outs[0], outs[0][-4000:]  # named among the changed settings
    # each logged step is one line of the job's output, said by rank 0 alone
    said = [line for out in outs for line in out.splitlines() if " | loss " in line]
    assert [line.split(": ", 1)[1].split(" | ")[0] for line in said] == [f"step {n}/6" for n in range(4, 7)], said
    # dated: a job runs for days, and a requeued one appends to the same log
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank 0/4\] INFO ", line) for line in said), said


def test_failing_rank_stops_every_rank_with_its_error(tmp_path):
    script = tmp_path / "setup.py"
    script.write_text(FAIL_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    (out,) = communicate_all([proc], timeout_s=120)
    assert time.monotonic() - start < 60, "ranks waited for the collective timeout (300 s) instead"
    assert proc.returncode != 0
    message = "rank 1 failed during building the model: ValueError: boom"
    for rank in (0, 1):
        assert f"rank {rank} agreed: {message}" in out, out
        assert f"rank {rank} CUDA_DEVICE_MAX_CONNECTIONS=1" in out, out
    # one line says it for the whole launch, dated and naming its rank; rank 1 (the machine's second) is silent
    said = [line for line in out.splitlines() if f"error: {message}" in line]
    assert len(said) == 1 and re.fullmatch(job_log_error(0, 2, message), said[0]), out


def _train_alone(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """`megatron-lite train` as one process holding launcher variables for a larger world."""
    cmd = [sys.executable, "-m", "megatron_lite.train", *args]
    return subprocess.run(cmd, env=clean_env(**env), capture_output=True, text=True, timeout=60)


def test_unresolvable_master_fails_within_seconds_naming_it(tiny_args):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "no-such-host.invalid"}
    r = _train_alone(tiny_args, **env, MASTER_PORT=str(free_port()))
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert re.match(job_log_error(0, 2, ""), last) and "no-such-host.invalid" in last, r.stderr[-3000:]


def test_torchrun_script_with_unresolvable_master_fails_within_seconds(tiny_args):
    # torchrun's own rendezvous would retry the name for minutes before any rank starts
    env = clean_env(NNODES="2", NODE_RANK="0", NPROC_PER_NODE="1", MASTER_ADDR="no-such-host.invalid")
    cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), *tiny_args]
    r = subprocess.run(cmd, env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("launch/torchrun.sh: rendezvous host 'no-such-host.invalid'"), r.stderr[-3000:]


@pytest.mark.parametrize("backend", ["c10d", "static"])
def test_a_machine_that_never_joins_leaves_the_other_one_line_after_rdzv_timeout(tiny_args, tmp_path, backend):
    """The first of two machines, the second never started: torchrun waited 600 s, not settable from the
    script, then ended in a bare traceback (c10d: RendezvousTimeoutError; static: the TCPStore's
    DistStoreError, after its own `timeout`). The 120 s guard only stops a hang."""
    env = clean_env(NNODES="2", NODE_RANK="0", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", RDZV_TIMEOUT="2")
    env["RDZV_BACKEND"] = backend
    cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), *tiny_args]
    env.update(MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    rendezvous = re.search(r"^launch/torchrun.sh: rendezvous (\S+) at (127.0.0.1:\d+) for 2 machines$", r.stderr, re.M)
    assert rendezvous, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"torchrun: rendezvous {rendezvous[1]} at {rendezvous[2]} timed out after 2 s before --nnodes=2 machines "
        "joined: start the job on every machine with the same MASTER_ADDR, MASTER_PORT and rendezvous id "
        "(launch/torchrun.sh: the same arguments, or the same RDZV_ID; each machine prints its id), or let them "
        "wait longer (RDZV_TIMEOUT of launch/torchrun.sh or launch/*.sbatch)"
    ), r.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # no rank started


def test_layout_that_cannot_fill_the_world_fails_before_any_process_group(tiny_args):
    # Rank 0 of 4 alone: it waits at the rendezvous for ranks 1-3 to hear its error (parallel.timeout_s
    # here, at most mesh.ERROR_WAIT_S), then leaves with its own message, never a timeout's.
    env = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    r = _train_alone([*tiny_args, "parallel.tp=3", "parallel.timeout_s=3"], **env, MASTER_PORT=str(free_port()))
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert re.match(job_log_error(0, 4, "parallel.tp=3 x parallel.pp=1 = 3 does not divide world size 4"), last), last


LATE_SIGNAL_SCRIPT = """
import os, signal, sys
from megatron_lite.cli import main
from megatron_lite.training import trainer

close = trainer.Trackers.close
def close_after_a_signal(self):  # the loop and its save are done: sbatch --signal=USR1@120 fires now
    os.kill(os.getpid(), signal.SIGUSR1)
    close(self)
trainer.Trackers.close = close_after_a_signal
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_a_sigusr1_after_the_loop_leaves_a_launched_rank_finishing_cleanly(tiny_args, tmp_path):
    """A rank that trained to the end and saved must not die of a preemption warning arriving
    while it shuts down (SIGUSR1's default action ends the process: torchrun reported it failed)."""
    script = tmp_path / "late_signal.py"
    script.write_text(LATE_SIGNAL_SCRIPT)
    env = clean_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [sys.executable, str(script), *tiny_args, "train.steps=2"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_one_machines_bad_config_stops_every_rank_at_once_with_its_message(tiny_args):
    """Rank 1's overrides hold a typo, rank 0's are fine: rank 1 stopped before joining, and rank 0
    waited in the rendezvous for it until parallel.timeout_s, then reported only a timeout. Each rank
    is the first of its machine, whose output is its own: each ends with the verdict."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "megatron_lite.train", *tiny_args, "parallel.timeout_s=300", *extra],
            env=clean_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for rank, extra in ((0, []), (1, ["train.stepz=3"]))
    ]
    try:  # not communicate_all: rank 1 prints its error only after cli.ERROR_GRACE_S
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [2, 2], "\n".join(o[-3000:] for o in outs)
    message = "rank 1 failed before joining the process group: unknown config key 'train.stepz'"
    for rank, out in enumerate(outs):
        assert re.match(job_log_error(rank, 2, message), out.strip().splitlines()[-1]), out[-3000:]
