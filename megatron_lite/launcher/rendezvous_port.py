"""The rendezvous port on the machine that hosts it: free, or one line naming what holds it.

torchrun's c10d rendezvous is a TCP store served by the machine that ``MASTER_ADDR`` names; when
that machine cannot listen on ``MASTER_PORT`` (another job's rendezvous, a notebook server), torch
falls back to connecting to whatever listens there as a client, and the launch waits on it until
the rendezvous times out (a stranger's server never answers). The static rendezvous is served by
``NODE_RANK=0`` and fails with a traceback instead. :func:`check_port_free` tells it before torchrun
starts, on that machine only: the others connect to the port and never listen on it.

The test binds the port as the store will and closes it at once: nothing is held, so there is no
window in which this check itself keeps the store from binding. It binds every address, IPv6 and
IPv4 (the store listens on both), with ``SO_REUSEADDR`` as the store sets it, so a port whose last
connections linger in TIME_WAIT (a job restarted on the same port) counts as free, as it is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

from megatron_lite.errors import UserError

# where IPv6 is off or absent, the IPv6 bind fails with one of these and IPv4 alone is tested
_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


def is_this_machine(host: str) -> bool:
    """Whether ``host`` (a name or address) names this machine: one of its addresses can be bound
    here. Secondary interfaces and /etc/hosts aliases count, as they do for torchrun's choice of host."""
    try:
        addresses = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, address in addresses:
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((address[0], 0, *address[2:]))  # port 0: any free one; only the address is tested
            return True
    return False


def _bind_error(port: int) -> OSError | None:
    """The error binding ``port`` on every IPv6 and IPv4 address gives, or None where both bind."""
    for family, anywhere in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no such family here
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too where allowed
            try:
                s.bind((anywhere, port))
            except OSError as e:
                if family == socket.AF_INET6 and e.errno in _NO_IPV6:
                    continue
                return e
    return None


def port_holder(port: int) -> str | None:
    """``pid N: command`` of the process listening on TCP ``port`` here, where /proc shows it (Linux,
    and a process of this user); ``another user's process`` where only the socket is visible; else None."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                fields = row.split()  # local address as HEXIP:HEXPORT, state 0A = LISTEN, inode at 9
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    sockets.add(f"socket:[{fields[9]}]")
    if not sockets:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in sockets for fd in os.listdir(f"/proc/{pid}/fd")):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                command = " ".join(argv.split())  # one line, whatever the arguments hold
                return f"pid {pid}: {command[:77] + '...' if len(command) > 80 else command}"
    return "another user's process"


def check_port_free(port: int) -> None:
    """Raise a :class:`UserError` naming ``port`` (MASTER_PORT), what holds it where that is known,
    and the fix, unless the rendezvous store could listen on it here (see the module docstring)."""
    error = _bind_error(port)
    if error is None:
        return
    fix = "set MASTER_PORT to a free port, the same on every machine"
    if error.errno != errno.EADDRINUSE:
        raise UserError(
            f"MASTER_PORT={port} cannot be listened on by this machine, which hosts the rendezvous "
            f"({error.strerror}): {fix}"
        )
    holder = port_holder(port)
    held = f" (held by {holder})" if holder else ""
    raise UserError(f"MASTER_PORT={port} is in use on this machine, which hosts the rendezvous{held}: {fix}")
