"""The launch scripts' variables, checked before anything starts.

``launch/torchrun.sh`` and the sbatch templates read their settings from variables (``NNODES``,
``NPROC_PER_NODE``, ``MASTER_PORT``, ...). Unchecked, a bad value would reach torchrun or srun as
it is, which answer with a traceback, a shell error or a rendezvous that waits for minutes. Each
script hands its values to this module first::

    python -m megatron_lite.launcher.launch_vars launch/torchrun.sh NNODES="$NNODES" ... [-- COMMAND ...]

Every bad value is one line naming the variable, the value and what is accepted, and so is a
MASTER_PORT in use on the machine that hosts the rendezvous (``rendezvous_port.py``); the exit
status is 2; with ``-- COMMAND`` the command replaces this process when every value is good (the
container template runs the check inside its image this way, where megatron-lite is installed).
``megatron-lite launch slurm`` checks its options with the same functions.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

from megatron_lite.errors import UserError
from megatron_lite.launcher.env import check_master_resolves, tcp_port
from megatron_lite.launcher.rendezvous_port import check_port_free, is_this_machine

RDZV_BACKENDS = ("c10d", "static")  # c10d: machines join in any order; static: by NODE_RANK


def whole_number(name: str, value: str, low: int, high: int | None, what: str, alternative: str = "") -> int:
    """``value`` as an int in ``low..high`` (no upper bound: None), else a :class:`UserError` naming
    ``name``, the value, ``what`` it sets and the range (and an ``alternative`` the caller accepts)."""
    accepted = (f"{low} or more" if high is None else f"{low} to {high}") + alternative
    if not re.fullmatch(r"-?[0-9]+", value):  # as the shell's test -eq reads it (int() takes " 1_0")
        raise UserError(f"{name}={value} is not a whole number: set {what}, {accepted}")
    number = int(value)
    if number < low or (high is not None and number > high):
        raise UserError(f"{name}={value} is out of range: set {what}, {accepted}")
    return number


def one_of(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UserError(f"{name}={value} is not accepted: set one of {', '.join(choices)}")
    return value


def _check_one(name: str, value: str, values: Mapping[str, str]) -> None:
    if name == "NNODES":
        whole_number(name, value, 1, None, "the number of machines")
    elif name == "NODE_RANK":
        nodes = _nodes(values)
        high = None if nodes is None else nodes - 1  # a bad NNODES: its own line says it
        whole_number(name, value, 0, high, f"this machine's index among NNODES={values.get('NNODES', 1)}")
    elif name in ("NPROC_PER_NODE", "PROCS_PER_NODE"):
        if not (name == "NPROC_PER_NODE" and value == "gpu"):
            gpu = ", or gpu (one rank per visible GPU)" if name == "NPROC_PER_NODE" else ""
            whole_number(name, value, 1, None, "the ranks per machine", gpu)
    elif name == "MASTER_PORT":
        tcp_port(name, value)
    elif name == "MASTER_ADDR":
        _check_master(value, values)
    elif name == "RDZV_TIMEOUT":
        whole_number(name, value, 1, None, "the seconds the machines wait for each other at the rendezvous")
    elif name == "RDZV_BACKEND":
        one_of(name, value, RDZV_BACKENDS)
    else:
        raise ValueError(f"no check for launch variable {name}")  # a script and this module disagree


def _nodes(values: Mapping[str, str]) -> int | None:
    try:
        return whole_number("NNODES", values.get("NNODES", "1"), 1, None, "the number of machines")
    except UserError:
        return None


def _check_master(addr: str, values: Mapping[str, str]) -> None:
    """Several machines need MASTER_ADDR, and it must resolve: torchrun's rendezvous retries an
    unknown host for minutes."""
    nodes = _nodes(values)
    if nodes is None or nodes == 1:
        return
    if not addr:
        raise UserError(f"NNODES={nodes} needs MASTER_ADDR: set it to the first machine's host name or address")
    port = values.get("MASTER_PORT", "29500")
    check_master_resolves(addr, int(port) if re.fullmatch(r"[0-9]+", port) else 29500)


def hosts_rendezvous(values: Mapping[str, str]) -> bool:
    """Whether this machine serves the rendezvous of a launch on several machines whose (good) values
    are ``values``: NODE_RANK=0 under the static backend; under c10d, NODE_RANK=0 where MASTER_ADDR
    names this machine (c10d ignores NODE_RANK, so every machine may leave it 0; a second agent on the
    host itself, given another NODE_RANK, joins as a client). One machine (NNODES=1) runs torchrun
    --standalone, on a free port of its own choosing."""
    if "MASTER_PORT" not in values or int(values.get("NNODES", "1")) == 1 or int(values.get("NODE_RANK", "0")) != 0:
        return False
    return values.get("RDZV_BACKEND", "c10d") == "static" or is_this_machine(values["MASTER_ADDR"])


def check_launch_vars(values: Mapping[str, str]) -> list[str]:
    """One message for each bad value of ``values`` (variable name -> value), in their order; with every
    value good, on the machine that hosts the rendezvous, whether MASTER_PORT is free there."""
    problems = []
    for name, value in values.items():
        try:
            _check_one(name, value, values)
        except UserError as e:
            problems.append(str(e))
    if not problems and hosts_rendezvous(values):
        try:
            check_port_free(int(values["MASTER_PORT"]))
        except UserError as e:
            problems.append(str(e))
    return problems


def main(argv: list[str]) -> int:
    """``SCRIPT NAME=VALUE ... [-- COMMAND ...]``: print each problem as ``SCRIPT: message`` and
    return 2, or run COMMAND in place of this process (or return 0 without one)."""
    script, rest = argv[0], argv[1:]
    command = rest[rest.index("--") + 1 :] if "--" in rest else []
    assignments = rest[: rest.index("--")] if "--" in rest else rest
    values = dict(a.split("=", 1) for a in assignments)
    problems = check_launch_vars(values)
    for problem in problems:
        print(f"{script}: {problem}", file=sys.stderr)
    if problems:
        return 2
    if command:
        sys.stdout.flush()
        os.execvp(command[0], command)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
