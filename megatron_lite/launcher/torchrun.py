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
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import FrameType

FORWARDED = signal.SIGUSR1


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


def main() -> None:
    signal.signal(FORWARDED, forward_to_ranks)
    from torch.distributed.run import main as torchrun

    sys.argv[0] = "torchrun"
    torchrun()


if __name__ == "__main__":
    main()
