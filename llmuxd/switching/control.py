"""Control operations: switch, pin, modes, sleep/wake, eviction overrides, reload.

A mixin of `llmuxd.switcher.Switcher`. Every operation runs through the
owning group's worker, in order with the switches requests cause (I6): there
is no path that wakes or sleeps a model behind the switcher's back.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Awaitable, Callable, Dict, List, Optional

from llmuxd.errors import InvalidEviction, ModelPinned, SwitchTimeout, UnknownModel
from llmuxd.events import ModeChanged
from llmuxd.eviction import DEFAULT_ENGINE, Eviction, EvictionError, check_engine
from llmuxd.policies import Policy, SwitchCosts, make_policy
from llmuxd.switching import concurrency
from llmuxd.switching.errors import InvalidMode, ShuttingDown
from llmuxd.switching.state import DEFAULT_GROUP, GroupRuntime, Listener, Mode, ModelRuntime, ModelState, Op


class Controls:
    """The control API of `Switcher` (the bus and llmuxctl call these)."""

    _config: Any
    _costs: SwitchCosts
    _policy: Policy
    _mode: Mode
    _pinned: Optional[str]
    _models: Dict[str, ModelRuntime]
    _groups: Dict[str, GroupRuntime]
    _closed: bool
    _started: bool
    _idle: Any  # llmuxd/switching/idle.py IdleEvictions
    _preloader: Any  # llmuxd/switching/preload.py Preloader

    def _submit(self, m: ModelRuntime, kind: str, eviction: Optional[Eviction] = None) -> "asyncio.Future[None]":
        if self._closed:
            raise ShuttingDown(m.name)
        self._ensure_tasks()
        g = self._groups[m.group]
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        g.ops.append(Op(kind, m, fut, eviction))
        assert g.wakeup is not None
        g.wakeup.set()
        return fut

    async def _await_op(self, m: ModelRuntime, fut: "asyncio.Future[None]", timeout: Optional[float]) -> None:
        """Wait for a queued operation; a caller that gives up never cancels the operation."""
        try:
            if timeout is None:
                await asyncio.shield(fut)
            else:
                await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            fut.add_done_callback(_consume)
            raise SwitchTimeout(m.name, timeout or 0.0, retry_after=self._retry_after(m)) from None
        except asyncio.CancelledError:
            fut.add_done_callback(_consume)
            raise

    async def switch(self, model: str, wait: bool = True, timeout: Optional[float] = None, force: bool = False) -> None:
        """Make `model` awake now (drain, sleep, wake). To the active model: a no-op.

        In manual mode with another model pinned: ModelPinned, unless `force`.
        A forced switch in manual mode first moves the pin to `model` (llmux
        0.7's /control/switch), and puts the previous pin back if the switch
        fails (as `pin` does); in auto mode it is a plain switch."""
        m = self._model(model)
        on_failure: Optional[Callable[[], None]] = None
        if self._mode is Mode.MANUAL and self._pinned != model:
            if not force and self._pinned is not None:
                raise ModelPinned(model, self._pinned, forceable=True)
            if force:
                on_failure = functools.partial(self._restore_pin, model, self._pinned)
                self._set_mode(Mode.MANUAL, model)
        await self._control_switch(m, wait, timeout, on_failure)

    def _restore_pin(self, model: str, previous: Optional[str]) -> None:
        """A forced switch failed: the pin goes back, unless something moved it since."""
        if self._mode is Mode.MANUAL and self._pinned == model:
            self._set_mode(Mode.MANUAL, previous)

    async def _control_switch(
        self, m: ModelRuntime, wait: bool, timeout: Optional[float], on_failure: Optional[Callable[[], None]] = None
    ) -> None:
        if m.state is ModelState.ACTIVE:
            return
        try:
            fut = self._submit(m, "switch")
        except BaseException:
            if on_failure is not None:
                on_failure()
            raise
        if on_failure is not None:
            fut.add_done_callback(lambda f: on_failure() if f.cancelled() or f.exception() is not None else None)
        if not wait:
            fut.add_done_callback(_consume)
            return
        await self._await_op(m, fut, timeout)

    async def pin(self, model: str) -> None:
        """Manual mode pinned to `model`, switching to it; on failure the previous mode is restored."""
        m = self._model(model)
        previous = (self._mode, self._pinned)
        self._set_mode(Mode.MANUAL, model)
        try:
            await self._control_switch(m, True, None)
        except BaseException:
            self._set_mode(*previous)
            raise

    async def unpin(self) -> None:
        self._set_mode(Mode.AUTO, None)

    async def set_mode(self, mode: str) -> None:
        """"auto" (switch on demand) or "manual" (only the pinned, or else the awake, models serve)."""
        text = str(mode).strip().lower() if isinstance(mode, (str, Mode)) else None
        if text not in ("auto", "manual"):
            raise InvalidMode(mode)
        if text == "auto":
            self._set_mode(Mode.AUTO, None)
        else:
            self._set_mode(Mode.MANUAL, self._pinned)

    def _set_mode(self, mode: Mode, pinned: Optional[str]) -> None:
        changed = (mode, pinned) != (self._mode, self._pinned)
        self._mode, self._pinned = mode, pinned
        if changed:
            self._emit(ModeChanged(mode.value, pinned))
        for g in self._groups.values():
            if g.wakeup is not None:
                self._reevaluate(g)

    async def sleep_model(self, model: str, eviction: "Eviction | str | None" = None) -> None:
        """Drain `model`, then sleep it with `eviction` (default: its configured/overridden one)."""
        m = self._model(model)
        ev = _parse_eviction(eviction) if eviction is not None else None
        if ev is not None:
            self._check_engine(model, ev)
        if not m.awake:
            return
        await self._await_op(m, self._submit(m, "sleep", ev), None)

    async def wake_model(self, model: str) -> None:
        """Wake `model`: a switch, with everything a switch does."""
        await self.switch(model, wait=True)

    def set_eviction(self, model: str, eviction: "Eviction | str | int | dict | None") -> None:
        """Override `model`'s eviction at runtime (None: back to the configured one)."""
        m = self._model(model)
        if eviction is None:
            m.eviction_override = None
            return
        ev = _parse_eviction(eviction)
        self._check_engine(model, ev)
        m.eviction_override = ev

    def _check_engine(self, model: str, eviction: Eviction) -> None:
        """An eviction the model's engine cannot do is refused before anything is touched."""
        config = self._config.models.get(model)
        try:
            check_engine(eviction, getattr(config, "engine", DEFAULT_ENGINE), model)
        except EvictionError as exc:
            raise InvalidEviction(str(exc)) from None

    def eviction_for(self, model: str) -> Eviction:
        m = self._model(model)
        if m.eviction_override is not None:
            return m.eviction_override
        return self._config.models[model].eviction

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(event)` synchronously for every event; returns the unsubscribe function."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    @property
    def switch_costs(self) -> Dict[str, float]:
        """Learned switch costs, "from→to" → seconds (persist across restarts)."""
        return self._costs.as_dict()

    def load_costs(self, costs: Dict[str, float]) -> None:
        self._costs.load(costs)

    @property
    def policy(self) -> Policy:
        return self._policy

    async def reload(self, config: Any) -> None:
        """Adopt a new config: new models join, removed ones are drained and stopped,
        the rest keep their state (awake, queues, overrides)."""
        self._config = config
        self._policy = make_policy(config.policy, self._costs)
        self._apply_groups(config)
        pending: List[Awaitable[None]] = []
        for name, mc in config.models.items():
            m = self._models.get(name)
            if m is None or m.removed:
                self._models[name] = ModelRuntime(name, mc.gpu_group, mc.gpu_memory_gib,
                                                  max_concurrency=concurrency.limit_of(mc))
                continue
            m.memory_gib = mc.gpu_memory_gib
            m.max_concurrency = concurrency.limit_of(mc)
            if m.group != mc.gpu_group:
                pending.append(self._move_group(m, mc.gpu_group))
        known = self._known_after(config)
        for name, m in list(self._models.items()):
            if name in config.models or m.removed:
                continue
            m.removed = True
            if self._pinned == name:
                self._set_mode(Mode.AUTO, None)
            self._fail_all(m, lambda name=name: UnknownModel(name, known))
            if m.state is ModelState.ACTIVE:
                self._set_state(m, ModelState.DRAINING)  # no new leases from now on
            pending.append(self._remove(m))
        if self._started:
            self._ensure_tasks()
            for g in self._groups.values():
                if self._policy.tick_interval is None and g.ticker is not None:
                    g.ticker.cancel()
                    g.ticker = None
        if pending:
            await asyncio.gather(*pending)
        for g in self._groups.values():
            if g.wakeup is not None:
                self._reevaluate(g)
        if self._started:
            self._idle.configure()
            self._preloader.run()

    def _known_after(self, config: Any) -> List[str]:
        return sorted(config.models)

    async def _remove(self, m: ModelRuntime) -> None:
        fut = self._submit(m, "remove")
        try:
            await asyncio.shield(fut)
        finally:
            g = self._groups[m.group]
            g.wanted.pop(m.name, None)
            handle = g.deferrals.pop(m.name, None)
            if handle is not None:
                handle.cancel()
            if self._models.get(m.name) is m:
                del self._models[m.name]

    async def _move_group(self, m: ModelRuntime, new_group: str) -> None:
        if m.awake:
            await asyncio.shield(self._submit(m, "sleep"))
        old = self._groups[m.group]
        old.wanted.pop(m.name, None)
        m.group = new_group

    def _apply_groups(self, config: Any) -> None:
        budgets: Dict[str, Optional[float]] = {DEFAULT_GROUP: None}
        for name, gc in getattr(config, "groups", {}).items():
            budgets[name] = gc.budget_gib
        for mc in config.models.values():
            budgets.setdefault(mc.gpu_group, None)
        for name, budget in budgets.items():
            g = self._groups.get(name)
            if g is None:
                self._groups[name] = GroupRuntime(name, budget)
            else:
                g.budget_gib = budget


def _parse_eviction(value: Any) -> Eviction:
    try:
        return Eviction.parse(value)
    except EvictionError as exc:
        raise InvalidEviction(str(exc)) from None


def _consume(fut: "asyncio.Future[Any]") -> None:
    """Mark a fire-and-forget future's exception as retrieved (logged by the switch already)."""
    if not fut.cancelled():
        fut.exception()
