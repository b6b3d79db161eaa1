"""launch/torchrun.sh: its variables checked in one line before torchrun starts, the rendezvous id each
job gets, threads per rank, a rendezvous port in use, and the one line a rendezvous that timed out
ends with."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from launch_scripts import ROOT, run_launch_script

from megatron_lite.launcher.rendezvous_port import check_port_free
from megatron_lite.launcher.torchrun import rendezvous_timeout_message


def _rendezvous_id(tmp_path: Path, args: list[str], **env: str) -> str:
    """The --rdzv_id launch/torchrun.sh hands torchrun on a machine of a two-machine job."""
    stub = tmp_path / "python"  # stands in for the interpreter: prints the id instead of starting torchrun
    stub.write_text('#!/bin/sh\nfor a; do case "$a" in --rdzv_id=*) echo "${a#--rdzv_id=}";; esac; done\n')
    stub.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_", "LSB_", "RDZV_", "MASTER_"))}
    launch = {"PYTHON": str(stub), "NNODES": "2", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1"}
    r = subprocess.run(
        ["bash", str(ROOT / "launch" / "torchrun.sh"), *args],
        env={**clean, **launch, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    return r.stdout.strip()


def test_torchrun_script_gives_each_job_its_own_rendezvous_id_the_same_on_every_machine(tmp_path):
    """RDZV_ID defaulted to `megatron-lite` for every job: a second job on the same endpoint joined the
    first one's rendezvous (and torchrun restarts a job's workers for each machine that arrives)."""
    job, other = ["--config", "a.yaml", "train.steps=5"], ["--config", "b.yaml"]
    first = _rendezvous_id(tmp_path, job, NODE_RANK="0")
    assert _rendezvous_id(tmp_path, job, NODE_RANK="1") == first != "megatron-lite"
    assert _rendezvous_id(tmp_path, other) != first  # another job on the same endpoint
    assert _rendezvous_id(tmp_path, job, MASTER_PORT="29501") != first
    # a scheduler's job id is the same on every machine whatever the arguments, and new for each job
    slurm = _rendezvous_id(tmp_path, job, SLURM_JOB_ID="4242")
    assert slurm == _rendezvous_id(tmp_path, other, SLURM_JOB_ID="4242", NODE_RANK="1") == "megatron-lite-4242"
    assert _rendezvous_id(tmp_path, job, PBS_JOBID="77.pbs") == "megatron-lite-77.pbs"
    assert _rendezvous_id(tmp_path, job, RDZV_ID="mine", SLURM_JOB_ID="4242") == "mine"


@pytest.mark.parametrize(
    "env, line",
    [
        ({"NNODES": "two"}, "NNODES=two is not a whole number: set the number of machines, 1 or more"),
        (
            {"NPROC_PER_NODE": "abc"},
            "NPROC_PER_NODE=abc is not a whole number: set the ranks per machine, 1 or more, or gpu (one rank per "
            "visible GPU)",
        ),
        ({"NODE_RANK": "-1"}, "NODE_RANK=-1 is out of range: set this machine's index among NNODES=1, 0 to 0"),
        (
            {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "127.0.0.1"},
            "NODE_RANK=2 is out of range: set this machine's index among NNODES=2, 0 to 1",
        ),
        ({"MASTER_PORT": "99999"}, "MASTER_PORT=99999 is not a TCP port: set one in 1-65535"),
        ({"NNODES": "2"}, "NNODES=2 needs MASTER_ADDR: set it to the first machine's host name or address"),
        ({"RDZV_BACKEND": "foo"}, "RDZV_BACKEND=foo is not accepted: set one of c10d, static"),
        (
            {"RDZV_TIMEOUT": "0"},
            "RDZV_TIMEOUT=0 is out of range: set the seconds the machines wait for each other at the rendezvous, 1 or "
            "more",
        ),
    ],
)
def test_torchrun_script_refuses_a_bad_variable_in_one_line_before_torchrun_starts(env, line):
    """Each reached torchrun as it was: a shell error (`[: two: integer expression expected`), a
    ValueError traceback, or a rendezvous that retried for minutes."""
    r = run_launch_script("torchrun.sh", {"NPROC_PER_NODE": "1", **env})
    assert r.returncode == 2 and r.stderr.splitlines() == [f"launch/torchrun.sh: {line}"], r.stderr


def _torchrun_start(tmp_path: Path, gpus: int, **env: str) -> subprocess.CompletedProcess:
    """launch/torchrun.sh on a machine with ``gpus`` GPUs (as torch counts them), one line for the torchrun
    it would start: its OMP_NUM_THREADS and its arguments."""
    stub = tmp_path / "python"  # the interpreter, but torch's GPU count is `gpus` and torchrun only says how it starts
    stub.write_text(
        "#!/bin/sh\n"
        'case "$1 $2" in\n'
        f'  "-c "*torch.cuda*) echo {gpus}; exit {0 if gpus else 1};;\n'
        '  "-m megatron_lite.launcher.torchrun") shift 2\n'
        '    echo "OMP_NUM_THREADS=${OMP_NUM_THREADS-unset} $*"; exit 0;;\n'
        "esac\n"
        f'exec {sys.executable} "$@"\n'
    )
    stub.chmod(0o755)
    return run_launch_script("torchrun.sh", {"PYTHON": str(stub), **env})


@pytest.mark.parametrize(
    "gpus, nproc, threads",
    [(1, "gpu", "unset"), (4, "gpu", "1"), (4, "1", "unset"), (0, "2", "1")],
)
def test_torchrun_script_sets_one_thread_per_rank_only_for_several_ranks_on_a_machine(
    tmp_path, monkeypatch, gpus, nproc, threads
):
    """Several ranks on a machine get one thread each (torchrun's default); NPROC_PER_NODE=gpu on a
    one-GPU machine is one rank, left every core as torchrun leaves it. `gpu` reaches torchrun as the
    count it stands for."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    r = _torchrun_start(tmp_path, gpus, NPROC_PER_NODE=nproc)
    ranks = gpus if nproc == "gpu" else int(nproc)
    assert r.returncode == 0 and r.stdout.startswith(f"OMP_NUM_THREADS={threads} --standalone "), r.stdout + r.stderr
    assert f" --nproc_per_node={ranks} " in r.stdout, r.stdout
    monkeypatch.setenv("OMP_NUM_THREADS", "6")  # the user's own setting stands
    assert _torchrun_start(tmp_path, gpus, NPROC_PER_NODE=nproc).stdout.startswith("OMP_NUM_THREADS=6 ")


def test_torchrun_script_with_gpu_ranks_and_no_gpu_refuses_naming_cpu_ranks(tmp_path):
    r = _torchrun_start(tmp_path, 0, NPROC_PER_NODE="gpu")
    assert r.returncode == 2 and r.stdout == "" and "launch/torchrun.sh: no CUDA device here" in r.stderr, r.stderr
    assert "NPROC_PER_NODE=<ranks>" in r.stderr


def test_torchrun_script_names_a_python_that_is_not_there():
    r = run_launch_script("torchrun.sh", {"PYTHON": "no-such-python3"})
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "launch/torchrun.sh: PYTHON=no-such-python3 is not a command here: set PYTHON to the interpreter with "
        "megatron-lite installed"
    ], r.stderr


