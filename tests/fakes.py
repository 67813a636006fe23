"""Test doubles shared by the rooms: FakeBackends, a virtual-time event loop, configs.

`FakeBackends` implements `llmuxd.lifecycle.Backends` in memory with
controllable delays, failures, holds (an operation waits until the test lets it
go) and unexpected exits, and it checks invariant I1 itself: every model it
loads is counted against its GPU group's budget, and a breach is recorded in
`violations` (not raised: the switcher would swallow it as a wake failure).

`VirtualTimeLoop` is an asyncio event loop whose clock only moves when every
task is blocked: `asyncio.sleep(300)` returns at once with `loop.time()` 300 s
later. Timers, `wait_for` and the switcher's deadlines all run on it, so
scenario tests and the policy simulator are fast and deterministic.

Import as `from fakes import ...` from tests (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple, TypeVar

from llmuxd.errors import BackendError
from llmuxd.eviction import Eviction, ProcessStrategy
from llmuxd.lifecycle import BackendState

T = TypeVar("T")

#: operations a test can delay, fail or hold: "start" is a cold start, "wake" a warm one
OPS = ("start", "wake", "sleep", "stop")


class FakeBackends:
    """In-memory backends; see the module docstring."""

    def __init__(
        self,
        models: "Iterable[str] | Any",
        *,
        groups: Optional[Mapping[str, str]] = None,
        memory: Optional[Mapping[str, Optional[float]]] = None,
        budgets: Optional[Mapping[str, Optional[float]]] = None,
        wake_delay: float = 0.0,
        start_delay: float = 0.0,
        sleep_delay: float = 0.0,
        stop_delay: float = 0.0,
    ):
        if hasattr(models, "models"):  # a Config: take groups, memory and budgets from it
            config = models
            names = list(config.models)
            groups = {n: mc.gpu_group for n, mc in config.models.items()}
            memory = {n: mc.gpu_memory_gib for n, mc in config.models.items()}
            budgets = {n: gc.budget_gib for n, gc in config.groups.items()}
        else:
            names = list(models)
        self.groups: Dict[str, str] = {n: (groups or {}).get(n, "default") for n in names}
        self.memory: Dict[str, Optional[float]] = {n: (memory or {}).get(n) for n in names}
        self.budgets: Dict[str, Optional[float]] = dict(budgets or {})
        self.states: Dict[str, BackendState] = {n: BackendState.NOT_STARTED for n in names}
        self.ports: Dict[str, int] = {n: 20000 + i for i, n in enumerate(names)}
        #: models holding GPU memory (loading, awake, or failed but not yet stopped)
        self.on_gpu: Set[str] = set()
        self.violations: List[str] = []
        self.calls: List[Tuple[str, ...]] = []
        self.default_delays: Dict[str, float] = {
            "start": start_delay, "wake": wake_delay, "sleep": sleep_delay, "stop": stop_delay,
        }
        self.delays: Dict[Tuple[str, str], float] = {}
        self._failures: Dict[Tuple[str, str], Tuple[Optional[int], str]] = {}
        self._holds: Dict[Tuple[str, str], asyncio.Event] = {}
        self._entered: Dict[Tuple[str, str], asyncio.Event] = {}
        self._callbacks: List[Callable[[str, str], None]] = []
        self.peak_awake: Dict[str, int] = {}

    # -- test controls -------------------------------------------------------

    def add_model(self, name: str, group: str = "default", memory: Optional[float] = None) -> None:
        self.groups[name] = group
        self.memory[name] = memory
        self.states.setdefault(name, BackendState.NOT_STARTED)
        self.ports.setdefault(name, 20000 + len(self.ports))

    def set_delay(self, op: str, seconds: float, model: Optional[str] = None) -> None:
        if model is None:
            self.default_delays[op] = seconds
        else:
            self.delays[(op, model)] = seconds

    def fail(self, op: str, model: str, reason: str = "injected failure", times: Optional[int] = 1) -> None:
        """Make the next `times` `op`s of `model` fail (None: until `heal`)."""
        self._failures[(op, model)] = (times, reason)

    def heal(self, op: str, model: str) -> None:
        self._failures.pop((op, model), None)

    def hold(self, op: str, model: str) -> asyncio.Event:
        """`op` on `model` waits until the returned event is set."""
        event = self._holds.get((op, model))
        if event is None:
            event = self._holds[(op, model)] = asyncio.Event()
        return event

    def entered(self, op: str, model: str) -> asyncio.Event:
        """Set once `op` has begun on `model` (stays set)."""
        event = self._entered.get((op, model))
        if event is None:
            event = self._entered[(op, model)] = asyncio.Event()
        return event

    def kill(self, model: str, reason: str = "killed by the test") -> None:
        """The backend dies on its own (OOM, Xid, SIGKILL)."""
        self.states[model] = BackendState.STOPPED
        self.on_gpu.discard(model)
        self.calls.append(("died", model))
        for callback in list(self._callbacks):
            callback(model, reason)

    def count(self, op: str, model: Optional[str] = None) -> int:
        return sum(1 for c in self.calls if c[0] == op and (model is None or c[1] == model))

    def awake(self) -> Set[str]:
        return {m for m, s in self.states.items() if s is BackendState.READY}

    # -- the Backends protocol ----------------------------------------------

    async def ensure_awake(self, model: str) -> None:
        state = self.states[model]
        if state is BackendState.READY:
            return
        op = "wake" if state is BackendState.SLEEPING else "start"
        self.calls.append((op, model))
        self._load(model)
        self.states[model] = BackendState.STARTING
        await self._run(op, model)
        self.states[model] = BackendState.READY

    async def sleep(self, model: str, eviction: Eviction) -> None:
        self.calls.append(("sleep", model, str(eviction)))
        await self._run("sleep", model)
        if eviction.process is ProcessStrategy.STOP:
            self.states[model] = BackendState.STOPPED
        elif eviction.process is ProcessStrategy.CHECKPOINT:
            self.states[model] = BackendState.CHECKPOINTED
        else:
            self.states[model] = BackendState.SLEEPING
        self.on_gpu.discard(model)

    async def stop(self, model: str) -> None:
        self.calls.append(("stop", model))
        await self._run("stop", model)
        self.states[model] = BackendState.STOPPED
        self.on_gpu.discard(model)

    def state(self, model: str) -> BackendState:
        return self.states[model]

    def endpoint(self, model: str) -> str:
        return f"http://127.0.0.1:{self.ports[model]}"

    def on_unexpected_exit(self, callback: Callable[[str, str], None]) -> None:
        self._callbacks.append(callback)

    # -- internals -------------------------------------------------------------

    async def _run(self, op: str, model: str) -> None:
        self.entered(op, model).set()
        hold = self._holds.get((op, model))
        if hold is not None:
            await hold.wait()
        delay = self.delays.get((op, model), self.default_delays.get(op, 0.0))
        if delay > 0:
            await asyncio.sleep(delay)
        failure = self._failures.get((op, model))
        if failure is not None:
            times, reason = failure
            if times is not None:
                if times <= 1:
                    del self._failures[(op, model)]
                else:
                    self._failures[(op, model)] = (times - 1, reason)
            if op in ("start", "wake"):
                self.states[model] = BackendState.FAILED  # still holds GPU memory until stopped
            raise BackendError(model, op, reason)

    def _load(self, model: str) -> None:
        """Count `model` on its group's GPU and record any breach of the budget (I1)."""
        group = self.groups.get(model, "default")
        self.on_gpu.add(model)
        loaded = [m for m in self.on_gpu if self.groups.get(m, "default") == group]
        self.peak_awake[group] = max(self.peak_awake.get(group, 0), len(loaded))
        budget = self.budgets.get(group)
        if budget is None:
            if len(loaded) > 1:
                self.violations.append(f"group {group}: {sorted(loaded)} on the GPU at once (one allowed)")
            return
        used = sum(self.memory.get(m) or budget for m in loaded)
        if used > budget + 1e-6:
            self.violations.append(f"group {group}: {sorted(loaded)} use {used} GiB > budget {budget}")


