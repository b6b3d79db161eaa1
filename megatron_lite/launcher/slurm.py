"""``megatron-lite launch slurm``: fill in ``launch/train.sbatch`` for one job and submit it.

The shipped templates (``launch/train.sbatch``, bare metal; ``launch/train_container.sbatch``,
pyxis/enroot) are complete sbatch scripts. Rendering changes only two kinds of lines, so the
rendered script reads like the template:

- ``#SBATCH --key=value`` directives: replaced, dropped (``--gpus-per-node`` for ``--cpu`` jobs)
  or added after the last one (``--partition``, ``--account``);
- the variables at the top, ``NAME=${NAME:-default}`` or ``NAME=()``: set to the job's value,
  shell-quoted (``TRAIN_ARGS`` becomes ``(--config FILE section.key=value ...)``).

Before anything is written the layout is checked for ``nodes x procs_per_node`` ranks with
``megatron_lite.plan``, so a layout that cannot fill the job fails here, not in the queue.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_lite.amounts import byte_size, counted
from megatron_lite.errors import UserError
from megatron_lite.launcher.env import tcp_port
from megatron_lite.launcher.launch_vars import whole_number

if TYPE_CHECKING:
    from megatron_lite.config import Config


def _template_dir() -> Path:
    """Where the sbatch templates are: ``megatron_lite/launcher/templates/`` in a wheel install, else
    ``launch/`` of the source checkout (editable install). ``setup.py`` ships that folder's
    ``*.sbatch`` as the wheel's copy: one source, nothing to keep in sync."""
    here = Path(__file__).resolve()
    shipped = here.parent / "templates"
    return shipped if shipped.is_dir() else here.parents[2] / "launch"


TEMPLATE_DIR = _template_dir()
TEMPLATES = {"bare": "train.sbatch", "container": "train_container.sbatch"}
_DIRECTIVE = re.compile(r"^#SBATCH\s+--([\w-]+)(?:=(.*))?$")
_VARIABLE = re.compile(r"^([A-Z][A-Z0-9_]*)=(\$\{\1:-[^}]*\}|\(\))(?:\s+(#.*))?$")


@dataclass(frozen=True)
class SlurmJob:
    """One training job as ``megatron-lite launch slurm`` describes it."""

    config: str | None
    """The run's YAML config (None: defaults and overrides only, as ``megatron-lite train``)."""
    nodes: int
    procs_per_node: int
    gpus_per_node: int | None = 8
    """GPUs to request per node; None (``--cpu``): none, the ranks are CPU processes (gloo)."""
    overrides: list[str] = field(default_factory=list)
    launcher: str = "torchrun"
    cpus_per_rank: int = 8
    python: str = "python3"
    master_port: int | None = None
    """Rendezvous port; None: the template's default, a port of the job's own (20000 + job id % 10000),
    so two jobs sharing a node never meet at one port."""
    rdzv_timeout: int | None = None
    """Seconds torchrun's nodes wait for each other at the rendezvous; None: the template's (600, or the
    RDZV_TIMEOUT of the job's environment)."""
    job_name: str = "megatron-lite"
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    container_image: str | None = None
    container_mounts: str | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def template(self) -> str:
        return TEMPLATES["container" if self.container_image else "bare"]


