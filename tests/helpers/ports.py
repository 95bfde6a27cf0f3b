"""Free TCP ports for the tests' daemons and stacks."""

from __future__ import annotations

import socket

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and never handed out before in this process: the kernel may offer a just-closed port
    again, and a test picks several ports before its daemons bind them (a slurmd once got slurmctld's)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
