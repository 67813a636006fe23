"""The io.llmux.LLMux1 service: the switcher, on the bus.

`export_service()` puts the manager at /io/llmux/LLMux1 and one object per
model under /io/llmux/LLMux1/model/; `LLMuxService.request_name()` then takes
the well-known name. The objects hold no state of their own: properties come
from `switcher.status()` (cached, diffed on every switcher event and on a
slow tick, and PropertiesChanged is sent for what changed), methods call the
switcher. Nothing here knows how a model is run.
"""

import asyncio
import itertools
import logging
from typing import Any, Awaitable, Callable, Optional

from dbus_fast import Message, MessageType, Variant
from dbus_fast.constants import NameFlag, PropertyAccess, RequestNameReply
from dbus_fast.service import dbus_property, signal

from llmuxd.bus.auth import (
    ACTION_ACQUIRE,
    ACTION_CONTROL,
    ACTION_RELOAD,
    CALLER,
    AllowAll,
    Authorizer,
    PolkitAuthorizer,
    SecureInterface,
    bus_method,
    caller_of,
    current_caller,
)
from llmuxd.bus.connection import DBUS_NAME, call_bus_daemon, harden
from llmuxd.bus.errors import (
    INVALID_ARGS,
    UNKNOWN_METHOD,
    UNKNOWN_OBJECT,
    InvalidArgument,
    NoSuchLease,
    one_line,
)
from llmuxd.bus.introspection import render_node
from llmuxd.errors import InvalidConfig, InvalidEviction, LLMuxError, UnknownModel
from llmuxd.eviction import Eviction, EvictionError
from llmuxd.names import (
    BUS_NAME,
    MANAGER_IFACE,
    MANAGER_PATH,
    MODEL_IFACE,
    MODEL_PATH_PREFIX,
    model_from_object_path,
    model_object_path,
    unit_name,
)

log = logging.getLogger(__name__)

API_VERSION = 2
USEC = 1_000_000
UINT64_MAX = 2**64 - 1
#: the longest a caller can make a bus method wait; UINT64_MAX ("infinity") means this
MAX_WAIT_S = 86400.0
MODES = ("auto", "manual")

OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
NAME_OWNER_CHANGED_RULE = (
    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
    "member='NameOwnerChanged',path='/org/freedesktop/DBus'"
)


def timeout_from_usec(value: int) -> Optional[float]:
    """A `t` timeout from the bus, in seconds: 0 means the configured default
    (None); anything above a day, UINT64_MAX included, waits a day."""
    if value <= 0:
        return None
    return min(value / USEC, MAX_WAIT_S)


def to_usec(seconds: Optional[float]) -> int:
    """Seconds as a `t` in microseconds; None (unknown) is 0, inf is UINT64_MAX."""
    if seconds is None or seconds != seconds or seconds <= 0:
        return 0
    if seconds == float("inf"):
        return UINT64_MAX
    return min(int(round(seconds * USEC)), UINT64_MAX)


def _text(value: Any) -> str:
    if value is None:
        return ""
    return str(getattr(value, "value", value))


def parse_eviction(text: str) -> Optional[Eviction]:
    """'' means 'the configured eviction'; anything else must parse."""
    if not text.strip():
        return None
    try:
        return Eviction.parse(text)
    except EvictionError as exc:
        raise InvalidEviction(str(exc)) from None


#: SwitchWithOptions' options: name -> (D-Bus signature, default)
SWITCH_OPTIONS = {"force": ("b", False), "wait": ("b", False), "timeout_usec": ("t", 0)}


def parse_switch_options(options: dict) -> tuple[bool, bool, int]:
    """(force, wait, timeout_usec) from an a{sv}; unknown names and wrong types are InvalidArgument."""
    known = ", ".join(f"{name} ({sig})" for name, (sig, _) in SWITCH_OPTIONS.items())
    values = {name: default for name, (_, default) in SWITCH_OPTIONS.items()}
    for name, variant in options.items():
        if name not in SWITCH_OPTIONS:
            raise InvalidArgument(f"unknown switch option '{name}'; known options: {known}")
        signature = SWITCH_OPTIONS[name][0]
        if variant.signature != signature:
            raise InvalidArgument(f"switch option '{name}' must have type '{signature}', not '{variant.signature}'")
        values[name] = variant.value
    return bool(values["force"]), bool(values["wait"]), int(values["timeout_usec"])