@pytest.mark.parametrize(("backend", "conf", "waited"), [
    ("c10d", "join_timeout=7,timeout=9", "7"),
    ("static", "join_timeout=7,timeout=9", "9"),
    ("static", "", "600"),
])  # fmt: skip
def test_a_rendezvous_timeout_names_the_seconds_its_backend_waited(backend, conf, waited):
    """c10d waits ``join_timeout``, static its TCPStore's ``timeout`` (600 s by default)."""
    argv = ["--nnodes=2", f"--rdzv_backend={backend}", "--rdzv_endpoint=h:1", f"--rdzv_conf={conf}", "x.py"]
    assert f" timed out after {waited} s before --nnodes=2 machines joined: " in rendezvous_timeout_message(argv)


def _ipv6_loopback() -> bool:
    """Whether ::1 can be bound here: not where IPv6 is off (no ::1) or absent (no AF_INET6 socket)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_torchrun_script_refuses_a_port_in_use_on_the_rendezvous_machine_naming_its_holder(tmp_path):
    """The machine that hosts the rendezvous, its MASTER_PORT held by another process: torchrun's c10d
    store could not listen there, so it joined the holder as a client and waited on a server that is no
    store. The machines that only connect to the port do not test it."""
    holders = [(socket.AF_INET, "127.0.0.1")] + ([(socket.AF_INET6, "::1")] if _ipv6_loopback() else [])
    for family, address in holders:
        with socket.socket(family) as held:
            held.bind((address, 0))
            held.listen()
            port = str(held.getsockname()[1])
            job = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            static_host = {"RDZV_BACKEND": "static", "MASTER_ADDR": "192.0.2.1"}  # static: NODE_RANK=0 serves it
            for host in ({"NODE_RANK": "0"}, {"NODE_RANK": "0", **static_host}):
                r = _torchrun_start(tmp_path, 0, **{**job, **host})
                assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
                (line,) = r.stderr.splitlines()
                assert line.startswith(
                    f"launch/torchrun.sh: MASTER_PORT={port} is in use on this machine, which hosts the rendezvous "
                    f"(held by pid {os.getpid()}: "
                ), line
                assert line.endswith("): set MASTER_PORT to a free port, the same on every machine"), line
            for client in ({"NODE_RANK": "1"}, {"NODE_RANK": "0", "MASTER_ADDR": "192.0.2.1"}):  # 192.0.2.1: not here
                r = _torchrun_start(tmp_path, 0, **{**job, **client})
                assert r.returncode == 0 and " --rdzv_endpoint=" in r.stdout, r.stdout + r.stderr  # torchrun starts


def test_a_port_whose_last_connection_lingers_in_time_wait_is_free():
    """A job restarted on its port: the closed store's connections stay in TIME_WAIT for a minute, and the
    next store binds anyway (SO_REUSEADDR), so the check must not refuse the port."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store's, whose connections inherit it
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            served, _ = listener.accept()
            served.close()  # the server's side closes first: its end of the connection enters TIME_WAIT
            client.recv(1)
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # the lingering connection is there: a bind without SO_REUSEADDR fails
    check_port_free(port)
