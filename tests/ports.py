"""Ports for the servers the tests start in other processes.

A port from ``bind(("127.0.0.1", 0))`` comes from the system's ephemeral range, the same
range every ``bind(0)`` and every outgoing connection of every other test draws from.
Between closing that probe socket and the server binding the port (seconds, for a server
that imports a framework or runs under valgrind), another test's listener can take it,
and the server fails with "address already in use".  So the ports handed out here come
from below (or above) that range, chosen at random: only another ``free_port()`` call can
pick the same one, one in thousands, and never one made in this process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: Linux's default ephemeral range, when /proc does not say.
_DEFAULT_EPHEMERAL = (32768, 60999)
#: Below this are the ports services conventionally use; the tests stay above it.
_LOWEST = 10000

_chooser = random.SystemRandom()  # not the random module's seed, which plugins may fix
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL


def _candidates() -> range:
    low, high = _ephemeral_range()
    below, above = range(_LOWEST, low), range(high + 1, 65536)
    return below if len(below) >= len(above) else above


def _binds(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port nothing is bound to on 127.0.0.1 now, outside the ephemeral range, and
    not handed out before in this process."""
    candidates = _candidates()
    for _ in range(200 if candidates else 0):
        port = _chooser.choice(candidates)
        if port not in _handed_out and _binds(port):
            _handed_out.add(port)
            return port
    with socket.socket() as sock:  # no range outside the ephemeral one: the system's choice
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    _handed_out.add(port)
    return port