def sbatch_directives(job: SlurmJob, output: str) -> dict[str, str | None]:
    """The ``#SBATCH`` values of ``job`` (None: drop the template's line)."""
    tasks = 1 if job.launcher == "torchrun" else job.procs_per_node
    directives: dict[str, str | None] = {
        "job-name": job.job_name,
        "nodes": str(job.nodes),
        "ntasks-per-node": str(tasks),
        "gpus-per-node": str(job.gpus_per_node) if job.gpus_per_node else None,  # None drops the line
        "cpus-per-task": str(job.cpus_per_rank * job.procs_per_node // tasks),
        "output": output,
    }
    for key in ("time", "partition", "account"):  # unset: the template's line (or the cluster's default)
        if getattr(job, key) is not None:
            directives[key] = getattr(job, key)
    for key, value in directives.items():
        if value is not None and (not value or re.search(r"\s", value)):
            source = "log.dir (the job's output file lies under it)" if key == "output" else f"--{key}"
            problem = "is empty" if not value else "holds a space"
            raise UserError(
                f"sbatch --{key}={value!r} {problem}, which sbatch cannot take: give {source} a value without spaces"
            )
    return directives


def template_variables(job: SlurmJob) -> dict[str, str | list[str]]:
    """The values of the variables at the top of the template."""
    variables: dict[str, str | list[str]] = {
        "PYTHON": job.python,
        "LAUNCHER": job.launcher,
        "PROCS_PER_NODE": str(job.procs_per_node),
        "TRAIN_ARGS": (["--config", job.config] if job.config else []) + job.overrides,
    }
    if job.master_port is not None:
        variables["MASTER_PORT"] = str(job.master_port)
    if job.rdzv_timeout is not None:
        variables["RDZV_TIMEOUT"] = str(job.rdzv_timeout)
    if job.container_image:
        variables["CONTAINER_IMAGE"] = job.container_image
        if job.container_mounts:
            variables["CONTAINER_MOUNTS"] = job.container_mounts
    return variables


def _shell(value: str | list[str]) -> str:
    return shlex.quote(value) if isinstance(value, str) else "(" + " ".join(map(shlex.quote, value)) + ")"


def render_sbatch(template: str, directives: dict[str, str | None], variables: dict[str, str | list[str]]) -> str:
    """``template`` with its ``#SBATCH`` lines and top variables set (see the module docstring).
    A variable the template does not define is an error (a template and its renderer disagree)."""
    pending, unset = dict(directives), set(variables)
    out: list[str] = []
    after_directives = 0
    for line in template.splitlines():
        directive, variable = _DIRECTIVE.match(line), _VARIABLE.match(line)
        if directive and directive.group(1) in pending:
            value = pending.pop(directive.group(1))
            if value is None:
                continue
            line = f"#SBATCH --{directive.group(1)}={value}"
        elif variable and variable.group(1) in variables:
            name, comment = variable.group(1), variable.group(3)
            line = f"{name}={_shell(variables[name])}" + (f"  {comment}" if comment else "")
            unset.discard(name)
        out.append(line)
        if directive:
            after_directives = len(out)
    if unset:
        raise ValueError(f"the sbatch template defines no variable {', '.join(sorted(unset))}")
    out[after_directives:after_directives] = [f"#SBATCH --{k}={v}" for k, v in pending.items() if v is not None]
    return "\n".join(out) + "\n"


def submit(script: Path, wait: bool) -> tuple[str, int]:
    """``sbatch --parsable [--wait] script``; returns (job id, sbatch's exit status: with ``wait``,
    the job's). The job id is printed as soon as SLURM accepts the job."""
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), str(script)]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise UserError("sbatch not found: run on a SLURM login node, or use --dry-run to print the script") from None
    job_id = proc.stdout.readline().strip().split(";")[0]
    if job_id:
        print(f"submitted job {job_id}", flush=True)
    proc.communicate()
    if not job_id:
        raise UserError(f"sbatch rejected {script} (exit {proc.returncode}); see its message above")
    return job_id, proc.returncode


def _fills(cfg: Config, tp: int, world_size: int, dp: int | None) -> bool:
    """Whether ``parallel.tp=tp`` with the config's pp and vp and ``dp`` (the parallel.dp the user set,
    or None: what tp x pp leave) fills ``world_size``."""
    from megatron_lite.parallel.mesh import ParallelDims

    try:
        ParallelDims.resolve(world_size, tp, cfg.parallel.pp, dp, cfg.parallel.vp)
    except UserError:
        return False
    return True


def check_tp_within_nodes(cfg: Config, procs_per_node: int, world_size: int, dp: int | None = None) -> None:
    """Refuse a tensor-parallel group that spans nodes. Ranks are numbered node by node and tp is the
    innermost mesh dimension (``parallel/mesh.py``), so each group of ``tp`` consecutive ranks stays on
    one node only when ``tp`` divides the ranks per node; TP's per-layer collectives across nodes run
    at network speed instead of NVLink's. The tp values the error names also fill ``world_size`` with
    the config's pp and ``dp`` (the parallel.dp the user set; None: what tp x pp leave)."""
    from megatron_lite.models.parallelize import tp_values

    tp = cfg.parallel.tp
    if procs_per_node % tp == 0:
        return
    fits = [
        t for t in tp_values(cfg.model, cfg.parallel.sp) if procs_per_node % t == 0 and _fills(cfg, t, world_size, dp)
    ]
    fix = (
        f"set parallel.tp to {' or '.join(map(str, fits))} (pipeline and data parallelism go across nodes), or "
        if fits
        else ""
    )
    raise UserError(
        f"parallel.tp={tp} does not divide the {counted(procs_per_node, 'rank')} per node, so tensor-parallel groups "
        f"would span nodes: {fix}give each node a multiple of {tp} ranks (--gpus-per-node, --procs-per-node)"
    )


