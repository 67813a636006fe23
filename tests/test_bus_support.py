"""Shared pieces of the bus and llmuxctl tests: a private system bus (with
dbusmock's polkitd), a small fake switcher with the Switcher's interface,
the service running in-process, and a client that runs as another user.

(No tests here; test_bus*.py and test_ctl*.py import from it.)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from llmuxd.bus.client import llmux_call
from llmuxd.bus.connection import DBUS_NAME, call_bus_daemon
from llmuxd.bus.service import LLMuxService, export_service
from llmuxd.errors import ModelPinned, NotSupported, SwitchFailed, SwitchTimeout, UnknownModel
from llmuxd.eviction import DEFAULT_EVICTION, Eviction
from llmuxd.names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH
from llmuxd.priority import DEFAULT_PRIORITY

NOBODY = 65534
VERSION = "0.1.0-test"


# -- a fake switcher ----------------------------------------------------------


@dataclass
class SwitchStarted:
    group: str
    from_model: Optional[str]
    to_model: str


@dataclass
class SwitchFinished:
    group: str
    from_model: Optional[str]
    to_model: str
    ok: bool
    duration: float
    phases: dict = field(default_factory=dict)
    error: Optional[str] = None


@dataclass
class ModelStateChanged:
    model: str
    state: str


@dataclass
class ModelStatus:
    name: str
    state: str = "not_started"
    eviction: Eviction = DEFAULT_EVICTION
    group: str = "default"
    in_flight: int = 0
    queue_depth: int = 0
    wait_estimate: float = 0.0
    last_error: Optional[str] = None
    last_switch_s: Optional[float] = None
    endpoint: str = ""
    process_state: str = "not_started"


@dataclass
class SwitcherStatus:
    mode: str
    pinned: Optional[str]
    state: str
    active_models: list
    models: dict


class FakeLease:
    def __init__(self, switcher: "FakeSwitcher", model: str, endpoint: str):
        self.model = model
        self.endpoint = endpoint
        self._switcher = switcher
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._switcher.models[self.model].in_flight -= 1
            self._switcher.released.append(self)


class FakeSwitcher:
    """Enough of llmuxd.switcher.Switcher for the bus: one model awake at a time,
    a gate (`proceed`) that holds a switch half-way, and `fail_next`."""

    def __init__(self, names: list[str]) -> None:
        self.models = {
            n: ModelStatus(n, endpoint=f"http://127.0.0.1:{9000 + i}") for i, n in enumerate(names)
        }
        self.mode = "auto"
        self.pinned: Optional[str] = None
        self.active: Optional[str] = None
        self.switching: Optional[tuple] = None
        self.overrides: dict[str, Eviction] = {}
        self.listeners: list[Callable] = []
        self.proceed = asyncio.Event()
        self.proceed.set()
        self.started = asyncio.Event()
        self.fail_next: Optional[str] = None
        self.released: list[FakeLease] = []
        self.calls: list[tuple] = []
        self.reload_names: Optional[list[str]] = None
        self.explode = False
        self._task: Optional[asyncio.Task] = None

    # events
    def subscribe(self, listener: Callable) -> Callable[[], None]:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener) if listener in self.listeners else None

    def _emit(self, event: Any) -> None:
        for listener in list(self.listeners):
            listener(event)

    def _set_state(self, model: str, state: str) -> None:
        self.models[model].state = state
        self._emit(ModelStateChanged(model, state))

    def _check(self, model: str) -> None:
        if model not in self.models:
            raise UnknownModel(model, list(self.models))

    # status
    def status(self) -> SwitcherStatus:
        if self.switching:
            state = f"switching:{self.switching[0] or 'none'}->{self.switching[1]}"
        elif self.active:
            state = f"active:{self.active}"
        else:
            state = "idle"
        for name, ms in self.models.items():
            ms.eviction = self.eviction_for(name)
        return SwitcherStatus(
            self.mode, self.pinned, state, [self.active] if self.active else [], dict(self.models)
        )

    def wait_estimate(self, model: str) -> float:
        return self.models[model].wait_estimate

    def eviction_for(self, model: str) -> Eviction:
        return self.overrides.get(model, DEFAULT_EVICTION)

    # switching
    async def _do_switch(self, model: str) -> None:
        old = self.active
        self.switching = (old, model)
        self._emit(SwitchStarted("default", old, model))
        self.started.set()
        if old:
            self._set_state(old, "sleeping")
        self._set_state(model, "starting")
        await self.proceed.wait()
        self.switching = None
        if self.fail_next:
            reason, self.fail_next = self.fail_next, None
            self.active = None
            self.models[model].last_error = reason
            self._set_state(model, "failed")
            self._emit(SwitchFinished("default", old, model, False, 0.25, error=reason))
            raise SwitchFailed(model, "wake", reason)
        self.active = model
        self.models[model].last_switch_s = 0.25
        self._set_state(model, "ready")
        self._emit(SwitchFinished("default", old, model, True, 0.25))

    async def switch(self, model: str, wait: bool = True, timeout: Optional[float] = None, force: bool = False) -> None:
        self.calls.append(("switch", model, wait, timeout) + (("force",) if force else ()))
        self._check(model)
        if self.mode == "manual" and self.pinned and model != self.pinned:
            if not force:
                raise ModelPinned(model, self.pinned, forceable=True)
            self.pinned = model
        if self.active == model and not self.switching:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._do_switch(model))
            self._task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        if not wait:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except asyncio.TimeoutError:
            raise SwitchTimeout(model, timeout or 0.0) from None

    async def acquire(self, model: str, timeout: Optional[float] = None, *, priority=DEFAULT_PRIORITY) -> FakeLease:
        self.calls.append(("acquire", model, timeout))
        await self.switch(model, True, timeout)
        self.models[model].in_flight += 1
        return FakeLease(self, model, self.models[model].endpoint)

    async def pin(self, model: str) -> None:
        self.calls.append(("pin", model))
        self._check(model)
        self.mode, self.pinned = "manual", model
        await self.switch(model)

    async def unpin(self) -> None:
        self.calls.append(("unpin",))
        self.mode, self.pinned = "auto", None

    async def set_mode(self, mode: str) -> None:
        self.calls.append(("set_mode", mode))
        self.mode = mode
        if mode == "auto":
            self.pinned = None

    async def sleep_model(self, model: str, eviction: Optional[Eviction] = None) -> None:
        self.calls.append(("sleep", model, eviction))
        self._check(model)
        if eviction is not None and eviction.process.value == "checkpoint":
            raise NotSupported("checkpoint eviction needs criu, which is not installed; install criu or choose another eviction")
        if self.active == model:
            self.active = None
        self._set_state(model, "sleeping")

    async def wake_model(self, model: str) -> None:
        self.calls.append(("wake", model))
        if self.explode:
            raise RuntimeError("boom in /usr/lib/python3/dist-packages/llmuxd/secret.py")
        await self.switch(model)

    def set_eviction(self, model: str, eviction: Optional[Eviction]) -> None:
        self.calls.append(("set_eviction", model, eviction))
        self._check(model)
        if eviction is None:
            self.overrides.pop(model, None)
        else:
            self.overrides[model] = eviction

    async def replace_models(self, names: list[str]) -> None:
        """What a reload did to the model list (the real reload takes a Config)."""
        for name in list(self.models):
            if name not in names:
                del self.models[name]
        for name in names:
            self.models.setdefault(name, ModelStatus(name, endpoint="http://127.0.0.1:9999"))


# -- buses --------------------------------------------------------------------

BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>{kind}</type>
  <listen>unix:tmpdir=/tmp</listen>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


class PrivateBus:
    """A dbus-daemon of our own (what dbusmock's DBusTestCase starts), reachable
    by every uid so that a client can run as 'nobody'."""

    def __init__(self, kind: str = "system", config: Optional[str] = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="llmux-bus-")
        conf = Path(self._dir.name) / "bus.conf"
        conf.write_text(config or BUS_CONF.format(kind=kind))
        out = subprocess.run(
            ["dbus-daemon", "--fork", "--print-address=1", "--print-pid=1", f"--config-file={conf}"],
            check=True, capture_output=True, text=True,
        ).stdout.split()
        self.address, self.pid = out[0], int(out[1])
        self.polkit: Optional[subprocess.Popen] = None

    def start_polkit(self) -> None:
        """dbusmock's polkitd template, with CheckAuthorization extended to
        answer is_challenge for actions named by SetChallenge (the template
        itself never challenges), to record the flags it was given, and to
        authorize the test runner's own uid (see the comment in the code)."""
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.address)
        self.polkit = subprocess.Popen(
            [sys.executable, "-m", "dbusmock", "--system", "--template", "polkitd"],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        self.mock_call("wait", "", [])
        self.mock_call(
            "AddMethod",
            "sssss",
            [
                "org.freedesktop.PolicyKit1.Authority",
                "CheckAuthorization",
                "(sa{sv})sa{ss}us",
                "(bba{ss})",
                "action = args[1]; flags = int(args[3])\n"
                "self.seen = getattr(self, 'seen', []) + [(action, flags)]\n"
                "allowed = action in self.allowed or self.allow_unknown\n"
                # the runner is the administrator: as root the daemon never asks
                # polkit; as an ordinary user the mock grants the runner's own uid
                # (as an admin rule would), so the same tests run; other uids
                # ('nobody' in test_bus_auth, root only) still get the table above
                "subject = args[0][1].get('name')\n"
                "if subject and self.connection.get_unix_user(subject) == __import__('os').geteuid(): allowed = True\n"
                "challenge = action in getattr(self, 'challenge', [])\n"
                "if challenge and flags & 1 and getattr(self, 'agent_says_yes', False): allowed = True\n"
                "ret = (allowed, challenge and not allowed, {})",
            ],
        )
        self.mock_call(
            "AddMethod",
            "sssss",
            ["org.freedesktop.DBus.Mock", "SetChallenge", "asb", "", "self.challenge = args[0]; self.agent_says_yes = bool(args[1])"],
        )
        self.mock_call(
            "AddMethod",
            "sssss",
            ["org.freedesktop.DBus.Mock", "Seen", "", "a(su)", "ret = getattr(self, 'seen', [])"],
        )

    def mock_call(self, member: str, signature: str, body: list) -> Any:
        """Call the polkit mock synchronously (it is another process)."""
        import dbus

        conn = dbus.bus.BusConnection(self.address)
        try:
            for _ in range(200):
                if conn.name_has_owner("org.freedesktop.PolicyKit1"):
                    break
                import time

                time.sleep(0.05)
            if member == "wait":
                return None
            obj = conn.get_object("org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority")
            return obj.get_dbus_method(member, "org.freedesktop.DBus.Mock")(*body, signature=signature)
        finally:
            conn.close()

    def stop_polkit(self) -> None:
        if self.polkit:
            self.polkit.terminate()
            self.polkit.wait(30)
            self.polkit = None

    def close(self) -> None:
        self.stop_polkit()
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self._dir.cleanup()


@pytest.fixture(scope="module")
def system_bus():
    bus = PrivateBus("system")
    bus.start_polkit()
    yield bus
    bus.close()


async def connect(address: str) -> MessageBus:
    return await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()


class Running:
    """The service in-process on its own connection, with a fake switcher."""

    def __init__(self, bus: MessageBus, switcher: FakeSwitcher, service: LLMuxService, reloads: list):
        self.bus = bus
        self.switcher = switcher
        self.service = service
        self.reloads = reloads

    async def close(self) -> None:
        await self.service.close()
        await disconnect(self.bus)
        task = self.switcher._task
        if task is not None and not task.done():
            self.switcher.proceed.set()
            task.cancel()


async def start_service(address: str, names=("llama", "qwen-7b"), **kwargs: Any) -> Running:
    bus = await connect(address)
    switcher = FakeSwitcher(list(names))
    reloads: list = []

    async def reload() -> None:
        reloads.append(1)
        if switcher.reload_names is None:
            raise ValueError("/etc/llmux/config.yaml: models.x.port: must be 1-65535")
        await switcher.replace_models(switcher.reload_names)

    kwargs.setdefault("refresh_interval", 0)
    service = await export_service(bus, switcher, reload=reload, version=VERSION, **kwargs)
    try:
        await service.request_name()
    except BaseException:
        await service.close()
        await disconnect(bus)
        raise
    return Running(bus, switcher, service, reloads)


async def call(
    bus: MessageBus,
    member: str,
    signature: str = "",
    body: Optional[list] = None,
    *,
    path: str = MANAGER_PATH,
    interface: str = MANAGER_IFACE,
    flags: int = 0,
) -> Message:
    """The raw reply (an error too) of a call to the llmux service on `bus`."""
    from dbus_fast import MessageFlag

    return await bus.call(
        llmux_call(member, signature, body, path=path, interface=interface, flags=MessageFlag(flags)))


def error_of(reply: Message) -> tuple[str, str]:
    assert reply.message_type == MessageType.ERROR, f"expected an error, got {reply.body}"
    return reply.error_name, reply.body[0]


# A client as another user: a short dbus-fast script run under setpriv.
CLIENT = r"""
import asyncio, json, sys
from dbus_fast import Message, MessageFlag, MessageType, BusType
from dbus_fast.aio import MessageBus
address, dest, path, iface, member, signature, body, flags = sys.argv[1:9]
async def main():
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    r = await bus.call(Message(destination=dest, path=path, interface=iface, member=member,
        signature=signature, body=json.loads(body), flags=MessageFlag(int(flags))))
    if r.message_type == MessageType.ERROR:
        print(json.dumps({"error": r.error_name, "message": r.body[0]}))
    else:
        print(json.dumps({"ok": r.body}, default=lambda v: v.value))
asyncio.run(main())
"""


async def call_as(
    uid: int,
    address: str,
    member: str,
    signature: str = "",
    body: Optional[list] = None,
    *,
    interactive: bool = False,
    destination: str = BUS_NAME,
    path: str = MANAGER_PATH,
    interface: str = MANAGER_IFACE,
) -> dict:
    """Call a method from a process running as `uid` (not root); returns
    {"ok": body} or {"error": name, "message": text}."""
    proc = await asyncio.create_subprocess_exec(
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
        sys.executable, "-c", CLIENT, address, destination, path, interface, member, signature,
        json.dumps(body or []), str(4 if interactive else 0),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/",
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def poll_until(predicate: Callable[[], Any], timeout: float = 30.0) -> None:
    """Poll an in-process `predicate` until it holds or `timeout` passes (for what no signal
    tells, such as a lease released after its client left); the caller asserts after."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate() and loop.time() < deadline:
        await asyncio.sleep(0.05)


async def disconnect(bus: MessageBus) -> None:
    bus.disconnect()
    try:
        await asyncio.wait_for(bus.wait_for_disconnect(), 30)
    except Exception:
        pass


class SignalLog:
    """Signals a client received from the service, with an event-based wait."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.seen: list[Message] = []
        self._changed = asyncio.Event()
        bus.add_message_handler(self._on_message)

    async def watch(self) -> "SignalLog":
        reply = await call_bus_daemon(self.bus, "AddMatch", "s", [f"type='signal',sender='{BUS_NAME}'"])
        assert reply.message_type == MessageType.METHOD_RETURN
        return self

    def _on_message(self, msg: Message):
        if msg.message_type == MessageType.SIGNAL and msg.interface != DBUS_NAME:
            self.seen.append(msg)
            self._changed.set()
        return None

    def matching(self, member: str, path: Optional[str] = None) -> list[Message]:
        return [m for m in self.seen if m.member == member and (path is None or m.path == path)]

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
        async def loop():
            while True:
                result = predicate()
                if result:
                    return result
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(loop(), timeout)


def changed_props(log: SignalLog, path: str) -> list[dict]:
    """The changed-properties dicts (plain values) of PropertiesChanged on `path`."""
    return [
        {k: v.value for k, v in m.body[1].items()}
        for m in log.matching("PropertiesChanged", path)
    ]
