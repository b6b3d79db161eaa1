"""Rank topology: ``ParallelDims`` -> one named DeviceMesh ("pp", "dp", "tp"), and the launch env.

Rank layout (picotron's ``arange(world).view(pp, dp, tp)``): TP is innermost, so a TP group is a
run of neighbouring ranks (on one node, where its per-layer collectives need NVLink); PP is
outermost, so pipeline stages span nodes and only exchange activations::

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

The pure functions (:func:`rank_coordinates`, :func:`group_ranks`, :func:`coordinate_table`,
:func:`resolve_env`, :func:`parse_nodelist`) need no process group. :class:`ParallelMesh` is the
one object the rest of the code receives; in a single process without a launcher it needs no
process group either: its groups are ``None`` (size 1) and every collective is a no-op.
"""

from __future__ import annotations

import gc
import os
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Imported before any process group forms: its functions take ``group=group.WORLD`` as a default,
# evaluated at import, so importing it later (torch does, lazily) pins the world group for the life
# of the process and no rank could free its gloo threads (:func:`shutdown_distributed`).
import torch.distributed.nn.functional  # noqa: F401  isort: skip
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_lite.errors import UserError
from megatron_lite.launcher.orphan import exit_with_launcher
from megatron_lite.parallel.comm import Group

MESH_DIMS = ("pp", "dp", "tp")
DEFAULT_MASTER_PORT = 29500  # torchrun's default
# SLURM jobs without MASTER_PORT: one port per job, so two jobs sharing a node never share a
# rendezvous (launch/*.sbatch compute the same: 20000 + SLURM_JOB_ID % 10000, below the ephemeral range)
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000
RESOLVE_TIMEOUT_S = 20.0  # a resolver that hangs is as fatal as one that says "unknown host"
# Read by the CUDA driver when the context is created, so set before torch touches the GPU. One
# hardware work queue makes kernels start in issue order: a TP collective issued before the GEMM
# it overlaps really runs first (Megatron requires it for TP/SP communication overlap).
CUDA_ENV_DEFAULTS = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"parallel.{name}={value!r} must be a positive integer")


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of each parallel dimension; ``tp * pp * dp`` is the world size. ``vp`` is the number
    of virtual pipeline chunks per pp rank (interleaved schedules), not a mesh dimension."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "vp"):
            _positive(name, getattr(self, name))
        if self.vp > 1 and self.pp == 1:
            raise UserError(f"parallel.vp={self.vp} needs pipeline parallelism: set parallel.pp > 1 or vp=1")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @classmethod
    def resolve(cls, world_size: int, tp: int = 1, pp: int = 1, dp: int | None = None, vp: int = 1) -> ParallelDims:
        """Validate a layout against ``world_size``; ``dp=None`` takes what tp x pp leave."""
        _positive("tp", tp)
        _positive("pp", pp)
        if dp is None:
            if world_size % (tp * pp):
                raise UserError(
                    f"tp={tp} x pp={pp} = {tp * pp} does not divide world size {world_size}: choose tp and "
                    f"pp whose product divides {world_size} (dp is world size / (tp x pp))"
                )
            dp = world_size // (tp * pp)
        dims = cls(tp=tp, pp=pp, dp=dp, vp=vp)
        if dims.world_size != world_size:
            raise UserError(
                f"tp={tp} x pp={pp} x dp={dp} = {dims.world_size} does not equal world size {world_size}: "
                f"change the layout or launch {dims.world_size} ranks"
            )
        return dims


def rank_coordinates(rank: int, dims: ParallelDims) -> tuple[int, int, int]:
    """(pp_rank, dp_rank, tp_rank) of global ``rank``."""
    if not 0 <= rank < dims.world_size:
        raise ValueError(f"rank {rank} is outside world size {dims.world_size}")
    return rank // (dims.tp * dims.dp), rank // dims.tp % dims.dp, rank % dims.tp


