"""The phases of one switch: backoff, cooldown, drain, sleep, wake (DESIGN.md §4).

A mixin of `llmuxd.switcher.Switcher`, kept apart so that the state machine
(queues, policy, workers) and the switch sequence can each be read in one
sitting. It uses the switcher's state; it owns none.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Awaitable, Callable, Dict, List, Optional

from llmuxd.errors import BackendError, LLMuxError, SwitchFailed
from llmuxd.events import SwitchFinished, SwitchStarted
from llmuxd.eviction import Eviction
from llmuxd.lifecycle import Backends, BackendState
from llmuxd.policies import Policy, SwitchCosts
from llmuxd.switching.overlap import switch_summary
from llmuxd.switching.overlap_phases import OverlapPhases
from llmuxd.switching.state import GroupRuntime, ModelRuntime, ModelState

log = logging.getLogger("llmuxd.switcher")

#: backend states from which a wake is a quick vLLM wake_up, not a (re)start
WARM_STATES = (BackendState.SLEEPING, BackendState.READY)


class SwitchPhases(OverlapPhases):
    """Runs switches for `Switcher`; every backend failure is handled here, never raised."""

    _config: Any
    _backends: Backends
    _clock: Callable[[], float]
    _sleep: Callable[[float], Awaitable[Any]]
    _costs: SwitchCosts
    _policy: Policy

    async def _switch(
        self,
        g: GroupRuntime,
        target: Optional[ModelRuntime],
        *,
        victims: Optional[List[ModelRuntime]] = None,
        forced: bool = False,
        eviction: Optional[Eviction] = None,
        stop: bool = False,
        reason: str = "",
    ) -> Optional[LLMuxError]:
        """Evict `victims` (default: what the budget needs) and wake `target` (None: evict only).

        Returns the failure handed to the target's waiters, if any; never raises
        for a backend failure."""
        pc = self._config.policy
        start = self._clock()
        if victims is None:
            victims = self._plan_victims(g, target) if target is not None else []
        from_name = ",".join(v.name for v in victims) or None
        to_name = target.name if target is not None else None
        g.switching = (tuple(v.name for v in victims), to_name)
        g.switch_started_at = start
        self._emit(SwitchStarted(g.name, from_name, to_name, reason))
        phases: Dict[str, float] = {}
        failure: Optional[LLMuxError] = None
        overlap: Optional[str] = None  # "overlapped" or why not (issue #26)
        ok = False
        skipped = False
        drain_timed_out = False
        try:
            if target is not None and g.last_failure is not None:
                t = self._clock()
                remain = g.last_failure + pc.failure_backoff - t
                if remain > 0:
                    await self._sleep(remain)
                phases["backoff"] = self._clock() - t
            if target is not None and victims:
                t = self._clock()
                remain = max((v.activated_at if v.activated_at is not None else -math.inf) for v in victims)
                remain = remain + pc.min_active - t
                if remain > 0:  # the old model keeps serving meanwhile
                    await self._sleep(remain)
                phases["cooldown"] = self._clock() - t
            if target is not None and not forced and not target.queue:
                skipped = True
                return None
            victims = [v for v in victims if v.awake]  # one may have died meanwhile
            t = self._clock()
            for v in victims:
                self._set_state(v, ModelState.DRAINING)
            if victims and (self._policy.drain_before_switch or target is None):
                drain_timed_out = not await self._drain(victims, pc.drain_timeout)
                if drain_timed_out:
                    log.warning(
                        "drain of %s timed out after %.1fs; sleeping with %d request(s) in flight",
                        from_name, pc.drain_timeout, sum(v.in_flight for v in victims),
                    )
            if victims:
                phases["drain"] = self._clock() - t
            if target is not None and not forced and not target.queue:
                for v in victims:  # nothing evicted yet: they simply serve on
                    if v.state is ModelState.DRAINING:
                        self._set_state(v, ModelState.ACTIVE)
                        self._grant_all(v)
                skipped = True
                return None
            plan = self._overlap_plan(g, victims, target, eviction, stop)
            overlapped = plan is not None and plan.overlap
            overlap = plan.reason if plan is not None else None
            t = self._clock()
            for v in victims if not overlapped else ():
                if not v.awake:
                    continue
                self._set_state(v, ModelState.EVICTING)
                if stop:
                    await self._stop_quietly(v.name)
                else:
                    await self._evict(v, eviction or self.eviction_for(v.name))
                if v in g.awake:
                    g.awake.remove(v)
                v.activated_at = None
                self._set_state(v, ModelState.ASLEEP)
            if victims and not overlapped:
                phases["sleep"] = self._clock() - t
            if target is None:
                ok = True
                return None
            t = self._clock()
            if overlapped:
                failure, cost, fell_back = await self._overlapped(g, victims, target, eviction, phases)
                overlap = fell_back or overlap
            else:
                failure = await self._wake(g, target)
                phases["wake"] = self._clock() - t
                cost = phases.get("sleep", 0.0) + phases["wake"]
            if failure is not None:
                return failure
            now = self._clock()
            target.activated_at = now
            target.last_used = now
            target.last_error = None
            target.last_switch_s = now - start
            g.awake.append(target)
            g.last_failure = None
            primary = victims[0].name if victims else None
            self._costs.record(primary, target.name, cost)
            try:
                self._policy.on_switch_complete(primary, target.name, now - start)
            except Exception:  # noqa: BLE001
                log.exception("policy %s failed in on_switch_complete", self._policy.name)
            self._set_state(target, ModelState.ACTIVE)
            self._grant_all(target)  # settle: leases taken before any other switch can drain it
            ok = True
            return None
        finally:
            g.switching = None
            g.switch_started_at = None
            if target is not None and not skipped:
                target.last_switch = switch_summary(self._clock() - start, phases, overlap, ok)
            self._emit(
                SwitchFinished(
                    g.name, from_name, to_name, ok=ok, duration=self._clock() - start, phases=phases,
                    error=(str(failure) if failure else ("skipped: no request waits for it any more" if skipped else None)),
                    drain_timed_out=drain_timed_out, skipped=skipped, overlap=overlap, reason=reason,
                )
            )

    async def _drain(self, victims: List[ModelRuntime], timeout: float) -> bool:
        """Wait until the victims have nothing in flight; False when `timeout` passed first."""
        deadline = self._clock() + max(0.0, timeout)
        loop = asyncio.get_running_loop()
        for v in victims:
            while v.in_flight > 0 and v.awake:
                remain = deadline - self._clock()
                if remain <= 0:
                    return False
                fut: asyncio.Future[None] = loop.create_future()
                v.drain_future = fut
                try:
                    await asyncio.wait({fut}, timeout=remain)
                finally:
                    v.drain_future = None
        return True

    async def _evict(self, v: ModelRuntime, eviction: Eviction) -> None:
        """Sleep with `eviction`; any failure escalates to stop (I5). Never raises."""
        try:
            await asyncio.wait_for(self._backends.sleep(v.name, eviction), self._config.policy.sleep_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            reason = _reason(exc, f"no answer within {self._config.policy.sleep_timeout:.0f}s")
            log.warning("sleeping '%s' (%s) failed: %s; stopping it instead", v.name, eviction, reason)
            v.last_error = f"sleep ({eviction}) failed: {reason}; stopped instead"
            await self._stop_quietly(v.name)

    async def _wake(self, g: GroupRuntime, target: ModelRuntime) -> Optional[LLMuxError]:
        """Wake and check readiness; on failure stop the target, back off, fail its waiters."""
        pc = self._config.policy
        self._set_state(target, ModelState.WAKING)
        mc = self._config.models.get(target.name)
        cold = self._backends.state(target.name) not in WARM_STATES
        timeout = max(pc.wake_timeout, mc.startup_timeout) if cold and mc is not None else pc.wake_timeout
        phase = "wake"
        try:
            await asyncio.wait_for(self._backends.ensure_awake(target.name), timeout)
            state = self._backends.state(target.name)
            if state is not BackendState.READY:
                phase = "become ready"
                raise BackendError(target.name, phase, f"the backend is {state.value} after waking")
            return None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            phase = getattr(exc, "phase", phase)
            reason = _reason(exc, f"not ready within {timeout:.0f}s")
        return await self._wake_failed(g, target, phase, reason)

    async def _wake_failed(self, g: GroupRuntime, target: ModelRuntime, phase: str, reason: str) -> SwitchFailed:
        """A wake (or part of one) failed: stop the target, back off, fail its waiters (I5)."""
        pc = self._config.policy
        log.error("switch to '%s' failed to %s: %s; stopping it", target.name, phase, reason)
        await self._stop_quietly(target.name)
        g.last_failure = self._clock()
        target.last_error = f"{phase}: {reason}"
        self._set_state(target, ModelState.FAILED)
        retry = max(1.0, pc.failure_backoff)
        self._fail_all(target, lambda: SwitchFailed(target.name, phase, reason, retry_after=retry))
        return SwitchFailed(target.name, phase, reason, retry_after=retry)

    async def _stop_quietly(self, model: str) -> None:
        try:
            await asyncio.wait_for(self._backends.stop(model), self._config.policy.sleep_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - logged: nothing more can be done here
            log.error("stopping '%s' failed: %s", model, _reason(exc, "timed out"))


def _reason(exc: BaseException, timeout_text: str) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return timeout_text
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return reason
    return str(exc) or type(exc).__name__
