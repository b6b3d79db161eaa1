"""``python -m megatron_lite.launcher.torchrun ARGS``: torchrun (``torch.distributed.run``) with ARGS,
except that SIGUSR1 reaches the ranks instead of killing torchrun.

SIGUSR1 is a preemption signal of the ranks (``training/fault.py``: save at the next step boundary,
exit 0), the one SLURM sends with ``sbatch --signal=USR1@120`` or ``scancel --signal=USR1``, to
every process of the job's steps: torchrun too. torchrun handles SIGTERM, SIGINT, SIGHUP and SIGQUIT
but not SIGUSR1, whose default action ends it at once; its srun task then fails, srun
(``--kill-on-bad-exit``) terminates the step and SLURM SIGKILLs the ranks ``KillWait`` seconds later
(30 by default), whatever warning time was asked for, and the job ends FAILED. Here torchrun passes
SIGUSR1 on to its ranks (those it started: ``LOCAL_RANK`` in their environment) and goes on
watching them: they save and exit 0, and so does torchrun.

A machine that never joins the rendezvous leaves the others waiting ``join_timeout`` seconds under
the c10d backend, ``timeout`` under the static one (``--rdzv_conf=join_timeout=N,timeout=N``, 600 by
default each; ``RDZV_TIMEOUT`` of ``launch/torchrun.sh`` and of the sbatch templates sets both), after
which torchrun raises a bare ``RendezvousTimeoutError`` (c10d) or the store's ``DistStoreError`` /
``DistNetworkError`` "timed out" (static); here that is one line naming the endpoint, the machines
expected and what to check, and exit status 1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import FrameType

FORWARDED = signal.SIGUSR1
DEFAULT_JOIN_TIMEOUT_S = 600  # torch.distributed.elastic.rendezvous.dynamic_rendezvous: join_timeout


def _children() -> list[int]:
    """This process's child pids (Linux: from /proc; elsewhere none)."""
    pids: list[int] = []
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return pids
    for tid in os.listdir(tasks):
        with contextlib.suppress(OSError), open(f"{tasks}/{tid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    return pids


def _is_rank(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return any(var.startswith(b"LOCAL_RANK=") for var in f.read().split(b"\0"))
    except OSError:  # gone, or not ours to read
        return False


def forward_to_ranks(signum: int, frame: FrameType | None = None) -> list[int]:
    """Send ``signum`` to every rank this torchrun started; returns their pids."""
    ranks = [pid for pid in _children() if _is_rank(pid)]
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    return ranks


def rendezvous_timeout_message(argv: list[str]) -> str:
    """What a rendezvous that timed out means for torchrun arguments ``argv``."""
    from torch.distributed.run import parse_args

    args = parse_args(argv)
    conf = dict(item.split("=", 1) for item in args.rdzv_conf.split(",") if "=" in item)
    # the static backend's TCPStore waits `timeout` (also 600 s by default), c10d's `join_timeout`
    waited = conf.get("timeout" if args.rdzv_backend == "static" else "join_timeout", str(DEFAULT_JOIN_TIMEOUT_S))
    return (
        f"torchrun: rendezvous {args.rdzv_id} at {args.rdzv_endpoint} timed out after {waited} s before "
        f"--nnodes={args.nnodes} machines joined: start the job on every machine with the same MASTER_ADDR, "
        "MASTER_PORT and rendezvous id (launch/torchrun.sh: the same arguments, or the same RDZV_ID; each "
        "machine prints its id), or let them wait longer (RDZV_TIMEOUT of launch/torchrun.sh or launch/*.sbatch)"
    )


def main() -> None:
    signal.signal(FORWARDED, forward_to_ranks)
    from torch.distributed import DistNetworkError, DistStoreError
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.run import main as torchrun
    from torch.distributed.run import parse_args

    argv, sys.argv[0] = sys.argv[1:], "torchrun"
    try:
        torchrun()
    except RendezvousTimeoutError:
        print(rendezvous_timeout_message(argv), file=sys.stderr)
        sys.exit(1)
    except (DistStoreError, DistNetworkError) as e:
        # the static rendezvous is a TCPStore: machine 0 times out waiting for clients, the others
        # connecting to it; a ranks' failure is torchrun's ChildFailedError, never one of these
        if parse_args(argv).rdzv_backend != "static" or "timed out" not in str(e).lower():
            raise
        print(rendezvous_timeout_message(argv), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