def group_ranks(rank: int, dims: ParallelDims, dim: str) -> list[int]:
    """Global ranks of ``rank``'s group along mesh dim ``dim`` ("pp", "dp" or "tp"), in group order."""
    pp, dp, tp = rank_coordinates(rank, dims)
    if dim == "tp":
        return [(pp * dims.dp + dp) * dims.tp + t for t in range(dims.tp)]
    if dim == "dp":
        return [(pp * dims.dp + d) * dims.tp + tp for d in range(dims.dp)]
    if dim == "pp":
        return [(p * dims.dp + dp) * dims.tp + tp for p in range(dims.pp)]
    raise ValueError(f"unknown mesh dim {dim!r}; choose one of {MESH_DIMS}")


def coordinate_table(dims: ParallelDims, max_rows: int = 64) -> str:
    """The startup table (printed by rank 0): the layout, then each rank's (pp, dp, tp)."""
    lines = [
        f"world {dims.world_size} = pp {dims.pp} x dp {dims.dp} x tp {dims.tp} (vp {dims.vp}); "
        "rank = (pp_rank * dp + dp_rank) * tp + tp_rank",
        "rank    pp    dp    tp",
    ]
    for rank in range(min(dims.world_size, max_rows)):
        pp, dp, tp = rank_coordinates(rank, dims)
        lines.append(f"{rank:4d}  {pp:4d}  {dp:4d}  {tp:4d}")
    if dims.world_size > max_rows:
        lines.append(f"... {dims.world_size - max_rows} more ranks")
    return "\n".join(lines)


class ParallelMesh:
    """This rank's topology: dims, coordinate, and one process group per purpose.

    ``tp_group`` / ``dp_group`` / ``pp_group`` are the DeviceMesh's groups, or ``None`` in a
    single process (no process group), which every collective in ``parallel/`` treats as size 1.
    Build it with :meth:`build`; pass it explicitly, never through a global.
    """

    def __init__(self, dims: ParallelDims, device_mesh: DeviceMesh | None) -> None:
        self.dims, self.device_mesh = dims, device_mesh
        self.rank = dist.get_rank() if device_mesh is not None else 0
        self.coordinate = rank_coordinates(self.rank, dims)  # (pp, dp, tp)

    @classmethod
    def build(cls, dims: ParallelDims) -> ParallelMesh:
        """One DeviceMesh of shape (pp, dp, tp) over the initialised world, or none in a single
        process. Checks the layout against the world size before creating any group."""
        if not dist.is_initialized():
            if dims.world_size != 1:
                raise UserError(
                    f"tp={dims.tp} x pp={dims.pp} x dp={dims.dp} = {dims.world_size} ranks, but this is a single "
                    "process: launch with torchrun or srun, or set tp=pp=dp=1"
                )
            return cls(dims, None)
        ParallelDims.resolve(dist.get_world_size(), dims.tp, dims.pp, dims.dp, dims.vp)
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        device_mesh = init_device_mesh(device_type, (dims.pp, dims.dp, dims.tp), mesh_dim_names=MESH_DIMS)
        mesh = cls(dims, device_mesh)
        for dim in MESH_DIMS:  # torch builds the groups; make sure they are the layout we document
            got = dist.get_process_group_ranks(mesh.group(dim))
            if got != mesh.ranks(dim):
                raise RuntimeError(f"DeviceMesh {dim} group of rank {mesh.rank} is {got}, expected {mesh.ranks(dim)}")
        return mesh

    def group(self, dim: str) -> Group:
        """The process group along ``dim`` ("pp", "dp" or "tp"); None in a single process."""
        return None if self.device_mesh is None else self.device_mesh.get_group(dim)

    def ranks(self, dim: str) -> list[int]:
        """Global ranks of this rank's group along ``dim``."""
        return group_ranks(self.rank, self.dims, dim)

    @property
    def tp_group(self) -> Group:
        return self.group("tp")

    @property
    def dp_group(self) -> Group:
        return self.group("dp")

    @property
    def pp_group(self) -> Group:
        return self.group("pp")

    @property
    def pp_rank(self) -> int:
        return self.coordinate[0]

    @property
    def dp_rank(self) -> int:
        return self.coordinate[1]

    @property
    def tp_rank(self) -> int:
        return self.coordinate[2]

    @property
    def tp_size(self) -> int:
        return self.dims.tp

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def pp_size(self) -> int:
        return self.dims.pp


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
    port = _int_env(environ, "MASTER_PORT", str(default_port))
    in_step = "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        if "MASTER_ADDR" not in environ:
            raise UserError("RANK and WORLD_SIZE are set but MASTER_ADDR is not: launch with torchrun")
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
        return DistEnv()
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} is outside world size {world} ({launcher} environment)")
    return DistEnv(rank, world, local, addr, port, launcher, local_world)


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
        raise UserError("SLURM run without SLURM_JOB_NODELIST or MASTER_ADDR: cannot find the master host")
    return hosts[0]


