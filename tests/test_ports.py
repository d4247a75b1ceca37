"""The ports the tests hand to servers they start (tests/ports.py)."""

from __future__ import annotations

import socket

from .ports import _ephemeral_range, free_port


def test_free_ports_avoid_the_ephemeral_range_and_repeats() -> None:
    """Outside the range every bind(0) and outgoing connection draws from, never the same
    port twice in one process, and each one bindable when handed out."""
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert not [port for port in ports if low <= port <= high], (low, high, ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
