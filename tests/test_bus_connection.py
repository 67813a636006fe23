"""The EAGAIN guard on the daemon's bus connection (see llmuxd/bus/connection.py):
a full socket buffer means 'try again when writable', not 'drop the bus'."""

from __future__ import annotations

import socket

from llmuxd.bus.connection import _EagainSafeSocket, harden
from test_bus_support import connect, disconnect, system_bus  # noqa: F401


def test_a_full_socket_reports_zero_bytes_instead_of_raising():
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        guarded = _EagainSafeSocket(a)
        chunk = b"x" * 65536
        sent = [guarded.send(chunk) for _ in range(200)]  # far more than any socket buffer
        assert sent[-1] == 0
        assert guarded.fileno() == a.fileno()  # everything else passes through
    finally:
        a.close()
        b.close()


async def test_harden_wraps_the_writer_once(system_bus):
    bus = await connect(system_bus.address)
    try:
        harden(bus)
        harden(bus)
        sock = bus._writer.sock
        assert isinstance(sock, _EagainSafeSocket)
        assert not isinstance(sock._sock, _EagainSafeSocket)
    finally:
        await disconnect(bus)
