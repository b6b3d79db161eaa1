"""Where this process sits in a launch: torchrun's or SLURM's variables -> :class:`DistEnv`.

Pure functions, no process group and no torch: :func:`resolve_env` reads the launcher's variables,
:func:`parse_nodelist` expands a SLURM hostlist, :func:`slurm_job_port` is a job's own rendezvous
port, :func:`tcp_port` refuses a value that is no port and :func:`check_master_resolves` refuses a
rendezvous host that does not resolve, in seconds.
``parallel/mesh.py: init_distributed`` joins the process group they describe.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from megatron_lite.errors import UserError

DEFAULT_MASTER_PORT = 29500  # torchrun's default
# SLURM jobs without MASTER_PORT: one port per job, so two jobs sharing a node never share a
# rendezvous (launch/*.sbatch compute the same: 20000 + SLURM_JOB_ID % 10000, below the ephemeral range)
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000
RESOLVE_TIMEOUT_S = 20.0  # a resolver that hangs is as fatal as one that says "unknown host"


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the launch: from torchrun, SLURM srun, or nothing (one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    launcher: str = "none"  # "torchrun" | "slurm" | "none"
    local_world_size: int = 1  # ranks on this machine (they share its CPU cores)


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist, e.g. ``"gpu[01-03,7],login1"`` -> gpu01 gpu02 gpu03 gpu7 login1
    (zero padding follows each range's own width, as in SLURM)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    return [host for item in items if item for host in _expand_hostlist_item(item)]


def _expand_hostlist_item(item: str) -> list[str]:
    m = re.match(r"([^\[]*)\[([^\]]*)\](.*)", item)
    if m is None:
        return [item]
    prefix, ranges, rest = m.groups()
    hosts = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        for n in range(int(lo), int(hi or lo) + 1):
            hosts += [f"{prefix}{n:0{len(lo)}d}{tail}" for tail in _expand_hostlist_item(rest)]
    return hosts


def _scontrol_hostnames(nodelist: str) -> list[str]:
    """``scontrol show hostnames`` (what the sbatch templates use), or our parser without SLURM."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return parse_nodelist(nodelist)
    return out.stdout.split() if out.returncode == 0 and out.stdout.strip() else parse_nodelist(nodelist)


def _int_env(environ: Mapping[str, str], name: str, default: str | None = None) -> int:
    value = environ.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def tcp_port(name: str, value: str) -> int:
    """``value`` as a TCP port (1-65535), else a :class:`UserError` naming ``name`` and the value."""
    port = int(value) if re.fullmatch(r"[0-9]+", value.strip()) else 0
    if not 0 < port < 2**16:
        raise UserError(f"{name}={value} is not a TCP port: set one in 1-65535")
    return port


