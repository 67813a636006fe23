"""Opening a bus connection that survives a full socket buffer.

dbus-fast's asyncio writer (1.84 in Debian 12 and 5.x on PyPI alike) treats
EAGAIN from `socket.send` as a fatal error and drops the whole connection
(altdesktop/python-dbus-next#153, still open). A daemon answering a burst of
calls (1,000 GetStatus from ten clients in our tests) fills its socket buffer
and would lose the bus. `harden()` gives the writer a socket whose `send`
reports EAGAIN as "0 bytes written", which the writer already handles by
waiting until the socket is writable again.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from dbus_fast import BusType, Message
from dbus_fast.aio import MessageBus

log = logging.getLogger(__name__)

#: the message bus itself: its well-known name (also its interface) and object path
DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"


class _EagainSafeSocket:
    """A socket whose send() returns 0 instead of raising when it would block."""

    __slots__ = ("_sock",)

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def send(self, data: Any, *flags: int) -> int:
        try:
            return self._sock.send(data, *flags)
        except (BlockingIOError, InterruptedError):
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def harden(bus: MessageBus) -> MessageBus:
    """Make `bus` (connected) keep its connection when its socket buffer is full.
    Idempotent; a no-op if dbus-fast's writer no longer looks as expected."""
    writer = getattr(bus, "_writer", None)
    sock = getattr(writer, "sock", None)
    if sock is None:
        log.debug("dbus-fast writer has no 'sock'; EAGAIN guard not installed")
    elif not isinstance(sock, _EagainSafeSocket):
        writer.sock = _EagainSafeSocket(sock)
    return bus


async def open_bus(*, system: bool = True, address: Optional[str] = None) -> MessageBus:
    """Connect to the system (or session) bus, or `address`, hardened.
    DBUS_SYSTEM_BUS_ADDRESS / DBUS_SESSION_BUS_ADDRESS are honoured by dbus-fast."""
    bus_type = BusType.SYSTEM if system else BusType.SESSION
    bus = await MessageBus(bus_address=address, bus_type=bus_type).connect()
    return harden(bus)


async def call_bus_daemon(bus: MessageBus, member: str, signature: str = "",
                          body: Optional[list] = None) -> Message:
    """Call `member` (AddMatch, NameHasOwner, GetConnectionUnixUser, ...) on the message bus
    itself; the reply, an error or not, is the caller's to judge (each wants its own error)."""
    return await bus.call(Message(destination=DBUS_NAME, path=DBUS_PATH, interface=DBUS_NAME,
                                  member=member, signature=signature, body=body or []))
