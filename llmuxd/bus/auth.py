"""Who is calling, and may they: polkit for the bus service.

dbus-fast never hands a method the message it came in, so a message handler
(installed before dispatch) stores the caller in a ContextVar; the task that
dbus-fast creates for the coroutine method right after copies that context,
so each call sees its own caller even when many run at once.

Every exported method is declared with `bus_method(action=...)` or
`bus_method(public=True)`; `SecureInterface` refuses, at class creation, an
exported method with neither (firewalld's secure-by-default, done at import).
Reads are public; changes need a polkit action; uid 0 always passes, which
also keeps the daemon usable where polkitd is not installed.
"""

import asyncio
import contextvars
import functools
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Protocol

from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast.service import ServiceInterface, method

from llmuxd.bus.connection import call_bus_daemon
from llmuxd.bus.errors import ACCESS_DENIED, INTERACTIVE_AUTH_REQUIRED, to_dbus_error
from llmuxd.names import POLKIT_ACTION_PREFIX

log = logging.getLogger(__name__)

ACTION_CONTROL = POLKIT_ACTION_PREFIX + "control"
ACTION_RELOAD = POLKIT_ACTION_PREFIX + "reload"
ACTION_ACQUIRE = POLKIT_ACTION_PREFIX + "acquire"
ACTIONS = (ACTION_CONTROL, ACTION_RELOAD, ACTION_ACQUIRE)

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE = "org.freedesktop.PolicyKit1.Authority"
POLKIT_ALLOW_USER_INTERACTION = 1
_POLKIT_ABSENT = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
    "org.freedesktop.DBus.Error.Spawn.ChildExited",
    # polkitd's activation file is installed but its unit is not (containers,
    # a masked polkit.service): dbus-daemon passes on systemd's answer
    "org.freedesktop.systemd1.NoSuchUnit",
    "org.freedesktop.systemd1.UnitMasked",
}

ALLOW_INTERACTIVE_FLAG = 4  # MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION


@dataclass(frozen=True)
class Caller:
    """The sender of the method call being served."""

    sender: str  # unique bus name, e.g. ":1.42"
    interactive: bool  # the message allowed interactive authorization


CALLER: contextvars.ContextVar[Optional[Caller]] = contextvars.ContextVar("llmux_bus_caller", default=None)


def caller_of(msg: Message) -> Caller:
    return Caller(msg.sender or "", bool(int(msg.flags) & ALLOW_INTERACTIVE_FLAG))


def current_caller() -> Optional[Caller]:
    return CALLER.get()


class Authorizer(Protocol):
    async def check(self, caller: Optional[Caller], action: str) -> None:
        """Return if `caller` may perform `action`, else raise DBusError
        (AccessDenied or InteractiveAuthorizationRequired)."""

    def forget(self, unique_name: str) -> None:
        """The connection left the bus: drop what was cached about it."""


class AllowAll:
    """For the session bus of an embedded daemon: the bus itself only admits
    the user who runs it, so there is nothing more to ask."""

    async def check(self, caller: Optional[Caller], action: str) -> None:
        return None

    def forget(self, unique_name: str) -> None:
        return None


