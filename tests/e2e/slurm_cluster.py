"""A real two-node SLURM cluster on this machine, for tests: Debian's slurmctld, slurmd and munge.

Everything lives in one temporary folder: slurm.conf, state, logs, pid files and a private munged
(its own socket, so a system munged, if any, is left alone). Two emulated nodes, ``node1`` and
``node2``, are two slurmd processes (Debian's SLURM is built with multiple-slurmd support) on
127.0.0.1 with their own ports. Their names resolve through a hosts file bind-mounted over
/etc/hosts inside a private mount namespace (``unshare --mount``) that the daemons, and so every
job they start, live in; the machine's own /etc/hosts is not touched. Ports are picked free at
start, so two clusters never collide. The daemons are stopped by their pids, never by name.

Needs root (slurmd runs jobs as root here, ``unshare``, munged as user munge). The fixture skips
only when the packages are missing (``.ci/run`` installs them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel", "unshare")
NODES = ("node1", "node2")
CPUS_PER_NODE = 8  # declared, not detected (SlurmdParameters=config_overrides)


def missing_tools() -> list[str]:
    """The programs this fixture needs that are not installed."""
    found = {name: shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") for name in DAEMONS}
    return [name for name, path in found.items() if path is None]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _slurm_conf(root: Path, host: str, ctld_port: int, node_ports: list[int]) -> str:
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={CPUS_PER_NODE} "
        "RealMemory=8000 State=UNKNOWN"
        for name, port in zip(NODES, node_ports)
    )
    return f"""ClusterName=testcluster
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=5
KillWait=5
StateSaveLocation={root}/spool/ctld
SlurmdSpoolDir={root}/spool/d-%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmdParameters=config_overrides
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class SlurmCluster:
    """A running two-node cluster; :attr:`env` is the environment for its clients (sbatch, ...)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pid_files = [root / "munge" / "munged.pid", root / "run" / "slurmctld.pid"]
        self.pid_files += [root / "run" / f"slurmd-{n}.pid" for n in NODES]

    def start(self) -> None:
        for sub in ("spool/ctld", "run", "log", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        host = socket.gethostname().split(".")[0]
        ctld, *node_ports = _free_ports(1 + len(NODES))
        self.conf.write_text(_slurm_conf(self.root, host, ctld, node_ports))
        hosts = self.root / "hosts"
        hosts.write_text(Path("/etc/hosts").read_text() + f"\n127.0.0.1 {' '.join(NODES)}\n")
        daemons = [f"slurmctld -f {self.conf}"] + [f"slurmd -f {self.conf} -N {n}" for n in NODES]
        script = f"mount --bind {hosts} /etc/hosts && " + " && ".join(daemons)
        subprocess.run(["unshare", "--mount", "--propagation", "slave", "sh", "-c", script], check=True, timeout=60)
        self._wait_idle()

    def _start_munge(self) -> None:
        munge_dir = self.root / "munge"
        if not Path("/etc/munge/munge.key").is_file():
            subprocess.run(["mungekey", "--create"], check=True, timeout=60)
        shutil.chown(munge_dir, "munge", "munge")
        os.chmod(self.root, 0o755)  # munged runs as munge and must reach its folder
        files = {"socket": "munge.socket", "pid-file": "munged.pid", "log-file": "munged.log", "seed-file": "seed"}
        options = [f"--{option}={munge_dir / name}" for option, name in files.items()]  # all private
        subprocess.run(["runuser", "-u", "munge", "--", "munged", *options], check=True, timeout=60)

    def _wait_idle(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            if out.returncode == 0 and all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes not idle after {timeout_s} s: {out.stdout}{out.stderr}\n{self.logs()}")

    def logs(self) -> str:
        """The daemons' logs (for failure messages)."""
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*.log")))

    def cancel_jobs(self, timeout_s: float = 30.0) -> None:
        """scancel every job and wait until none is left: a test that gave up on its job (a timeout)
        must not leave its steps running on after the daemons (slurmstepd outlives slurmd)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
            jobs = out.stdout.split()
            if out.returncode or not jobs:
                return
            subprocess.run(["scancel", "--full", *jobs], env=self.env, capture_output=True)
            time.sleep(1)

    def stop(self) -> None:
        """Cancel the jobs left, SIGTERM each daemon by its pid file, then wait for them to go."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.cancel_jobs()
        pids = [int(p.read_text()) for p in self.pid_files if p.is_file()]
        for pid in reversed(pids):  # slurmds first, munged last
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
            time.sleep(0.2)


@pytest.fixture(scope="module", name="slurm_cluster")
def slurm_cluster_fixture() -> Iterator[SlurmCluster]:
    """A started two-node cluster in a fresh temporary folder; stopped (by pid) afterwards."""
    missing = missing_tools()
    if missing:
        need = ", ".join(missing)
        pytest.skip(f"the SLURM test cluster needs {need}: apt-get install slurmctld slurmd slurm-client munge")
    root = Path(tempfile.mkdtemp(prefix="slurm-test-"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