# ---------------------------------------------------------------------------- virtual time


class _InstantSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Polls real file descriptors without blocking; a wait jumps the loop's clock instead."""

    loop: "VirtualTimeLoop"

    def select(self, timeout: Optional[float] = None):  # type: ignore[override]
        events = super().select(0)
        if events:
            return events
        if timeout is None:
            raise VirtualDeadlock("every task waits and no timer is scheduled: the test would hang")
        if timeout > 0:
            self.loop._advance(timeout)
        return events


class VirtualDeadlock(RuntimeError):
    """Raised by VirtualTimeLoop where a real loop would block forever."""


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: see the module docstring."""

    def __init__(self) -> None:
        self._virtual_now = 0.0
        selector = _InstantSelector()
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self._virtual_now

    def _advance(self, seconds: float) -> None:
        self._virtual_now += seconds


def run_virtual(main: Callable[[], Awaitable[T]]) -> T:
    """Run `main()` on a fresh VirtualTimeLoop; leftover tasks are cancelled."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()


# ---------------------------------------------------------------------------- configs


def make_config(
    models: "Iterable[str] | Mapping[str, Mapping[str, Any]]" = ("a", "b"),
    *,
    policy: Optional[Mapping[str, Any]] = None,
    groups: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> Any:
    """A validated Config for models (names, or name → extra settings)."""
    from llmuxd.config import Config

    if isinstance(models, Mapping):
        specs = {name: dict(extra) for name, extra in models.items()}
    else:
        specs = {name: {} for name in models}
    data: Dict[str, Any] = {
        "models": {name: {"model_path": f"/models/{name}", **extra} for name, extra in specs.items()},
        "policy": dict(policy or {}),
        "groups": {name: dict(g) for name, g in (groups or {}).items()},
    }
    return Config.from_dict(data)




def virtual(test: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """Decorator: run an async test on a fresh VirtualTimeLoop (a plain sync test to pytest)."""
    import functools

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return run_virtual(lambda: test(*args, **kwargs))

    return wrapper
