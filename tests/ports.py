"""Free TCP ports for tests that start rendezvous servers (torchrun, srun, init_process_group)."""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    """A free port BELOW the kernel's ephemeral range (32768+ on Linux): a port the OS handed out as
    ephemeral can be handed again to another process's outgoing connection (the gloo worlds of
    other tests open many) before the rendezvous binds it."""
    for port in random.Random().sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")