class ManagerInterface(SecureInterface):
    """io.llmux.LLMux1.Manager at /io/llmux/LLMux1."""

    PROPERTY_EMITS = {"Version": "const", "APIVersion": "const"}

    def __init__(self, service: "Optional[LLMuxService]") -> None:
        super().__init__(MANAGER_IFACE)
        self.service = service
        self.authorizer: Authorizer = service.authorizer if service else AllowAll()

    def _prop(self, name: str, default: Any) -> Any:
        return self.service.manager_cache.get(name, default) if self.service else default

    # -- methods -----------------------------------------------------------

    @bus_method(action=ACTION_CONTROL)
    async def Switch(self, model: "s"):
        """Queue a switch to MODEL and return at once; SwitchStarted and SwitchFinished report its course."""
        await self.service.switch(model, wait=False, timeout=None)

    @bus_method(action=ACTION_CONTROL)
    async def SwitchAndWait(self, model: "s", timeout_usec: "t"):
        """Switch to MODEL and return when it is active; TIMEOUT_USEC 0 uses the configured timeout (error Timeout after it)."""
        await self.service.switch(model, wait=True, timeout=timeout_from_usec(timeout_usec))

    @bus_method(action=ACTION_CONTROL)
    async def SwitchWithOptions(self, model: "s", options: "a{sv}"):
        """Switch to MODEL with OPTIONS: force (b: in manual mode, move the pin to MODEL first, as llmux 0.7's /control/switch did), wait (b: return when MODEL is active), timeout_usec (t: with wait; 0 = the configured timeout)."""
        force, wait, timeout_usec = parse_switch_options(options)
        await self.service.switch(model, wait=wait, timeout=timeout_from_usec(timeout_usec), force=force)

    @bus_method(action=ACTION_CONTROL)
    async def Pin(self, model: "s"):
        """Enter manual mode pinned to MODEL (switching to it); requests for other models wait or fail with ModelPinned."""
        await self.service.pin(model)

    @bus_method(action=ACTION_CONTROL)
    async def Unpin(self):
        """Leave manual mode: back to automatic switching."""
        await self.service.switcher.unpin()
        self.service.refresh_soon()

    @bus_method(action=ACTION_CONTROL)
    async def SetMode(self, mode: "s"):
        """Set the switching mode: 'auto' (switch on demand) or 'manual' (only the active model is served)."""
        await self.service.set_mode(mode)

    @bus_method(action=ACTION_CONTROL)
    async def Sleep(self, model: "s", eviction: "s"):
        """Evict MODEL now with EVICTION (e.g. 'offload+keep_running'); an empty EVICTION uses the model's configured one."""
        await self.service.sleep(model, eviction)

    @bus_method(action=ACTION_CONTROL)
    async def Wake(self, model: "s"):
        """Wake MODEL (evicting others as the switcher's rules say)."""
        await self.service.wake(model)

    @bus_method(action=ACTION_CONTROL)
    async def SetEviction(self, model: "s", eviction: "s"):
        """Override MODEL's eviction until restart; an empty EVICTION goes back to the configured one."""
        await self.service.set_eviction(model, eviction)

    @bus_method(action=ACTION_RELOAD)
    async def Reload(self):
        """Re-read the configuration; fails with InvalidConfig (and keeps the running one) if it is wrong."""
        await self.service.reload()

    @bus_method(action=ACTION_ACQUIRE, out_names=("endpoint", "lease"))
    async def Acquire(self, model: "s", timeout_usec: "t") -> "st":
        """Wait until MODEL is active and hold it there; returns its HTTP endpoint and a lease id for Release. The lease ends with the caller's connection."""
        return await self.service.acquire(model, timeout_usec)

    @bus_method(action=ACTION_ACQUIRE)
    async def Release(self, lease: "t"):
        """Release a lease taken with Acquire by this connection."""
        self.service.release(lease)

    @bus_method(public=True, out_names=("status",))
    async def GetStatus(self) -> "a{sv}":
        """Everything at once: mode, pinned, state, active_models and per-model status under 'models'."""
        return self.service.status_dict()

    # -- signals -----------------------------------------------------------

    @signal()
    def SwitchStarted(self, from_model, to_model) -> "ss":
        """A switch began; FROM_MODEL is empty when nothing was active."""
        return [from_model, to_model]

    @signal()
    def SwitchFinished(self, from_model, to_model, ok, duration_usec, error) -> "ssbts":
        """A switch ended: OK, how long it took, and the error message when it failed."""
        return [from_model, to_model, ok, duration_usec, error]

    # -- properties --------------------------------------------------------

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":
        """The llmux version."""
        return self.service.version if self.service else ""

    @dbus_property(access=PropertyAccess.READ)
    def APIVersion(self) -> "u":
        """Revision of this interface; additive changes raise it, incompatible ones rename the bus name."""
        return API_VERSION

    @dbus_property(access=PropertyAccess.READ)
    def Mode(self) -> "s":
        """'auto' or 'manual'."""
        return self._prop("Mode", "auto")

    @dbus_property(access=PropertyAccess.READ)
    def PinnedModel(self) -> "s":
        """The model pinned in manual mode, or empty."""
        return self._prop("PinnedModel", "")

    @dbus_property(access=PropertyAccess.READ)
    def ActiveModels(self) -> "as":
        """Models awake and serving now."""
        return self._prop("ActiveModels", [])

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        """'idle', 'active:A[,B]' or 'switching:FROM->TO'."""
        return self._prop("State", "idle")

    @dbus_property(access=PropertyAccess.READ)
    def Models(self) -> "ao":
        """Object paths of the configured models."""
        return self._prop("Models", [])