class PolkitAuthorizer:
    """uid 0 passes; everyone else asks polkit's CheckAuthorization for the
    calling bus name. Without polkitd only root may change anything."""

    def __init__(
        self,
        bus: Any,
        *,
        timeout: float = 25.0,
        interactive_timeout: float = 300.0,
    ) -> None:
        self._bus = bus
        self._timeout = timeout
        self._interactive_timeout = interactive_timeout
        self._uids: dict[str, int] = {}

    def forget(self, unique_name: str) -> None:
        self._uids.pop(unique_name, None)

    async def uid_of(self, sender: str) -> int:
        uid = self._uids.get(sender)
        if uid is None:
            reply = await call_bus_daemon(self._bus, "GetConnectionUnixUser", "s", [sender])
            if reply.message_type != MessageType.METHOD_RETURN:
                raise DBusError(ACCESS_DENIED, f"cannot tell who {sender} is: {reply.body[0] if reply.body else reply.error_name}")
            uid = int(reply.body[0])
            self._uids[sender] = uid
        return uid

    async def check(self, caller: Optional[Caller], action: str) -> None:
        if caller is None or not caller.sender:
            raise DBusError(ACCESS_DENIED, f"{action}: the caller is unknown")
        if await self.uid_of(caller.sender) == 0:
            return
        subject = ["system-bus-name", {"name": Variant("s", caller.sender)}]
        flags = POLKIT_ALLOW_USER_INTERACTION if caller.interactive else 0
        request = Message(
            destination=POLKIT_NAME,
            path=POLKIT_PATH,
            interface=POLKIT_IFACE,
            member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[subject, action, {}, flags, ""],
        )
        timeout = self._interactive_timeout if caller.interactive else self._timeout
        try:
            reply = await asyncio.wait_for(self._bus.call(request), timeout)
        except asyncio.TimeoutError:
            raise DBusError(ACCESS_DENIED, f"not authorized for {action}: polkit did not answer within {timeout:.0f}s") from None
        if reply.message_type == MessageType.ERROR:
            if reply.error_name in _POLKIT_ABSENT:
                raise DBusError(
                    ACCESS_DENIED,
                    f"not authorized for {action}: polkit is not running, so only root may do this (use sudo)",
                )
            detail = reply.body[0] if reply.body else reply.error_name
            raise DBusError(ACCESS_DENIED, f"not authorized for {action}: polkit failed: {detail}")
        authorized, challenge, details = reply.body[0]
        if authorized:
            return
        if challenge and not caller.interactive:
            raise DBusError(
                INTERACTIVE_AUTH_REQUIRED,
                f"{action} needs authentication; call again allowing interactive authorization "
                "(busctl and llmuxctl do on a terminal) or use sudo",
            )
        if details.get("polkit.dismissed"):
            raise DBusError(ACCESS_DENIED, f"not authorized for {action}: authentication was dismissed")
        raise DBusError(ACCESS_DENIED, f"not authorized for {action}; ask an administrator or use sudo")


@dataclass(frozen=True)
class AuthDecision:
    action: Optional[str]  # polkit action id, None for public methods


AUTH_ATTR = "_llmux_auth"
OUT_NAMES_ATTR = "_llmux_out_names"


def bus_method(
    *,
    action: Optional[str] = None,
    public: bool = False,
    name: Optional[str] = None,
    out_names: tuple[str, ...] = (),
) -> Callable[[Callable[..., Awaitable[Any]]], Any]:
    """Export an async method on the bus with an explicit authorization decision.

    The wrapper checks `action` with the interface's `authorizer`, then runs the
    method and maps any exception to a named D-Bus error (one line, no traceback).
    `out_names` names the return values in the introspection data.
    """
    if (action is None) == (not public):
        raise TypeError("bus_method needs exactly one of action='<polkit action>' or public=True")
    if action is not None and action not in ACTIONS:
        raise TypeError(f"unknown polkit action {action!r}; declared actions: {', '.join(ACTIONS)}")

    def decorator(fn: Callable[..., Awaitable[Any]]) -> Any:
        if not asyncio.iscoroutinefunction(fn):
            raise TypeError(f"{fn.__qualname__}: bus methods must be async")

        @functools.wraps(fn)
        async def guarded(self: Any, *args: Any) -> Any:
            try:
                if action is not None:
                    await self.authorizer.check(current_caller(), action)
                return await fn(self, *args)
            except DBusError:
                raise
            except Exception as exc:  # mapped, never shown as a traceback
                raise to_dbus_error(exc) from None

        setattr(guarded, AUTH_ATTR, AuthDecision(action))
        setattr(guarded, OUT_NAMES_ATTR, tuple(out_names))
        return method(name=name)(guarded)

    return decorator


def _exported_members(cls: type) -> dict[str, Any]:
    members = {}
    for klass in reversed(cls.__mro__):
        for attr, member in vars(klass).items():
            if "__DBUS_METHOD" in getattr(member, "__dict__", {}):
                members[attr] = member
    return members


class SecureInterface(ServiceInterface):
    """A ServiceInterface whose exported methods all say who may call them."""

    authorizer: Authorizer

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for attr, member in _exported_members(cls).items():
            if not isinstance(getattr(member, AUTH_ATTR, None), AuthDecision):
                raise TypeError(
                    f"{cls.__name__}.{attr} is exported on the bus without an authorization "
                    "decision; declare it with @bus_method(action=...) or @bus_method(public=True)"
                )

    @classmethod
    def authorization_table(cls) -> dict[str, Optional[str]]:
        """Member name -> polkit action (None = public), for tests and docs."""
        table = {}
        for member in _exported_members(cls).values():
            dbus_method = member.__dict__["__DBUS_METHOD"]
            table[dbus_method.name] = getattr(member, AUTH_ATTR).action
        return table