def init_distributed(timeout_s: float, environ: Mapping[str, str] | None = None) -> DistEnv:
    """Join the process group described by the launch environment (no-op for a single process).

    Under torchrun the rank asks for SIGTERM when torchrun dies (:func:`exit_with_launcher`). The
    master host must resolve (:func:`check_master_resolves`), never falling back to localhost.
    :data:`CUDA_ENV_DEFAULTS` are set (unless already in the environment) before CUDA is touched, so
    call this before anything else uses the GPU. Backend NCCL on CUDA (after selecting the GPU from
    LOCAL_RANK / SLURM_LOCALID), gloo on CPU.
    ``timeout_s`` bounds every collective, so a rank that dies takes the others down in
    ``timeout_s`` instead of hanging them. Call it once, before :meth:`ParallelMesh.build`.
    """
    environ = os.environ if environ is None else environ
    env = resolve_env(environ, hostnames=_scontrol_hostnames)
    if env.launcher == "none" or dist.is_initialized():
        return env
    exit_with_launcher(environ)  # a SIGKILLed torchrun takes its ranks with it (SIGTERM: save and exit)
    check_master_resolves(env.master_addr, env.master_port)
    for name, value in CUDA_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    backend = "gloo"
    if torch.cuda.is_available():
        if env.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {env.local_rank} but only {torch.cuda.device_count()} GPUs on this node")
        torch.cuda.set_device(env.local_rank)
        backend = "nccl"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return env


def shutdown_distributed() -> int:
    """End this rank's part in the world: wait for every rank, destroy every process group, and let
    the gloo worker threads exit while the interpreter is still alive. No-op without a process group.

    A gloo worker thread drops a finished collective's tensors only after the caller was woken; if
    that happens once the interpreter is finalizing, the thread dies taking the GIL and a rank that
    finished cleanly aborts ("terminate called without an active exception"). A backend joins its
    threads when its last reference goes, so drop what holds groups (trainer, model, mesh) first;
    the collection here frees the rest. Returns how many gloo threads are still alive (0 unless
    something still holds a group; on Linux, else 0).
    """
    if not dist.is_initialized():
        return 0
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
    return len(gloo_threads())


def gloo_threads() -> list[str]:
    """Names of this process's gloo threads (Linux: read from /proc; elsewhere an empty list)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return []
    names = []
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread exited while we listed
            continue
    return [n for n in names if "gloo" in n]


def check_master_resolves(host: str, port: int, timeout_s: float = RESOLVE_TIMEOUT_S) -> None:
    """Raise a :class:`UserError` naming ``host`` unless ``socket.getaddrinfo`` resolves it within
    ``timeout_s``: an unknown rendezvous host fails in seconds, not after the collective timeout."""
    outcome: list[BaseException | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            outcome.append(None)
        except OSError as e:
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
