"""Running the scripts of launch/ from the unit tests: the repository root, and a script run with a
clean launch environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SLURM_STUBS = {  # just enough SLURM for a batch script to reach its step: srun runs the task's command
    "scontrol": "#!/bin/sh\necho 127.0.0.1\n",
    "srun": '#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n',
}


def run_launch_script(name: str, env: dict[str, str], path: str | None = None) -> subprocess.CompletedProcess:
    """``bash launch/NAME`` with ``env`` over this environment less any launcher's variables."""
    launch = ("SLURM_", "PBS_", "LSB_", "RDZV_", "MASTER_", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "PROCS_PER_NODE")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(launch)}
    if path is not None:
        clean["PATH"] = f"{path}:{clean['PATH']}"
    cmd = ["bash", str(ROOT / "launch" / name), "--config", "c.yaml"]
    return subprocess.run(
        cmd, env={**clean, "PYTHON": sys.executable, **env}, capture_output=True, text=True, timeout=60
    )