def launch_slurm(job: SlurmJob, dry_run: bool = False, wait: bool = False) -> int:
    """Check the layout, render the template for ``job``, then print it or submit it."""
    from megatron_lite.config import load_config
    from megatron_lite.plan import make_plan

    cfg = load_config(job.config, job.overrides)
    dp = cfg.parallel.dp  # as set: the plan resolves it
    plan = make_plan(cfg, job.world_size)
    d = plan.layout.dims
    check_tp_within_nodes(plan.cfg, job.procs_per_node, job.world_size, dp)
    summary = (
        f"layout ok: {counted(job.nodes, 'node')} x {job.procs_per_node} = {counted(d.world_size, 'rank')} = pp "
        f"{d.pp} x dp {d.dp} x tp {d.tp}; about {byte_size(plan.memory_bytes_per_rank, binary=True)} per rank "
        "(megatron-lite plan)"
    )
    template = TEMPLATE_DIR / job.template
    if not template.is_file():
        raise UserError(f"sbatch template {template} not found: reinstall megatron-lite (its wheel ships them)")
    run_dir = Path(plan.cfg.log.dir) / "slurm"
    directives = sbatch_directives(job, str(run_dir / "slurm-%j.out"))
    script = render_sbatch(template.read_text(), directives, template_variables(job))
    if dry_run:
        print(script, end="")
        print(summary, file=sys.stderr)
        return 0
    print(summary, flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    path, (shebang, rest) = run_dir / "train.sbatch", script.split("\n", 1)
    # the template's header shows its generic commands: this file's own comes first
    resubmit = f"# written by `megatron-lite launch slurm`; resubmit it from {Path.cwd()}: sbatch {path}"
    path.write_text(f"{shebang}\n{resubmit}\n{rest}")
    job_id, status = submit(path, wait)
    log = run_dir / f"slurm-{job_id}.out"
    if status:
        raise UserError(f"job {job_id} failed (sbatch exit {status}); its output: {log}")
    print(f"script {path}; output {log}" + (" (finished)" if wait else ""))
    return 0


def add_slurm_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``megatron-lite launch slurm``."""
    from megatron_lite.cli import add_config_option  # the CLI's one --config

    add_config_option(p)
    p.add_argument("--nodes", type=int, required=True, help="nodes in the job")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (= ranks) per node (default: 8)")
    p.add_argument("--cpu", action="store_true", help="CPU ranks (gloo), no GPU request: test clusters")
    p.add_argument("--procs-per-node", type=int, help="ranks per node (default: --gpus-per-node; --cpu: required)")
    p.add_argument(
        "--launcher",
        choices=("torchrun", "srun"),
        default="torchrun",
        help="torchrun: srun torchrun, one task per node; srun: one task per rank (default: torchrun)",
    )
    p.add_argument("--cpus-per-rank", type=int, help="CPU cores per rank (default: 8 with GPUs, 1 with --cpu)")
    p.add_argument("--container-image", help="run in this pyxis/enroot image (launch/train_container.sbatch)")
    p.add_argument("--container-mounts", help="pyxis mounts SRC:DST[,...] (default: submit dir at /workspace)")
    p.add_argument("--python", help="interpreter on the nodes (default: this one; python in a container)")
    p.add_argument(
        "--master-port", type=int, help="rendezvous port on the first node (default: 20000 + job id %% 10000)"
    )
    p.add_argument(
        "--rdzv-timeout", type=int, help="seconds torchrun's nodes wait for each other at the rendezvous (default: 600)"
    )
    p.add_argument("--job-name", default="megatron-lite", help="sbatch --job-name (default: megatron-lite)")
    p.add_argument("--time", help="sbatch --time limit, e.g. 24:00:00 (default: the template's)")
    p.add_argument("--partition", help="sbatch --partition")
    p.add_argument("--account", help="sbatch --account")
    p.add_argument("--dry-run", action="store_true", help="print the rendered script; submit nothing")
    p.add_argument("--wait", action="store_true", help="block until the job ends (sbatch --wait)")


def job_from_args(args: argparse.Namespace) -> SlurmJob:
    """The :class:`SlurmJob` described by ``megatron-lite launch slurm`` arguments."""
    if args.cpu and args.procs_per_node is None:
        raise UserError("--cpu needs --procs-per-node (CPU processes per node)")
    counts = [
        ("--nodes", args.nodes, "the nodes of the job"),
        ("--procs-per-node", args.procs_per_node, "the ranks per node"),
        ("--cpus-per-rank", args.cpus_per_rank, "the CPU cores per rank"),
        ("--gpus-per-node", None if args.cpu else args.gpus_per_node, "the GPUs per node"),  # --cpu: unused
    ]
    for flag, value, what in counts:
        if value is not None:
            whole_number(flag, str(value), 1, None, what)
    procs = args.gpus_per_node if args.procs_per_node is None else args.procs_per_node
    if not args.cpu and procs > args.gpus_per_node:
        raise UserError(
            f"--procs-per-node {procs} is more than --gpus-per-node {args.gpus_per_node}: each rank needs a GPU "
            f"of its own; use at most {counted(args.gpus_per_node, 'rank')} per node (or --cpu for CPU ranks)"
        )
    if args.master_port is not None:
        tcp_port("--master-port", str(args.master_port))
    if args.rdzv_timeout is not None:
        whole_number("--rdzv-timeout", str(args.rdzv_timeout), 1, None, "the seconds the nodes wait at the rendezvous")
    default_python = "python" if args.container_image else sys.executable
    return SlurmJob(
        config=args.config,
        nodes=args.nodes,
        procs_per_node=procs,
        gpus_per_node=None if args.cpu else args.gpus_per_node,
        overrides=list(args.overrides),
        launcher=args.launcher,
        cpus_per_rank=args.cpus_per_rank or (1 if args.cpu else 8),
        python=args.python or default_python,
        master_port=args.master_port,
        rdzv_timeout=args.rdzv_timeout,
        job_name=args.job_name,
        time=args.time,
        partition=args.partition,
        account=args.account,
        container_image=args.container_image,
        container_mounts=args.container_mounts,
    )
