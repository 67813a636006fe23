"""One registry between llmux exceptions and D-Bus error names.

Every error that leaves the daemon on the bus goes through `to_dbus_error`,
so a caller sees `io.llmux.LLMux1.Error.<Name>` and a one-line message, never
a Python traceback (Debian 12's dbus-fast 1.84 would send one). The client
side (`llmuxctl`) uses `describe` to turn a name back into words.

The llmux names come from each `LLMuxError` subclass's `bus_name`, so a room
that adds an error class gets a bus name without touching this file.
"""

from __future__ import annotations

import logging

from dbus_fast import DBusError

from llmuxd.errors import LLMuxError
from llmuxd.eviction import EvictionError
from llmuxd.names import ERROR_PREFIX

log = logging.getLogger(__name__)

# Standard names we use for denials and bad input (what systemd and other
# polkit-using services answer, so busctl and systemctl users recognise them).
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
INTERACTIVE_AUTH_REQUIRED = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
FAILED = "org.freedesktop.DBus.Error.Failed"


class NoSuchLease(LLMuxError):
    """Release() of a lease this caller does not hold."""

    bus_name = "NoSuchLease"
    http_status = 404

    def __init__(self, lease: int):
        super().__init__(
            f"lease {lease} is not held by this connection; leases are released by the "
            "connection that acquired them, and automatically when it leaves the bus"
        )
        self.lease = lease


class InvalidArgument(LLMuxError):
    """A well-typed argument with a value that makes no sense (bad mode, bad name)."""

    bus_name = "InvalidArgs"  # mapped to the standard InvalidArgs name below


def _all_subclasses(cls: type) -> list[type]:
    out, todo = [], [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            out.append(sub)
            todo.append(sub)
    return out


def error_name(exc_type: type[LLMuxError]) -> str:
    """The full D-Bus error name of an llmux exception class."""
    if exc_type is InvalidArgument or issubclass(exc_type, InvalidArgument):
        return INVALID_ARGS
    return ERROR_PREFIX + exc_type.bus_name


def registry() -> dict[str, list[type[LLMuxError]]]:
    """Every llmux error name and the exception classes that use it."""
    names: dict[str, list[type[LLMuxError]]] = {error_name(LLMuxError): [LLMuxError]}
    for sub in _all_subclasses(LLMuxError):
        names.setdefault(error_name(sub), []).append(sub)
    return names


def one_line(text: object) -> str:
    """Messages on the bus are one line: a person reads them in a terminal.
    Several lines (one per config problem, say) are joined with '; '."""
    parts = [" ".join(line.split()) for line in str(text).splitlines()]
    out = ""
    for part in filter(None, parts):
        out += (" " if out.endswith(":") else "; ") + part if out else part
    return out or "failed"


def to_dbus_error(exc: BaseException) -> DBusError:
    """Map any exception raised behind a bus method to the DBusError the caller sees."""
    if isinstance(exc, DBusError):
        return exc
    if isinstance(exc, LLMuxError):
        return DBusError(error_name(type(exc)), one_line(exc))
    if isinstance(exc, EvictionError):
        return DBusError(ERROR_PREFIX + "InvalidEviction", one_line(exc))
    # Anything else is a bug in llmux: say so without internals, log the rest.
    log.error("unexpected error behind a D-Bus method", exc_info=exc)
    return DBusError(
        FAILED,
        f"internal error ({type(exc).__name__}); details are in the daemon's log "
        "(journalctl -u llmuxd)",
    )


def describe(name: str) -> str:
    """A short word for an error name, for llmuxctl's one-line output."""
    if name.startswith(ERROR_PREFIX):
        return name[len(ERROR_PREFIX) :]
    return name.rsplit(".", 1)[-1]