def resolve_env(environ: Mapping[str, str], hostnames: Callable[[str], list[str]] = parse_nodelist) -> DistEnv:
    """Read the launcher's variables into a :class:`DistEnv` (pure: ``hostnames`` expands a nodelist).

    torchrun (RANK and WORLD_SIZE set) wins over SLURM, so ``srun torchrun ...`` is torchrun. A bare
    ``srun python ...`` gives SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; its master is MASTER_ADDR
    if exported, else the first host of SLURM_JOB_NODELIST, and MASTER_PORT or the job's own port
    (:func:`slurm_job_port`). Those variables describe a rank only inside a job step (srun sets
    SLURM_STEP_ID): the batch script of a 4-task job also has SLURM_PROCID=0 and SLURM_NTASKS=4, and a
    ``megatron-lite train`` run there is one process, not rank 0 waiting for 3 ranks that never come.
    """
    default_port = DEFAULT_MASTER_PORT
    if "SLURM_JOB_ID" in environ and "RANK" not in environ:
        default_port = slurm_job_port(environ["SLURM_JOB_ID"])
    port = tcp_port("environment variable MASTER_PORT", environ.get("MASTER_PORT", str(default_port)))
    in_step = "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        if "MASTER_ADDR" not in environ:
            raise UserError(
                "RANK and WORLD_SIZE are set but MASTER_ADDR is not: launch with torchrun (which sets all three), "
                "or set MASTER_ADDR to rank 0's host name too"
            )
        rank, world = _int_env(environ, "RANK"), _int_env(environ, "WORLD_SIZE")
        local = _int_env(environ, "LOCAL_RANK", "0")
        local_world = _int_env(environ, "LOCAL_WORLD_SIZE", "1")
        addr, launcher = environ["MASTER_ADDR"], "torchrun"
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and in_step:
        rank, world = _int_env(environ, "SLURM_PROCID"), _int_env(environ, "SLURM_NTASKS")
        local = _int_env(environ, "SLURM_LOCALID", "0")
        # "2(x3)": 2 tasks on each of 3 nodes; the first count is this layout's per-node size
        per_node = re.match(r"\d+", environ.get("SLURM_STEP_TASKS_PER_NODE", environ.get("SLURM_TASKS_PER_NODE", "1")))
        local_world = int(per_node.group()) if per_node else 1
        addr, launcher = environ.get("MASTER_ADDR") or _first_host(environ, hostnames), "slurm"
    else:
        _refuse_half_torchrun_env(environ)
        return DistEnv()
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} is outside world size {world} ({launcher} environment)")
    if not 0 <= local < world:
        raise UserError(
            f"local rank {local} is outside world size {world} ({launcher} environment: LOCAL_RANK or "
            "SLURM_LOCALID); launch with torchrun or srun, which set it"
        )
    return DistEnv(rank, world, local, addr, port, launcher, local_world)


def _refuse_half_torchrun_env(environ: Mapping[str, str]) -> None:
    """RANK or WORLD_SIZE set alone (by hand, or left over from another launch) outside an srun step:
    this process would train alone, as if the launch had one rank. WORLD_SIZE=1 alone is one process."""
    given = [name for name in ("RANK", "WORLD_SIZE") if name in environ]
    if len(given) != 1 or environ.get("WORLD_SIZE") == "1":
        return
    name, other = given[0], "WORLD_SIZE" if given[0] == "RANK" else "RANK"
    raise UserError(
        f"environment variable {name}={environ[name]} is set but {other} is not, so this process would train "
        f"alone: launch the ranks with torchrun (launch/torchrun.sh), which sets RANK, WORLD_SIZE, LOCAL_RANK "
        f"and MASTER_ADDR, or unset {name} to train as one process"
    )


def slurm_job_port(job_id: str) -> int:
    """The rendezvous port of SLURM job ``job_id`` when MASTER_PORT is not set: 20000 + id % 10000,
    as the sbatch templates compute it (29500 for an id that is not a number)."""
    try:
        return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN
    except ValueError:
        return DEFAULT_MASTER_PORT


def _first_host(environ: Mapping[str, str], hostnames: Callable[[str], list[str]]) -> str:
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    hosts = hostnames(nodelist) if nodelist else []
    if not hosts:
        raise UserError(
            "SLURM run without SLURM_JOB_NODELIST or MASTER_ADDR: cannot find the master host; run it in an sbatch "
            "or salloc allocation (which sets SLURM_JOB_NODELIST), or set MASTER_ADDR to the first node's host name"
        )
    return hosts[0]


def check_master_resolves(host: str, port: int, timeout_s: float = RESOLVE_TIMEOUT_S) -> None:
    """Raise a :class:`UserError` naming ``host`` unless ``socket.getaddrinfo`` resolves it within
    ``timeout_s``: an unknown rendezvous host fails in seconds, not after the collective timeout."""
    outcome: list[BaseException | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            outcome.append(None)
        except (OSError, UnicodeError) as e:  # UnicodeError: no host name (an empty or 64+ character label)
            outcome.append(e)

    thread = threading.Thread(target=lookup, daemon=True)  # getaddrinfo itself has no timeout
    thread.start()
    thread.join(timeout_s)
    why = f"no answer within {timeout_s:g} s" if not outcome else outcome[0]
    if why is not None:
        raise UserError(
            f"rendezvous host {host!r} (MASTER_ADDR) does not resolve: {why}; set MASTER_ADDR to the "
            "first node's name or address (in SLURM jobs: the first host of SLURM_JOB_NODELIST)"
        )
