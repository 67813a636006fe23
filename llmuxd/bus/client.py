"""A small client of io.llmux.LLMux1, for llmuxctl and tests.

Plain method calls with known signatures (no introspection round trip), an
error type that keeps the D-Bus error name, and Variant unwrapping so that
results print as JSON.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from llmuxd.bus.connection import DBUS_NAME, call_bus_daemon
from llmuxd.names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH

PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
NOT_RUNNING = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
    "org.freedesktop.DBus.Error.Spawn.ChildExited",
}


class BusCallError(Exception):
    """An error reply: its D-Bus name and its one-line message."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


def unwrap(value: Any) -> Any:
    """Variants and nested containers as plain Python values."""
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [unwrap(v) for v in value]
    return value


def llmux_call(member: str, signature: str = "", body: Optional[list] = None, *,
               path: str = MANAGER_PATH, interface: str = MANAGER_IFACE,
               flags: MessageFlag = MessageFlag.NONE) -> Message:
    """A method call to the llmux service (its Manager unless `path`/`interface` say otherwise)."""
    return Message(destination=BUS_NAME, path=path, interface=interface, member=member,
                   signature=signature, body=body or [], flags=flags)


class LLMuxClient:
    def __init__(self, bus: MessageBus, *, interactive: bool = False) -> None:
        self.bus = bus
        self.flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if interactive else MessageFlag.NONE

    async def call(
        self,
        member: str,
        signature: str = "",
        body: Optional[list] = None,
        *,
        path: str = MANAGER_PATH,
        interface: str = MANAGER_IFACE,
    ) -> list:
        reply = await self.bus.call(
            llmux_call(member, signature, body, path=path, interface=interface, flags=self.flags))
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else reply.error_name
            raise BusCallError(reply.error_name or "", " ".join(str(text).split()))
        return reply.body

    async def status(self) -> dict:
        (status,) = await self.call("GetStatus")
        return unwrap(status)

    async def properties(self, path: str, interface: str) -> dict:
        (props,) = await self.call("GetAll", "s", [interface], path=path, interface=PROPERTIES_IFACE)
        return unwrap(props)

    async def watch(self, on_signal: Callable[[Message], None]) -> None:
        """Deliver every signal of the service to `on_signal` (added before
        calling, so that nothing between the call and its reply is missed)."""

        def handler(msg: Message) -> None:
            if msg.message_type == MessageType.SIGNAL and msg.interface != DBUS_NAME:
                on_signal(msg)
            return None

        self.bus.add_message_handler(handler)
        await self._add_match(f"type='signal',sender='{BUS_NAME}',path_namespace='{MANAGER_PATH}'")

    async def _add_match(self, rule: str) -> None:
        reply = await call_bus_daemon(self.bus, "AddMatch", "s", [rule])
        if reply.message_type == MessageType.ERROR:
            raise BusCallError(reply.error_name or "", str(reply.body[0] if reply.body else ""))
