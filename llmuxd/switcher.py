"""The switcher: which models are awake, who may send them requests, and when to switch.

Pure asyncio over `llmuxd.lifecycle.Backends`: no HTTP, D-Bus or systemd here,
so every behaviour is tested with fakes and a virtual clock.

Shape of the machine (DESIGN.md §4):

- Each GPU group has one *worker* task that runs its switches and control
  operations one at a time; groups switch independently and in parallel. A
  switch never runs in a request's task, so a client that goes away never
  cancels a half-done switch.
- A request for a model that is not awake joins that model's queue; the policy
  decides when the group's worker switches to it (now, after a deferral that is
  re-evaluated when it ends, or at a scheduler tick). Every wait has a deadline
  timer: a waiter whose deadline passes leaves the queue at once.
- When a switch finishes, the leases of all the target's waiters are granted
  in the same step (in-flight counted before anyone can start a drain), which is
  what stops ping-pong between two models ("settle").
- A group without a memory budget keeps one model awake (llmux 0.7); with
  `budget_gib`, models whose `gpu_memory_gib` fit stay awake together and the
  least recently used idle ones are evicted only when a wanted model does not fit.

This module is the state machine (queues, policy, workers, status); the switch
sequence is in llmuxd/switching/phases.py and the control API in
llmuxd/switching/control.py, both mixed into `Switcher`.

`clock` must tell the event loop's time (the default, time.monotonic, is what
asyncio uses); tests pass a virtual loop's `loop.time`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Optional

from llmuxd.errors import ModelPinned, QueueFull, SwitchTimeout, UnknownModel
from llmuxd.events import ModelStateChanged, SwitchEvent
from llmuxd.lifecycle import BackendDetail, Backends, BackendState
from llmuxd.policies import NOW, Decision, Policy, PolicyContext, SwitchCosts, make_policy
from llmuxd.priority import DEFAULT_PRIORITY, Priority
from llmuxd.switching import concurrency
from llmuxd.switching.control import Controls
from llmuxd.switching.demand import next_wanted, policy_context, reevaluation_order, tick_context
from llmuxd.switching.idle import IdleEvictions
from llmuxd.switching.preload import Preloader
from llmuxd.switching.errors import InvalidMode, ShuttingDown  # noqa: F401 - re-exported
from llmuxd.switching.phases import SwitchPhases
from llmuxd.switching.planning import plan_victims, wait_estimate
from llmuxd.switching.state import (
    GroupRuntime,
    GroupStatus,
    Lease,
    Listener,
    Mode,
    ModelRuntime,
    ModelState,
    ModelStatus,
    Op,
    SwitcherStatus,
    Waiter,
    process_state,
)

__all__ = [
    "Switcher", "Lease", "SwitcherStatus", "ModelStatus", "GroupStatus", "ModelState", "Mode",
    "InvalidMode", "ShuttingDown",
]

log = logging.getLogger(__name__)
#: module constants: the fast path compares by identity without an enum attribute lookup
_INTERACTIVE = Priority.INTERACTIVE
_BATCH = Priority.BATCH

class Switcher(Controls, SwitchPhases):
    """State machine over the models of one config; see the module docstring."""

    def __init__(
        self,
        config: Any,
        backends: Backends,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ):
        self._config = config
        self._backends = backends
        self._clock = clock
        self._sleep = sleep
        self._costs = SwitchCosts()
        self._policy: Policy = make_policy(config.policy, self._costs)
        self._mode = Mode.AUTO
        self._pinned: Optional[str] = None
        self._listeners: List[Listener] = []
        self._models: Dict[str, ModelRuntime] = {}
        self._groups: Dict[str, GroupRuntime] = {}
        self._started = False  # workers running
        self._adopted = False  # start() has looked at the backends
        self._closed = False
        self._apply_groups(config)
        for name, mc in config.models.items():
            self._models[name] = ModelRuntime(name, mc.gpu_group, mc.gpu_memory_gib,
                                              max_concurrency=concurrency.limit_of(mc))
        self._idle = IdleEvictions(self)
        self._preloader = Preloader(self)
        backends.on_unexpected_exit(self._on_unexpected_exit)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Adopt models the backends report awake, then start the group workers."""
        if self._adopted:
            return
        self._adopted = True
        now = self._clock()
        over_budget: List[ModelRuntime] = []
        for m in self._models.values():
            if m.awake or self._backends.state(m.name) is not BackendState.READY:
                continue
            g = self._groups[m.group]
            if self._plan_victims(g, m):
                over_budget.append(m)  # adopted awake beyond the budget: put it to sleep
            m.activated_at = now
            m.last_used = now
            g.awake.append(m)
            self._set_state(m, ModelState.ACTIVE)
        self._ensure_tasks()
        for m in over_budget:
            log.warning("model '%s' was awake beyond its group's budget at start; putting it to sleep", m.name)
            self._submit(m, "sleep")
        self._idle.configure()
        self._preloader.run()

    async def close(self) -> None:
        """Stop the workers; waiters and pending control calls get ShuttingDown."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._idle.stop(), self._preloader.stop()) if t is not None]
        for g in self._groups.values():
            for handle in g.deferrals.values():
                handle.cancel()
            g.deferrals.clear()
            for task in (g.worker, g.ticker):
                if task is not None:
                    task.cancel()
                    tasks.append(task)
            while g.ops:
                op = g.ops.popleft()
                if not op.future.done():
                    op.future.set_exception(ShuttingDown(op.model.name))
                    op.future.exception()  # retrieved: a caller may be gone
        for m in self._models.values():
            self._fail_all(m, lambda m=m: ShuttingDown(m.name))
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _ensure_tasks(self) -> None:
        self._started = True
        if self._closed:
            return
        for g in self._groups.values():
            if g.wakeup is None:
                g.wakeup = asyncio.Event()
                g.demand = asyncio.Event()
            if g.worker is None or g.worker.done():
                g.worker = asyncio.get_running_loop().create_task(self._worker(g), name=f"llmux-switch-{g.name}")
            if self._policy.tick_interval is not None and (g.ticker is None or g.ticker.done()):
                g.ticker = asyncio.get_running_loop().create_task(self._ticker(g), name=f"llmux-tick-{g.name}")

    # ------------------------------------------------------------------ requests

    async def acquire(
        self, model: str, timeout: Optional[float] = None, *, priority: Priority = DEFAULT_PRIORITY
    ) -> Lease:
        """A lease on `model` once it is awake and not draining.

        `priority` (from the request's API key; a plain "batch" is accepted)
        orders the waiters in every policy: interactive ones count before batch
        ones (llmuxd/policies/priority.py). Raises UnknownModel, ModelPinned
        (manual mode), QueueFull, SwitchTimeout (no lease within `timeout`,
        default policy.request_timeout), SwitchFailed (its wake failed) or
        ValueError (not a priority)."""
        m = self._models.get(model)
        if m is not None and m.state is ModelState.ACTIVE and (
            m.max_concurrency is None or concurrency.has_room_now(m)
        ):  # fast path: no await, no allocation but the lease
            if priority is not _INTERACTIVE:
                priority = Priority(priority)  # a plain "batch" from a caller; a bad value raises
                m.batch_in_flight += priority is _BATCH
            m.in_flight += 1
            m.last_used = self._clock()
            return Lease(self._release, m, self._backends.endpoint(model), priority)
        return await self._acquire_slow(model, m, timeout, priority)

    async def _acquire_slow(
        self, model: str, m: Optional[ModelRuntime], timeout: Optional[float], priority: Priority
    ) -> Lease:
        if m is None or m.removed:
            raise UnknownModel(model, self._known())
        if self._closed:
            raise ShuttingDown(model)
        if self._mode is Mode.MANUAL and model != self._pinned:
            raise ModelPinned(model, self._pinned)
        policy_cfg = self._config.policy
        if timeout is None:
            timeout = policy_cfg.request_timeout
        if not timeout > 0:  # zero, negative or NaN: the caller cannot wait at all
            raise SwitchTimeout(model, 0.0, retry_after=self._retry_after(m))
        if len(m.queue) >= policy_cfg.queue_limit:
            raise QueueFull(model, policy_cfg.queue_limit, retry_after=self._retry_after(m))
        if not self._started:
            self._ensure_tasks()
        loop = asyncio.get_running_loop()
        waiter = Waiter(m, self._clock(), loop.create_future(), priority=Priority(priority))
        m.enqueue(waiter)
        if math.isfinite(timeout):
            waiter.timer = loop.call_later(timeout, self._expire, waiter)
        self._on_demand(m)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise

    def _release(self, m: ModelRuntime, priority: Priority) -> None:
        m.in_flight -= 1
        if priority is _BATCH and m.batch_in_flight > 0:
            m.batch_in_flight -= 1
        m.last_used = self._clock()
        if m.in_flight <= 0:
            m.in_flight = 0
            m.batch_in_flight = 0
            fut = m.drain_future
            if fut is not None and not fut.done():
                fut.set_result(None)
            if self._policy.tick_interval is not None:
                self._on_idle(m)
        if m.max_concurrency is not None and m.queue and m.state is ModelState.ACTIVE:
            self._grant_all(m)  # a slot came back: the next queued request takes it

    def _expire(self, waiter: Waiter) -> None:
        """Deadline timer: the waiter leaves the queue now, so it is never served late."""
        fut = waiter.future
        if fut.done():
            return
        m = waiter.model
        m.dequeue(waiter)
        waited = self._clock() - waiter.enqueued_at
        fut.set_exception(SwitchTimeout(m.name, waited, retry_after=self._retry_after(m)))

    def _abandon(self, waiter: Waiter) -> None:
        """A cancelled waiter: out of the queue, and a lease granted meanwhile goes back."""
        waiter.model.dequeue(waiter)
        if waiter.timer is not None:
            waiter.timer.cancel()
        fut = waiter.future
        if fut.done() and not fut.cancelled():
            if fut.exception() is None:
                fut.result().release()

    def _grant_all(self, m: ModelRuntime) -> None:
        if not m.queue:
            return
        endpoint = self._backends.endpoint(m.name)
        now = self._clock()
        slots = concurrency.room(m, len(m.queue))
        for waiter in list(m.queue):
            if slots <= 0:
                break  # max_concurrency: the rest wait for a lease to come back
            m.dequeue(waiter)
            if waiter.timer is not None:
                waiter.timer.cancel()
            if waiter.future.done():
                continue
            m.in_flight += 1
            if waiter.priority is _BATCH:
                m.batch_in_flight += 1
            m.last_used = now
            slots -= 1
            waiter.future.set_result(Lease(self._release, m, endpoint, waiter.priority))

    def _fail_all(self, m: ModelRuntime, make_error: Callable[[], BaseException]) -> None:
        for waiter in list(m.queue):
            m.dequeue(waiter)
            if waiter.timer is not None:
                waiter.timer.cancel()
            if not waiter.future.done():
                waiter.future.set_exception(make_error())

    # ------------------------------------------------------------------ demand → policy

    def _on_demand(self, m: ModelRuntime, deferred: bool = False) -> None:
        """A model has waiters: ask the policy (or the mode) what to do about it."""
        if m.removed or not m.queue or self._closed:
            return
        g = self._groups[m.group]
        if m.state is ModelState.ACTIVE:
            self._grant_all(m)
            return
        if g.demand is not None:
            g.demand.set()
        if self._mode is Mode.MANUAL:
            if m.name == self._pinned:
                self._want(g, m)
            else:
                self._fail_all(m, lambda: ModelPinned(m.name, self._pinned))
            return
        if g.switching is not None or m.name in g.wanted:
            return  # re-evaluated when the running switch ends; or already due
        ctx = self._context(g, m, deferred)
        if ctx.active is None:
            decision: Decision = NOW
        else:
            try:
                decision = self._policy.decide(ctx)
            except Exception:  # noqa: BLE001 - a policy bug must not strand requests
                log.exception("policy %s failed to decide for '%s'; switching now", self._policy.name, m.name)
                decision = NOW
        if decision.kind == "now":
            self._want(g, m)
        elif decision.kind == "defer":
            self._defer(g, m, decision.delay)

    def _want(self, g: GroupRuntime, m: ModelRuntime) -> None:
        handle = g.deferrals.pop(m.name, None)
        if handle is not None:
            handle.cancel()
        g.wanted[m.name] = None
        if g.wakeup is not None:
            g.wakeup.set()

    def _defer(self, g: GroupRuntime, m: ModelRuntime, delay: float) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        handle = g.deferrals.get(m.name)
        if handle is not None:
            if handle.when() <= when:
                return
            handle.cancel()
        g.deferrals[m.name] = loop.call_at(when, self._deferral_ended, g, m)

    def _deferral_ended(self, g: GroupRuntime, m: ModelRuntime) -> None:
        """Ask again with fresh numbers (an empty queue switches nothing), about every
        model waiting in the group, oldest first: targets deferred to the same moment
        (the end of one serving window) must go in demand order, not in the order in
        which float noise fires their timers."""
        g.deferrals.pop(m.name, None)
        self._reevaluate(g)

    def _reevaluate(self, g: GroupRuntime) -> None:
        """After a switch or a change of mode: decide again for everyone waiting, stale
        first, then those with interactive waiters, then oldest first (demand_rank)."""
        waiting = [m for m in self._models.values() if m.group == g.name and m.queue]
        waiting = reevaluation_order(waiting, self._clock(), self._config.policy.max_wait)
        for m in waiting:
            self._on_demand(m)

    def _context(self, g: GroupRuntime, m: ModelRuntime, deferred: bool) -> PolicyContext:
        victims = self._plan_victims(g, m)
        cost = self._costs.estimate(victims[0].name if victims else None, m.name)
        return policy_context(self._clock(), m, victims, self._group_models(g), cost, deferred)

    # ------------------------------------------------------------------ budget

    def _plan_victims(self, g: GroupRuntime, target: ModelRuntime) -> List[ModelRuntime]:
        return plan_victims(g, target, self._pinned)

    # ------------------------------------------------------------------ workers

    async def _worker(self, g: GroupRuntime) -> None:
        assert g.wakeup is not None
        while True:
            job = self._next_job(g)
            if job is None:
                g.wakeup.clear()
                await g.wakeup.wait()
                continue
            try:
                await job
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the worker must outlive any bug in one switch
                log.exception("switch in group '%s' failed unexpectedly", g.name)
            self._reevaluate(g)

    def _next_job(self, g: GroupRuntime) -> Optional[Awaitable[None]]:
        if g.ops:
            return self._run_op(g, g.ops.popleft())
        while g.wanted:
            name = next_wanted(g.wanted, self._models, self._clock(), self._config.policy.max_wait)
            del g.wanted[name]
            m = self._models.get(name)
            if m is None or m.removed or m.group != g.name:
                continue
            if m.state is ModelState.ACTIVE:
                self._grant_all(m)
                continue
            if not m.queue:  # I7: everyone who wanted it was served or gave up
                g.skipped_switches += 1
                log.debug("skipping switch to '%s': no one is waiting any more", name)
                continue
            if self._mode is Mode.MANUAL and name != self._pinned:
                self._fail_all(m, lambda m=m: ModelPinned(m.name, self._pinned))
                continue
            return self._switch_job(g, m)
        return None

    async def _switch_job(self, g: GroupRuntime, m: ModelRuntime) -> None:
        await self._switch(g, m, reason=f"{self._policy.name}: {len(m.queue)} request(s) waiting")

    async def _run_op(self, g: GroupRuntime, op: Op) -> None:
        m = op.model
        try:
            if op.kind == "switch":
                if m.state is not ModelState.ACTIVE:
                    failure = await self._switch(g, m, forced=True, reason="manual switch")
                    if failure is not None:
                        raise failure
            elif op.kind == "sleep":
                if m.awake:
                    await self._switch(g, None, victims=[m], forced=True, eviction=op.eviction,
                                       reason="sleep requested")
            elif op.kind == "idle_sleep":  # llmuxd/switching/idle.py: only if still idle now
                if self._idle.still_due(m):
                    await self._switch(g, None, victims=[m], forced=True, reason="idle timeout")
            elif op.kind == "remove":
                if m.awake:
                    await self._switch(g, None, victims=[m], forced=True, stop=True,
                                       reason="reload: no longer configured")
                else:  # asleep models may still have a process (sleeping, frozen): stop it
                    await self._stop_quietly(m.name)
            if not op.future.done():
                op.future.set_result(None)
        except asyncio.CancelledError:
            if not op.future.done():
                op.future.set_exception(ShuttingDown(m.name))
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            if not op.future.done():
                op.future.set_exception(exc)

    async def _ticker(self, g: GroupRuntime) -> None:
        """The scheduler of tick-driven policies (time_slice): it sleeps while nobody waits."""
        assert g.demand is not None
        while True:
            interval = self._policy.tick_interval
            if interval is None:
                return
            if not any(m.queue and m.state is not ModelState.ACTIVE for m in self._group_models(g)):
                g.demand.clear()
                await g.demand.wait()
            await self._sleep(interval)
            self._tick(g)

    def _tick(self, g: GroupRuntime) -> None:
        """One scheduler tick: ask the policy which waiting model gets the group now."""
        if self._mode is Mode.MANUAL or g.switching is not None or g.ops or g.wanted:
            return
        ctx = tick_context(self._clock(), g, self._group_models(g))
        try:
            target = self._policy.tick(ctx)
        except Exception:  # noqa: BLE001
            log.exception("policy %s failed at a scheduler tick", self._policy.name)
            return
        m = self._models.get(target) if target else None
        if m is not None and m.queue and not m.awake and m.group == g.name:
            self._want(g, m)

    def _on_idle(self, m: ModelRuntime) -> None:
        """`m`'s last request finished: a tick-driven policy hands the GPU over at idle
        moments, so tick now rather than up to `tick_interval` later."""
        if self._policy.tick_interval is None or self._closed or m.removed or not m.awake:
            return
        g = self._groups[m.group]
        if g.demand is not None and g.demand.is_set():  # someone waits for a model that is not awake
            self._tick(g)

    def _group_models(self, g: GroupRuntime) -> Iterable[ModelRuntime]:
        return (m for m in self._models.values() if m.group == g.name and not m.removed)

    # ------------------------------------------------------------------ backend events

    def _on_unexpected_exit(self, model: str, reason: str) -> None:
        """A backend died on its own: the model is no longer awake; the next request restarts it."""
        m = self._models.get(model)
        if m is None or self._closed:
            return
        log.warning("backend of '%s' exited unexpectedly: %s", model, reason)
        m.last_error = f"backend exited unexpectedly: {reason}"
        if m.state in (ModelState.ACTIVE, ModelState.DRAINING):
            g = self._groups[m.group]
            if m in g.awake:
                g.awake.remove(m)
            m.activated_at = None
            self._set_state(m, ModelState.FAILED)
            if m.drain_future is not None and not m.drain_future.done():
                m.drain_future.set_result(None)
            if g.wakeup is not None:
                self._reevaluate(g)

    # ------------------------------------------------------------------ lookup

    def _known(self) -> List[str]:
        return sorted(n for n, m in self._models.items() if not m.removed)

    def _model(self, model: str) -> ModelRuntime:
        m = self._models.get(model)
        if m is None or m.removed:
            raise UnknownModel(model, self._known())
        return m

    # ------------------------------------------------------------------ status

    def _set_state(self, m: ModelRuntime, state: ModelState) -> None:
        if m.state is state:
            return
        m.state = state
        self._emit(ModelStateChanged(m.name, state.value))

    def _emit(self, event: SwitchEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - an observer must never break a switch
                log.exception("switcher event listener %r failed on %r", listener, event)

    def wait_estimate(self, model: str) -> float:
        """Seconds until `model` would serve a new request: 0 when awake, else the learned
        switch costs of the switches ahead of it plus any cooldown or backoff left."""
        return self._wait_estimate(self._model(model))

    def _wait_estimate(self, m: ModelRuntime) -> float:
        if m.state is ModelState.ACTIVE:
            return 0.0
        g = self._groups[m.group]
        return wait_estimate(g, m, self._plan_victims(g, m), self._costs, self._config.policy, self._clock())

    def _retry_after(self, m: ModelRuntime) -> float:
        return max(1.0, self._wait_estimate(m))

    def status(self) -> SwitcherStatus:
        models: Dict[str, ModelStatus] = {}
        for name, m in self._models.items():
            if m.removed:
                continue
            try:
                endpoint: Optional[str] = self._backends.endpoint(name)
            except Exception:  # noqa: BLE001
                endpoint = None
            backend = self._backend_detail(name)
            process = process_state(m.state, backend)
            last_error = m.last_error or (backend.reason if process == "failed" else None)
            models[name] = ModelStatus(
                name=name,
                state=m.state.value,
                eviction=str(self.eviction_for(name)),
                group=m.group,
                in_flight=m.in_flight,
                queue_depth=len(m.queue),
                wait_estimate=self._wait_estimate(m),
                last_error=last_error,
                last_switch_s=m.last_switch_s,
                last_switch=m.last_switch,
                endpoint=endpoint,
                process_state=process,
                idle_left_s=self._idle.left(m),
                sleep_check=backend.reason if process.startswith("sleeping") else None,
            )
        groups: Dict[str, GroupStatus] = {}
        state: Optional[str] = None
        active: List[str] = []
        for name in sorted(self._groups):
            g = self._groups[name]
            awake = tuple(a.name for a in g.awake)
            active.extend(a for a in awake if self._models[a].state is ModelState.ACTIVE)
            if g.switching is not None:
                g_state = f"switching:{','.join(g.switching[0])}->{g.switching[1] or ''}"
                state = state or g_state
            elif awake:
                g_state = "active:" + ",".join(awake)
            else:
                g_state = "idle"
            groups[name] = GroupStatus(name, g.budget_gib, g_state, awake)
        if state is None:
            state = "active:" + ",".join(active) if active else "idle"
        return SwitcherStatus(
            mode=self._mode.value,
            pinned=self._pinned,
            state=state,
            active_models=tuple(active),
            models=models,
            groups=groups,
            policy=self._policy.name,
            preload=self._preloader.progress(),
        )

    def _backend_detail(self, model: str) -> BackendDetail:
        """The backend's view of `model` (`Backends.detail` is optional)."""
        try:
            detail = getattr(self._backends, "detail", None)
            return detail(model) if detail is not None else BackendDetail(self._backends.state(model))
        except Exception:  # noqa: BLE001 - a status page must not fail on one model
            log.exception("reading the backend state of '%s' failed", model)
            return BackendDetail(BackendState.NOT_STARTED)

    @property
    def mode(self) -> str:
        return self._mode.value

    @property
    def pinned(self) -> Optional[str]:
        return self._pinned

