"""Rank topology: ``ParallelDims`` -> one named DeviceMesh ("pp", "dp", "tp"), and joining the world.

Rank layout (picotron's ``arange(world).view(pp, dp, tp)``): TP is innermost, so a TP group is a
run of neighbouring ranks (on one node, where its per-layer collectives need NVLink); PP is
outermost, so pipeline stages span nodes and only exchange activations::

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

The pure functions (:func:`rank_coordinates`, :func:`group_ranks`, :func:`coordinate_table`) need
no process group. :class:`ParallelMesh` is the one object the rest of the code receives; in a single
process without a launcher it needs no process group either: its groups are ``None`` (size 1) and
every collective is a no-op. Where this process sits in the launch (torchrun, SLURM) is read by
``launcher/env.py`` (:func:`resolve_env`, re-exported here); :func:`init_distributed` joins it.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Imported before any process group forms: its functions take ``group=group.WORLD`` as a default,
# evaluated at import, so importing it later (torch does, lazily) pins the world group for the life
# of the process and no rank could free its gloo threads (:func:`shutdown_distributed`).
import torch.distributed.nn.functional  # noqa: F401  isort: skip
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_lite.amounts import counted
from megatron_lite.errors import UserError
from megatron_lite.launcher.env import (  # noqa: F401  (re-exported: the launch env's old home)
    DEFAULT_MASTER_PORT,
    DistEnv,
    _scontrol_hostnames,
    check_master_resolves,
    parse_nodelist,
    resolve_env,
    slurm_job_port,
)
from megatron_lite.launcher.fail_fast import agree_before_joining
from megatron_lite.launcher.orphan import exit_with_launcher
from megatron_lite.parallel.comm import Group

MESH_DIMS = ("pp", "dp", "tp")
# Read by the CUDA driver when the context is created, so set before torch touches the GPU. One
# hardware work queue makes kernels start in issue order: a TP collective issued before the GEMM
# it overlaps really runs first (Megatron requires it for TP/SP communication overlap).
CUDA_ENV_DEFAULTS = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
# A rank whose own setup failed waits this long at the rendezvous for the other ranks to come and
# hear its error (one launcher starts them all within seconds), then leaves with its own message.
ERROR_WAIT_S = 60.0


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
            raise UserError(f"parallel.vp={self.vp} needs pipeline parallelism: set parallel.pp > 1 or parallel.vp=1")

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
                    f"parallel.tp={tp} x parallel.pp={pp} = {tp * pp} does not divide world size {world_size}: "
                    f"choose parallel.tp and parallel.pp whose product divides {world_size} (parallel.dp is "
                    "world size / (tp x pp))"
                )
            dp = world_size // (tp * pp)
        dims = cls(tp=tp, pp=pp, dp=dp, vp=vp)
        if dims.world_size != world_size:
            raise UserError(
                f"parallel.tp={tp} x parallel.pp={pp} x parallel.dp={dp} = {dims.world_size} does not equal "
                f"world size {world_size}: change the layout (leave parallel.dp empty to take what tp x pp "
                f"leave) or launch {counted(dims.world_size, 'rank')}"
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
                    f"parallel.tp={dims.tp} x parallel.pp={dims.pp} x parallel.dp={dims.dp} = {dims.world_size} "
                    "ranks, but this is a single process: launch with torchrun or srun, or set parallel.tp, "
                    "parallel.pp and parallel.dp to 1"
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


def init_distributed(
    timeout_s: float, environ: Mapping[str, str] | None = None, setup_error: Exception | None = None
) -> DistEnv:
    """Join the process group described by the launch environment (no-op for a single process).

    ``setup_error``: what this rank's checks before joining raised (its config), or None. It is not
    raised alone: every rank meets at the rendezvous store first and, if any rank brought an error
    (or has fewer GPUs than local ranks), all raise the same one, naming that rank
    (:func:`~megatron_lite.launcher.fail_fast.agree_before_joining`). In a single process it is
    raised as it is.

    Under torchrun the rank asks for SIGTERM when torchrun dies (:func:`exit_with_launcher`). The
    master host must resolve (:func:`check_master_resolves`), never falling back to localhost.
    :data:`CUDA_ENV_DEFAULTS` are set (unless already in the environment) before CUDA is touched, so
    call this before anything else uses the GPU. Backend NCCL on CUDA (after selecting the GPU from
    LOCAL_RANK / SLURM_LOCALID), gloo on CPU.
    ``timeout_s`` bounds every collective, so a rank that dies takes the others down in
    ``timeout_s`` instead of hanging them. Call it once, before :meth:`ParallelMesh.build`.
    """
    environ = os.environ if environ is None else environ
    try:  # a rank that cannot meet the others reports the error it found first
        env = resolve_env(environ, hostnames=_scontrol_hostnames)
        if env.launcher != "none" and not dist.is_initialized():
            exit_with_launcher(environ)  # a SIGKILLed torchrun takes its ranks with it (SIGTERM: save and exit)
            check_master_resolves(env.master_addr, env.master_port)
    except UserError:
        if setup_error is None:
            raise
        raise setup_error from None
    if env.launcher == "none" or dist.is_initialized():
        if setup_error is not None:
            raise setup_error
        return env
    for name, value in CUDA_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    backend, error = "gloo", setup_error
    if torch.cuda.is_available():
        backend, gpus = "nccl", torch.cuda.device_count()
        if env.local_rank < gpus:
            torch.cuda.set_device(env.local_rank)
        elif error is None:
            error = UserError(
                f"local rank {env.local_rank} but only {counted(gpus, 'GPU')} on this node (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): launch at most {counted(gpus, 'rank')} per node "
                "(torchrun --nproc_per_node, PROCS_PER_NODE, --gpus-per-node)"
            )
    timeout = timedelta(seconds=timeout_s)
    store = _meet(env, timeout, error)
    store = dist.PrefixStore("default_pg", store)  # what init_process_group(init_method=...) uses
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    return env


def _meet(env: DistEnv, timeout: timedelta, error: Exception | None) -> dist.Store:
    """The rendezvous store (hosted by rank 0, or by torchrun's agent), once every rank has come and
    none brought an error (:func:`agree_before_joining`). A rank with an error of its own waits for
    the others at most :data:`ERROR_WAIT_S`, then raises it alone."""
    wait = timeout if error is None else min(timeout, timedelta(seconds=ERROR_WAIT_S))
    url = f"tcp://{env.master_addr}:{env.master_port}?rank={env.rank}&world_size={env.world_size}"
    hosts_store = env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"  # as rendezvous()
    try:
        store, _, _ = next(dist.rendezvous(url, timeout=wait))
        agree_before_joining(store, env.rank, env.world_size, error, hosts_store)
    except dist.DistError:
        if error is None:
            raise
        raise error from None  # the other ranks never came to hear it
    store.set_timeout(timeout)
    return store


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