class ModelInterface(SecureInterface):
    """io.llmux.LLMux1.Model at /io/llmux/LLMux1/model/<escaped name>."""

    PROPERTY_EMITS = {
        "Name": "const",
        "InFlight": "false",
        "QueueDepth": "false",
        "WaitEstimateUSec": "false",
    }
    VOLATILE = ("InFlight", "QueueDepth", "WaitEstimateUSec")

    def __init__(self, service: "Optional[LLMuxService]", model: str) -> None:
        super().__init__(MODEL_IFACE)
        self.service = service
        self.model = model
        self.authorizer: Authorizer = service.authorizer if service else AllowAll()

    def _prop(self, name: str, default: Any) -> Any:
        if not self.service:
            return default
        if name in self.VOLATILE:
            return self.service.live_model_props(self.model).get(name, default)
        return self.service.model_cache.get(self.model, {}).get(name, default)

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        """The model's public name (the 'model' field of requests)."""
        return self.model

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        """asleep, waking, active, draining, evicting or failed (the switcher's view of the model)."""
        return self._prop("State", "")

    @dbus_property(access=PropertyAccess.READ)
    def ProcessState(self) -> "s":
        """not_started, starting, running, sleeping:WEIGHTS+PROCESS, checkpointed, stopped or failed (see LastError): where the backend is, as llmux 0.7's status said it."""
        return self._prop("ProcessState", "")

    @dbus_property(access=PropertyAccess.READ)
    def Eviction(self) -> "s":
        """What the next sleep does, as WEIGHTS+PROCESS (after any SetEviction override)."""
        return self._prop("Eviction", "")

    @dbus_property(access=PropertyAccess.READ)
    def Unit(self) -> "s":
        """The systemd unit running the backend (empty when the daemon runs embedded)."""
        return self._prop("Unit", "")

    @dbus_property(access=PropertyAccess.READ)
    def Endpoint(self) -> "s":
        """Base URL of the backend's HTTP server."""
        return self._prop("Endpoint", "")

    @dbus_property(access=PropertyAccess.READ)
    def Group(self) -> "s":
        """The GPU group the model shares memory with."""
        return self._prop("Group", "")

    @dbus_property(access=PropertyAccess.READ)
    def InFlight(self) -> "u":
        """Requests being served now (read it; no change signal)."""
        return self._prop("InFlight", 0)

    @dbus_property(access=PropertyAccess.READ)
    def QueueDepth(self) -> "u":
        """Requests waiting for this model (read it; no change signal)."""
        return self._prop("QueueDepth", 0)

    @dbus_property(access=PropertyAccess.READ)
    def WaitEstimateUSec(self) -> "t":
        """How long a request for this model would wait now, estimated."""
        return self._prop("WaitEstimateUSec", 0)

    @dbus_property(access=PropertyAccess.READ)
    def LastError(self) -> "s":
        """The last failure of this model, or empty."""
        return self._prop("LastError", "")

    @dbus_property(access=PropertyAccess.READ)
    def LastSwitchUSec(self) -> "t":
        """How long the last switch to this model took (0 if none yet)."""
        return self._prop("LastSwitchUSec", 0)


