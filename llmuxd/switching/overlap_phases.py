"""The overlapped switch's phases (issue #26): a mixin of SwitchPhases.

    pause A, release A's KV cache -> { A's weights out || B's weights in }
    -> B's KV cache -> B's scheduling

`llmuxd/switching/overlap.py` decides whether a switch may take this way;
this module walks it, timing each phase (pause, kv_release, weights_out,
weights_in, kv_in, scheduling) into the switch's `phases`. B's weights start
only after A's KV cache is released, so the group holds at most what the plan
reserved. Failures keep the same rules as the sequential switch (DESIGN.md
I5): a failed sleep of A escalates to stop, a failed wake stops B and fails
its waiters; a refused partial step (vLLM on the CPU) is learned per model,
said once in the journal, and that model switches sequentially from then on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

from llmuxd.errors import LLMuxError
from llmuxd.eviction import Eviction
from llmuxd.lifecycle import Backends, BackendState
from llmuxd.switching.overlap import OverlapPlan, Side, plan_overlap
from llmuxd.switching.planning import memory_gib
from llmuxd.switching.state import GroupRuntime, ModelRuntime, ModelState

log = logging.getLogger("llmuxd.switcher")

#: the Backends methods an overlapped switch needs (the orchestrator has them)
PARTIAL_STEPS = ("pause_and_release", "wake_weights", "finish_wake", "wakes_in_parts")


class OverlapPhases:
    """Plans and runs overlapped switches for `Switcher`; never raises for a backend failure."""

    _config: Any
    _backends: Backends
    _clock: Callable[[], float]

    def _overlap_plan(
        self, g: GroupRuntime, victims: List[ModelRuntime], target: Optional[ModelRuntime],
        eviction: Optional[Eviction], stop: bool,
    ) -> Optional[OverlapPlan]:
        """The plan for this switch; None when there is nothing to overlap
        (no target, nothing to evict)."""
        if target is None or not victims:
            return None
        if stop:
            return OverlapPlan(False, "eviction: this switch stops the old model")
        backends = self._backends
        partial = all(hasattr(backends, step) for step in PARTIAL_STEPS)
        try:
            wakes_in_parts = bool(partial and backends.wakes_in_parts(target.name))  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - an unknown model: plainly not
            wakes_in_parts = False
        target_state = backends.state(target.name)
        target_eviction = self.eviction_for(target.name)  # type: ignore[attr-defined]
        if target_state is not BackendState.SLEEPING:
            wakes_in_parts = False
        sides = [
            Side(v.name, self._weights_gib(v.name), eviction or self.eviction_for(v.name),  # type: ignore[attr-defined]
                 v.overlap_refused)
            for v in victims
        ]
        others = sum(memory_gib(g, a) for a in g.awake if a not in victims and a is not target)
        mode = getattr(self._config.policy, "overlap", "auto")
        return plan_overlap(
            mode, g.budget_gib, others if g.budget_gib is not None else 0.0, sides,
            Side(target.name, self._weights_gib(target.name), target_eviction, target.overlap_refused,
                 wakes_in_parts),
            partial_steps=partial,
        )

    def _weights_gib(self, model: str) -> Optional[float]:
        """`weights_gib`, else what the backends measured at the model's first wake."""
        mc = self._config.models.get(model)
        configured = getattr(mc, "weights_gib", None) if mc is not None else None
        measured = getattr(self._backends, "weights_gib", None)
        if configured is not None or measured is None:
            return configured
        try:
            return measured(model)
        except Exception:  # noqa: BLE001 - an unknown model: unknown size
            return None

    async def _overlapped(
        self, g: GroupRuntime, victims: List[ModelRuntime], target: ModelRuntime,
        eviction: Optional[Eviction], phases: Dict[str, float],
    ) -> Tuple[Optional[LLMuxError], float, Optional[str]]:
        """Run the overlapped switch. Returns (the failure handed to the
        target's waiters or None, the seconds the switch took after the drain,
        and a reason when it fell back to the sequential way)."""
        pc = self._config.policy
        began = self._clock()
        fallback: Optional[str] = None
        victims = [v for v in victims if v.awake]  # one may have died during the drain
        if not victims:
            failure = await self._wake(g, target)  # type: ignore[attr-defined]
            phases["wake"] = self._clock() - began
            return failure, self._clock() - began, "eviction: nothing left to evict"
        # 1. pause each victim and release its KV cache; its weights stay for now
        for v in victims:
            self._set_state(v, ModelState.EVICTING)  # type: ignore[attr-defined]
        for v in victims:
            fallback = await self._pause_and_release(v, eviction or self.eviction_for(v.name), phases)  # type: ignore[attr-defined]
            if fallback is not None:
                break
        if fallback is not None:
            # sequential from here: A's sleep (escalating to stop), then B's whole wake
            t = self._clock()
            await self._evict_all(g, victims, eviction)
            phases["sleep"] = self._clock() - t
            t = self._clock()
            failure = await self._wake(g, target)  # type: ignore[attr-defined]
            phases["wake"] = self._clock() - t
            return failure, self._clock() - began, fallback
        # 2. both weight transfers at once
        self._set_state(target, ModelState.WAKING)  # type: ignore[attr-defined]
        out_task = asyncio.ensure_future(self._timed(phases, "weights_out", self._evict_all(g, victims, eviction)))
        in_task = asyncio.ensure_future(self._timed(phases, "weights_in", self._weights_in(target)))
        try:
            await asyncio.gather(out_task, in_task)
        except asyncio.CancelledError:
            for task in (out_task, in_task):
                task.cancel()
            raise
        wake_error = in_task.result()
        if wake_error is not None:
            return await self._wake_failed(g, target, *wake_error), self._clock() - began, None  # type: ignore[attr-defined]
        # 3. B's KV cache, then its scheduler
        failure = await self._finish(g, target, phases, pc.wake_timeout)
        return failure, self._clock() - began, None

    async def _pause_and_release(self, v: ModelRuntime, eviction: Eviction, phases: Dict[str, float]) -> Optional[str]:
        """Pause `v` and release its KV cache; the fallback reason when that failed."""
        t = self._clock()
        marks: Dict[str, float] = {}

        def step(name: str) -> None:
            marks[name] = self._clock()

        try:
            await asyncio.wait_for(
                self._backends.pause_and_release(v.name, eviction, step),  # type: ignore[attr-defined]
                self._config.policy.sleep_timeout,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            refused = getattr(exc, "refused", None)
            reason = getattr(exc, "reason", None) or str(exc) or f"no answer within {self._config.policy.sleep_timeout:.0f}s"
            if refused:
                v.overlap_refused = refused
                log.warning("model '%s' refused a partial sleep step (%s); it switches sequentially from now on",
                            v.name, refused)
                return f"engine: {v.name} refused it ({refused})"
            log.warning("pausing '%s' for an overlapped switch failed: %s; switching sequentially", v.name, reason)
            return f"engine: pausing {v.name} failed ({reason})"
        finally:
            now = self._clock()
            split = marks.get("kv_release", now)
            phases["pause"] = phases.get("pause", 0.0) + split - t
            phases["kv_release"] = phases.get("kv_release", 0.0) + now - split
        return None

    async def _evict_all(self, g: GroupRuntime, victims: List[ModelRuntime], eviction: Optional[Eviction]) -> None:
        """Each victim's weights out with its eviction (escalating to stop), then off the GPU's books."""
        for v in victims:
            if v.state is ModelState.EVICTING:
                await self._evict(v, eviction or self.eviction_for(v.name))  # type: ignore[attr-defined]
            if v in g.awake:
                g.awake.remove(v)
            v.activated_at = None
            self._set_state(v, ModelState.ASLEEP)  # type: ignore[attr-defined]

    async def _weights_in(self, target: ModelRuntime) -> Optional[Tuple[str, str]]:
        """B's weights back; (phase, reason) when that failed (the orchestrator stopped B)."""
        timeout = self._config.policy.wake_timeout
        try:
            await asyncio.wait_for(self._backends.wake_weights(target.name), timeout)  # type: ignore[attr-defined]
            return None
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            await self._stop_quietly(target.name)  # type: ignore[attr-defined]
            return "wake weights", f"not done within {timeout:.0f}s"
        except Exception as exc:  # noqa: BLE001
            return getattr(exc, "phase", "wake weights"), getattr(exc, "reason", None) or str(exc) or type(exc).__name__

    async def _finish(self, g: GroupRuntime, target: ModelRuntime, phases: Dict[str, float],
                      timeout: float) -> Optional[LLMuxError]:
        t = self._clock()
        marks: Dict[str, float] = {}

        def step(name: str) -> None:
            marks[name] = self._clock()

        failure: Optional[Tuple[str, str]] = None
        try:
            await asyncio.wait_for(self._backends.finish_wake(target.name, step), timeout)  # type: ignore[attr-defined]
            state = self._backends.state(target.name)
            if state is not BackendState.READY:
                failure = ("become ready", f"the backend is {state.value} after waking")
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            failure = ("wake", f"not ready within {timeout:.0f}s")
        except Exception as exc:  # noqa: BLE001
            failure = (getattr(exc, "phase", "wake"), getattr(exc, "reason", None) or str(exc) or type(exc).__name__)
        finally:
            now = self._clock()
            split = marks.get("scheduling", now)
            phases["kv_in"] = split - t
            phases["scheduling"] = now - split
        if failure is not None:
            return await self._wake_failed(g, target, *failure)  # type: ignore[attr-defined]
        return None

    async def _timed(self, phases: Dict[str, float], name: str, coro: Any) -> Any:
        t = self._clock()
        try:
            return await coro
        finally:
            phases[name] = self._clock() - t
