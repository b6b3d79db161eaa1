"""A rank under torchrun ends with its launcher instead of training on as an orphan.

torchrun starts every rank in a session of its own (``start_new_session``), so a launcher that is
SIGKILLed (an out-of-memory kill, ``kill -9``, a node agent) takes no rank with it: the ranks keep
training, holding their devices, and a relaunch would write into the same directories beside them.
On Linux each rank asks the kernel for SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``).
SIGTERM is the preemption signal (``training/fault.py``): during training every rank saves a
checkpoint at the next step boundary and exits 0; during setup the run ends with one line and exit
status 143 (``SetupSignals``); while the rank joins the process group, the default action ends it.

The request covers only a parent that dies after it is made. A parent that died earlier (the
launcher killed while the rank was still importing torch) shows as another parent pid than the
one this process started with: the rank was reparented, and it signals itself. The package's
``__init__`` imports this module first, so the pid recorded below is the parent at start-up.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping

TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun for every rank it starts
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_STARTED = (os.getpid(), os.getppid())  # (this process, its parent) when megatron_lite was first imported


def _request_pdeathsig(sig: signal.Signals) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``; False where there is no such call (not Linux, no libc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter is linked against
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no C library to load, or one without prctl
        return False


def exit_with_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """Under torchrun (``TORCHELASTIC_RUN_ID`` set), make this rank receive SIGTERM when the launcher,
    its parent, dies; True when the kernel took the request. A no-op returning False elsewhere or
    without a launcher, never an error. If the parent already changed since start-up (the launcher
    is gone), raise SIGTERM on this process at once."""
    environ = os.environ if environ is None else environ
    if TORCHRUN_ENV not in environ:
        return False
    armed = _request_pdeathsig(signal.SIGTERM)
    pid, parent = _STARTED
    if os.getpid() == pid and os.getppid() != parent:  # (a forked child has no start-up parent on record)
        signal.raise_signal(signal.SIGTERM)
    return armed


def exit_with_parent(parent: int) -> bool:
    """Make this helper process (a ``preprocess`` worker) receive SIGTERM when ``parent``, the process
    that started it, dies (strictly: when the thread that started it ends), so a parent killed with
    SIGKILL leaves no workers behind; if ``parent`` is already gone, raise SIGTERM at once. True when
    the kernel took the request; False where there is no such call (not Linux)."""
    armed = _request_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:
        signal.raise_signal(signal.SIGTERM)
    return armed