class LLMuxService:
    """The bus side of the daemon: exported objects, leases, change signals."""

    def __init__(
        self,
        bus: Any,
        switcher: Any,
        *,
        reload: Callable[[], Awaitable[None]],
        version: str,
        authorizer: Authorizer,
        unit_names: bool = True,
        refresh_interval: float = 1.0,
        key_usage: Optional[Callable[[], dict]] = None,
    ) -> None:
        self.bus = bus
        #: per API key id: requests, in_flight, limited, last_used (epoch s or None); for GetStatus
        self.key_usage = key_usage
        self.switcher = switcher
        self.version = version
        self.authorizer = authorizer
        self._reload = reload
        self._unit_names = unit_names
        self._refresh_interval = refresh_interval
        self.manager_cache: dict[str, Any] = {}
        self.model_cache: dict[str, dict[str, Any]] = {}
        self.models: dict[str, ModelInterface] = {}
        self.manager = ManagerInterface(self)
        self._leases: dict[int, tuple[str, Any]] = {}
        self._lease_ids = itertools.count(1)
        self._refresh_pending = False
        self._tasks: set[asyncio.Task] = set()
        self._ticker: Optional[asyncio.Task] = None
        self._unsubscribe: Optional[Callable[[], None]] = None
        self._closed = False

    # -- setup -------------------------------------------------------------

    async def start(self) -> None:
        harden(self.bus)
        self.bus.add_message_handler(self._on_message)
        await call_bus_daemon(self.bus, "AddMatch", "s", [NAME_OWNER_CHANGED_RULE])
        status = self.switcher.status()
        self.manager_cache = self._manager_props(status)
        self.bus.export(MANAGER_PATH, self.manager)
        self._sync_models(status)
        self._unsubscribe = self.switcher.subscribe(self._on_event)
        if self._refresh_interval > 0:
            self._ticker = asyncio.ensure_future(self._tick())

    async def request_name(self, *, replace: bool = False) -> None:
        """Own io.llmux.LLMux1; raise RuntimeError if another process has it."""
        flags = NameFlag.DO_NOT_QUEUE | (NameFlag.REPLACE_EXISTING if replace else NameFlag.NONE)
        reply = await self.bus.request_name(BUS_NAME, flags)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise RuntimeError(
                f"{BUS_NAME} is already owned on this bus; is another llmuxd running? "
                f"(busctl status {BUS_NAME})"
            )

    async def close(self) -> None:
        """Stop signalling, release bus leases and unexport everything."""
        if self._closed:
            return
        self._closed = True
        if self._unsubscribe:
            self._unsubscribe()
        if self._ticker:
            self._ticker.cancel()
        for task in list(self._tasks):
            task.cancel()
        for lease_id in list(self._leases):
            self._release_id(lease_id)
        try:
            self.bus.remove_message_handler(self._on_message)
            for name in list(self.models):
                self._unexport_model(name)
            self.bus.unexport(MANAGER_PATH, self.manager)
        except Exception:  # the bus may be gone already
            log.debug("bus closed before the service", exc_info=True)

    # -- operations (the interfaces delegate here) -------------------------

    def _known(self, model: str) -> None:
        models = self.switcher.status().models
        if model not in models:
            raise UnknownModel(model, list(models))

    async def switch(self, model: str, *, wait: bool, timeout: Optional[float], force: bool = False) -> None:
        self._known(model)
        try:
            await self.switcher.switch(model, wait=wait, timeout=timeout, force=force)
        finally:
            self.refresh_soon()

    async def pin(self, model: str) -> None:
        self._known(model)
        try:
            await self.switcher.pin(model)
        finally:
            self.refresh_soon()

    async def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise InvalidArgument(f"unknown mode '{mode}'; use one of: {', '.join(MODES)}")
        await self.switcher.set_mode(mode)
        self.refresh_soon()

    async def sleep(self, model: str, eviction: str) -> None:
        self._known(model)
        parsed = parse_eviction(eviction)
        try:
            await self.switcher.sleep_model(model, parsed)
        finally:
            self.refresh_soon()

    async def wake(self, model: str) -> None:
        self._known(model)
        try:
            await self.switcher.wake_model(model)
        finally:
            self.refresh_soon()

    async def set_eviction(self, model: str, eviction: str) -> None:
        self._known(model)
        self.switcher.set_eviction(model, parse_eviction(eviction))
        self.refresh_soon()

    async def reload(self) -> None:
        try:
            await self._reload()
        except LLMuxError:
            raise
        except Exception as exc:  # ConfigError and friends: the message says what to fix
            raise InvalidConfig(f"reload failed, the running configuration stays: {one_line(exc)}") from None
        finally:
            self.refresh_soon()
        self._refresh()

    async def acquire(self, model: str, timeout_usec: int) -> list:
        caller = current_caller()
        self._known(model)
        lease = await self.switcher.acquire(model, timeout_from_usec(timeout_usec))
        lease_id = next(self._lease_ids)
        sender = caller.sender if caller else ""
        self._leases[lease_id] = (sender, lease)
        # The caller may have left while it waited; NameOwnerChanged came before
        # the lease existed, so ask now.
        if not sender or not await self._has_owner(sender):
            self._release_id(lease_id)
        return [lease.endpoint, lease_id]

    def release(self, lease_id: int) -> None:
        caller = current_caller()
        entry = self._leases.get(lease_id)
        if entry is None or caller is None or entry[0] != caller.sender:
            raise NoSuchLease(lease_id)
        self._release_id(lease_id)

    def _release_id(self, lease_id: int) -> None:
        entry = self._leases.pop(lease_id, None)
        if entry is not None:
            try:
                entry[1].release()
            except Exception:
                log.exception("releasing bus lease %d failed", lease_id)

    def leases_of(self, sender: str) -> list[int]:
        return [i for i, (owner, _lease) in self._leases.items() if owner == sender]

    def status_dict(self) -> dict[str, Variant]:
        st = self.switcher.status()
        models = {}
        for name, ms in st.models.items():
            props = self._model_props(name, ms)
            models[name] = {
                "state": Variant("s", props["State"]),
                "process_state": Variant("s", props["ProcessState"]),
                "eviction": Variant("s", props["Eviction"]),
                "unit": Variant("s", props["Unit"]),
                "endpoint": Variant("s", props["Endpoint"]),
                "group": Variant("s", props["Group"]),
                "in_flight": Variant("u", props["InFlight"]),
                "queue_depth": Variant("u", props["QueueDepth"]),
                "wait_estimate_usec": Variant("t", props["WaitEstimateUSec"]),
                "last_error": Variant("s", props["LastError"]),
                "last_switch_usec": Variant("t", props["LastSwitchUSec"]),
            }
        result = {
            "version": Variant("s", self.version),
            "api_version": Variant("u", API_VERSION),
            "mode": Variant("s", _text(st.mode) or "auto"),
            "pinned": Variant("s", _text(st.pinned)),
            "state": Variant("s", _text(st.state)),
            "active_models": Variant("as", list(st.active_models)),
            "models": Variant("a{sa{sv}}", models),
        }
        keys = self._keys_status()
        if keys:
            result["keys"] = Variant("a{sa{sv}}", keys)
        return result

    def _keys_status(self) -> dict[str, dict[str, Variant]]:
        """Per API key id (never a secret): requests admitted, in flight, refused by a limit, last use."""
        if self.key_usage is None:
            return {}
        try:
            usage = self.key_usage()
        except Exception:  # noqa: BLE001 - status must not fail on it
            log.exception("reading API key usage failed")
            return {}
        return {
            key_id: {
                "requests": Variant("t", max(0, int(u["requests"]))),
                "in_flight": Variant("u", max(0, min(int(u["in_flight"]), 2**32 - 1))),
                "limited": Variant("t", max(0, int(u["limited"]))),
                "last_used_usec": Variant("t", int(u["last_used"] * 1_000_000) if u.get("last_used") else 0),
            }
            for key_id, u in usage.items()
        }

    # -- properties --------------------------------------------------------

    def _manager_props(self, st: Any) -> dict[str, Any]:
        return {
            "Mode": _text(st.mode) or "auto",
            "PinnedModel": _text(st.pinned),
            "ActiveModels": list(st.active_models),
            "State": _text(st.state),
            "Models": [model_object_path(m) for m in sorted(st.models)],
        }

    def _model_props(self, name: str, ms: Any) -> dict[str, Any]:
        return {
            "State": _text(ms.state),
            "ProcessState": _text(getattr(ms, "process_state", "")),
            "Eviction": _text(ms.eviction),
            "Unit": unit_name(name) if self._unit_names else "",
            "Endpoint": _text(ms.endpoint),
            "Group": _text(ms.group),
            "InFlight": max(0, min(int(ms.in_flight or 0), 2**32 - 1)),
            "QueueDepth": max(0, min(int(ms.queue_depth or 0), 2**32 - 1)),
            "WaitEstimateUSec": to_usec(ms.wait_estimate),
            "LastError": one_line(ms.last_error) if ms.last_error else "",
            "LastSwitchUSec": to_usec(ms.last_switch_s),
        }

    def live_model_props(self, name: str) -> dict[str, Any]:
        """Current values for the volatile properties (a property getter must
        never raise: dbus-fast 1.84 would send the traceback)."""
        try:
            ms = self.switcher.status().models.get(name)
            return self._model_props(name, ms) if ms is not None else {}
        except Exception:
            log.exception("reading the status of '%s' failed", name)
            return {}

    def refresh_soon(self) -> None:
        """Diff the properties on the next loop turn (coalescing bursts of events)."""
        if self._refresh_pending or self._closed:
            return
        self._refresh_pending = True
        asyncio.get_running_loop().call_soon(self._refresh)

    def _refresh(self) -> None:
        self._refresh_pending = False
        if self._closed:
            return
        try:
            st = self.switcher.status()
            self._sync_models(st)
            new = self._manager_props(st)
            changed = {k: v for k, v in new.items() if self.manager_cache.get(k) != v}
            self.manager_cache = new
            if changed:
                self.manager.emit_properties_changed(changed)
            for name, ms in st.models.items():
                props = self._model_props(name, ms)
                old = self.model_cache.get(name, {})
                self.model_cache[name] = props
                changed = {
                    k: v
                    for k, v in props.items()
                    if k not in ModelInterface.VOLATILE and old.get(k) != v
                }
                if changed and name in self.models:
                    self.models[name].emit_properties_changed(changed)
        except Exception:
            log.exception("refreshing bus properties failed")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_interval)
            self._refresh()

    def _sync_models(self, st: Any) -> None:
        want = set(st.models)
        for name in sorted(set(self.models) - want):
            self._unexport_model(name)
        for name in sorted(want - set(self.models)):
            self.model_cache[name] = self._model_props(name, st.models[name])
            iface = ModelInterface(self, name)
            self.models[name] = iface
            path = model_object_path(name)
            self.bus.export(path, iface)
            self._emit_object_manager(
                "InterfacesAdded",
                "oa{sa{sv}}",
                [path, {MODEL_IFACE: self._model_variants(name)}],
            )

    def _unexport_model(self, name: str) -> None:
        iface = self.models.pop(name)
        self.model_cache.pop(name, None)
        path = model_object_path(name)
        self.bus.unexport(path, iface)
        self._emit_object_manager("InterfacesRemoved", "oas", [path, [MODEL_IFACE]])

    def _model_variants(self, name: str) -> dict[str, Variant]:
        sigs = {"Name": "s", "InFlight": "u", "QueueDepth": "u", "WaitEstimateUSec": "t", "LastSwitchUSec": "t"}
        props = dict(self.model_cache.get(name, {}), Name=name)
        return {k: Variant(sigs.get(k, "s"), v) for k, v in props.items()}

    def _emit_object_manager(self, member: str, signature: str, body: list) -> None:
        """ObjectManager signals come from the manager's path (dbus-fast sends
        its own from the child's path, which ObjectManager clients ignore)."""
        if getattr(self.bus, "connected", True):
            self.bus.send(
                Message.new_signal(MANAGER_PATH, OBJECT_MANAGER_IFACE, member, signature, body)
            )

    # -- switcher events ---------------------------------------------------

    def _on_event(self, event: Any) -> None:
        kind = type(event).__name__
        try:
            if kind == "SwitchStarted":
                self.manager.SwitchStarted(event.from_model or "", event.to_model or "")
            elif kind == "SwitchFinished":
                self.manager.SwitchFinished(
                    event.from_model or "",
                    event.to_model or "",
                    bool(event.ok),
                    to_usec(event.duration),
                    one_line(event.error) if event.error else "",
                )
        except Exception:
            log.exception("emitting %s on the bus failed", kind)
        self.refresh_soon()

    # -- bus plumbing ------------------------------------------------------

    async def _has_owner(self, name: str) -> bool:
        reply = await call_bus_daemon(self.bus, "NameHasOwner", "s", [name])
        return reply.message_type == MessageType.METHOD_RETURN and bool(reply.body[0])

    def _client_left(self, unique_name: str) -> None:
        self.authorizer.forget(unique_name)
        for lease_id in self.leases_of(unique_name):
            log.info("releasing lease %d: %s left the bus", lease_id, unique_name)
            self._release_id(lease_id)

    def _on_message(self, msg: Message) -> Optional[Message]:
        """Runs before dbus-fast dispatches: remember the caller, answer
        Introspect ourselves, and give unknown paths, members and signatures
        errors a person can act on."""
        mtype = msg.message_type
        if mtype == MessageType.SIGNAL:
            if msg.member == "NameOwnerChanged" and msg.sender == DBUS_NAME and len(msg.body) == 3:
                name, _old, new = msg.body
                if name.startswith(":") and not new:
                    self._client_left(name)
            return None
        if mtype != MessageType.METHOD_CALL:
            return None
        path = msg.path or ""
        if path != MANAGER_PATH and not path.startswith(MANAGER_PATH + "/"):
            return None
        CALLER.set(caller_of(msg))
        exported = self._interfaces_at(path)
        intermediate = path == MODEL_PATH_PREFIX
        if exported is None and not intermediate:
            known = ", ".join(sorted(self.models)) or "none"
            wanted = model_from_object_path(path)
            what = f"model '{wanted}'" if wanted else f"object {path}"
            return Message.new_error(
                msg, UNKNOWN_OBJECT, f"no {what} here; models: {known} (busctl tree {BUS_NAME})"
            )
        if msg.interface == "org.freedesktop.DBus.Introspectable" and msg.member == "Introspect":
            if msg.signature != "":
                return None
            xml = render_node(
                exported or [],
                self._children(path),
                object_manager=path == MANAGER_PATH,
            )
            return Message.new_method_return(msg, "s", [xml])
        if msg.interface in (MANAGER_IFACE, MODEL_IFACE):
            iface = next((i for i in exported or [] if i.name == msg.interface), None)
            if iface is None:
                return Message.new_error(
                    msg,
                    "org.freedesktop.DBus.Error.UnknownInterface",
                    f"{path} has no interface {msg.interface}",
                )
            for member in type(iface).__dict__.values():
                m = getattr(member, "__dict__", {}).get("__DBUS_METHOD")
                if m is not None and m.name == msg.member:
                    if m.in_signature != (msg.signature or ""):
                        args = ", ".join(f"{a.signature} {a.name}" for a in m.introspection.in_args)
                        return Message.new_error(
                            msg,
                            INVALID_ARGS,
                            f"{m.name} takes ({args}), not signature '{msg.signature}'",
                        )
                    return None
            return Message.new_error(
                msg,
                UNKNOWN_METHOD,
                f"{msg.interface} has no method {msg.member} (busctl introspect {BUS_NAME} {path})",
            )
        return None

    def _interfaces_at(self, path: str) -> Optional[list]:
        if path == MANAGER_PATH:
            return [self.manager]
        name = model_from_object_path(path)
        if name is not None and name in self.models and model_object_path(name) == path:
            return [self.models[name]]
        return None

    def _children(self, path: str) -> list[str]:
        if path == MANAGER_PATH:
            return ["model"] if self.models else []
        if path == MODEL_PATH_PREFIX:
            return [model_object_path(m).rsplit("/", 1)[1] for m in self.models]
        return []


async def export_service(
    bus: Any,
    switcher: Any,
    *,
    reload: Callable[[], Awaitable[None]],
    version: str,
    authorizer: Optional[Authorizer] = None,
    unit_names: bool = True,
    refresh_interval: float = 1.0,
    key_usage: Optional[Callable[[], dict]] = None,
) -> LLMuxService:
    """Export the manager and model objects on `bus` for `switcher`.

    `reload` re-reads the configuration and hands it to the switcher (the
    daemon's job); `authorizer` defaults to polkit. Call `request_name()` on
    the result once everything else is ready, and `close()` on shutdown.
    """
    service = LLMuxService(
        bus,
        switcher,
        reload=reload,
        version=version,
        authorizer=authorizer if authorizer is not None else PolkitAuthorizer(bus),
        unit_names=unit_names,
        refresh_interval=refresh_interval,
        key_usage=key_usage,
    )
    await service.start()
    return service
