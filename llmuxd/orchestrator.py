"""Per-model lifecycle: start, sleep(eviction), wake, stop, adopt.

The orchestrator implements `llmuxd.lifecycle.Backends` for the switcher by
composing a runtime (where the process lives) and an engine client (how the
vLLM server is spoken to). It owns the truth about each model's state.

Sleep applies the weight step (vLLM /sleep level 1 or 2), then the process
step (keep running, freeze, stop, ...). Wake reverses it: process step back
(thaw), then /wake_up, reload_weights after discard, reset_prefix_cache.
A failed sleep escalates to stop (the GPU must be freed either way); a failed
wake stops the backend and raises BackendError(model, "wake", reason).

Process steps are looked up in a table (`ProcessStep` per ProcessStrategy), so
cuda_suspend and checkpoint plug in later without touching the sequences.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from llmuxd.config.placeholders import fill
from llmuxd.engine.errors import BackendExited, refusal
from llmuxd.errors import BackendError, LLMuxError, NotSupported, UnknownModel
from llmuxd.eviction import DEFAULT_ENGINE, Eviction, ProcessStrategy, WeightStrategy, overlap_problem
from llmuxd.lifecycle import BackendDetail, BackendState, ModelPhase  # ModelPhase re-exported: callers import it from here
from llmuxd.runtime.base import ExitStatus, Handle, LaunchSpec, Runtime, RunState, check_port_free

log = logging.getLogger("llmuxd.orchestrator")

#: environment every backend gets (before the model's own env, which wins)
BASE_BACKEND_ENV = {"VLLM_SERVER_DEV_MODE": "1", "NO_COLOR": "1"}
#: seconds a backend gets between SIGTERM and SIGKILL
STOP_TIMEOUT = 30.0
#: seconds after a wake/thaw for the server to answer /health again
READY_TIMEOUT = 30.0
#: seconds between /health probes while waiting for a backend
HEALTH_POLL = 0.1


class Engine(Protocol):
    """What the orchestrator needs from a backend's HTTP API (llmuxd.engine.vllm.VllmClient,
    llmuxd.engine.openai.OpenAIClient); `weight_strategies` says which weight steps it can do."""

    weight_strategies: frozenset[WeightStrategy]

    async def wait_healthy(self, deadline: float, *, process_alive: Callable[[], bool] | None = None) -> None: ...
    async def sleep(self, level: int = 1, mode: str = "abort") -> Any: ...
    async def wake_up(self, tags: Any = None) -> Any: ...
    async def release_kv_cache_memory(self) -> None: ...
    async def is_sleeping(self) -> bool: ...
    async def collective_rpc(self, method: str) -> Any: ...
    async def reset_prefix_cache(self) -> Any: ...
    async def warmup(self, model_name: str, prompt: str = "Hello") -> None: ...
    async def close(self) -> None: ...


EngineFactory = Callable[[Any], Engine]


def default_engine_factory(model_config: Any) -> Engine:
    """The client of the model's engine (vLLM unless it names another) for its endpoint."""
    from llmuxd.engine import ENGINES, EngineTimeouts

    # poll /health every 100 ms: on loopback a probe costs little, and every
    # poll interval is added to a cold start or a wake that waits for it
    timeouts = EngineTimeouts(health_poll=HEALTH_POLL)
    client = ENGINES[getattr(model_config, "engine", DEFAULT_ENGINE)]
    return client(f"http://{_url_host(model_config.host)}:{model_config.port}", timeouts=timeouts)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def backend_argv(model_config: Any) -> list[str]:
    """`<command> [<path> | --model <path>] --port P --served-model-name N ...`.

    The model path is positional when the command ends with "serve" (vllm serve,
    llmux-vllm-sim serve), else it is passed as --model (api_server style).
    Any other engine's command runs as written, its ${PORT}-style placeholders filled in.
    """
    if getattr(model_config, "engine", DEFAULT_ENGINE) != DEFAULT_ENGINE:
        return fill(list(model_config.command) + list(model_config.extra_args), model_config)
    command = list(model_config.command)
    path_args = [model_config.model_path] if command[-1] == "serve" else ["--model", model_config.model_path]
    argv = command + path_args
    argv += ["--host", model_config.host, "--port", str(model_config.port)]
    argv += ["--served-model-name", model_config.name]
    if model_config.sleep_mode:
        argv.append("--enable-sleep-mode")
    return argv + list(model_config.extra_args)


def backend_env(model_config: Any) -> dict[str, str]:
    env = dict(BASE_BACKEND_ENV)
    if model_config.gpus:
        # indices in PCI bus order, as nvidia-smi and NVML number GPUs and as the unit's
        # DeviceAllow= maps them to /dev/nvidiaN (CUDA's default order is "fastest first")
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in model_config.gpus)
    env.update(model_config.env)
    return env


_BACKEND_STATE = {
    ModelPhase.NOT_STARTED: BackendState.NOT_STARTED,
    ModelPhase.STARTING: BackendState.STARTING,
    ModelPhase.READY: BackendState.READY,
    ModelPhase.SLEEPING: BackendState.SLEEPING,
    ModelPhase.FROZEN: BackendState.SLEEPING,
    ModelPhase.CHECKPOINTED: BackendState.CHECKPOINTED,
    ModelPhase.STOPPED: BackendState.STOPPED,
    ModelPhase.FAILED: BackendState.FAILED,
}


@dataclass
class ModelStatus:
    """One model as the orchestrator tracks it (read-only view for status pages)."""

    name: str
    phase: ModelPhase = ModelPhase.NOT_STARTED
    #: the eviction the model sleeps with (None while awake or never started)
    eviction: Eviction | None = None
    reason: str | None = None
    main_pid: int | None = None
    unit: str | None = None
    adopted: bool = False


@dataclass
class _Model:
    config: Any
    status: ModelStatus
    engine: Engine
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    handle: Handle | None = None
    #: the eviction a sleep in progress applies (read by process steps, e.g. checkpoint's manifest)
    evicting: Eviction | None = None
    #: the eviction the hooks settled on before an overlapped switch paused the model
    #: (their before_sleep needs it serving: a canary probe); the sleep after takes it
    prepared: Eviction | None = None


class ProcessStep(Protocol):
    """The process half of an eviction: applied after the weight step on sleep,
    reverted before the weights come back on wake."""

    phase: ModelPhase

    async def apply(self, orchestrator: "Orchestrator", model: _Model) -> None: ...
    async def revert(self, orchestrator: "Orchestrator", model: _Model) -> None: ...


class _KeepRunning:
    phase = ModelPhase.SLEEPING

    async def apply(self, orchestrator: "Orchestrator", model: _Model) -> None:
        return None

    async def revert(self, orchestrator: "Orchestrator", model: _Model) -> None:
        return None


class _Freeze:
    phase = ModelPhase.FROZEN

    async def apply(self, orchestrator: "Orchestrator", model: _Model) -> None:
        assert model.handle is not None
        await orchestrator.runtime.freeze(model.handle)

    async def revert(self, orchestrator: "Orchestrator", model: _Model) -> None:
        assert model.handle is not None
        if model.handle.state is RunState.FROZEN:
            await orchestrator.runtime.thaw(model.handle)


class _NotYet:
    """cuda_suspend and checkpoint: a later issue implements them."""

    phase = ModelPhase.SLEEPING

    def __init__(self, strategy: ProcessStrategy):
        self.strategy = strategy

    def _error(self, model: _Model) -> NotSupported:
        return NotSupported(
            f"model '{model.status.name}': eviction process '{self.strategy}' is not supported yet; "
            "use keep_running, freeze or stop"
        )

    async def apply(self, orchestrator: "Orchestrator", model: _Model) -> None:
        raise self._error(model)

    async def revert(self, orchestrator: "Orchestrator", model: _Model) -> None:
        raise self._error(model)


def default_process_steps() -> dict[ProcessStrategy, ProcessStep]:
    return {
        ProcessStrategy.KEEP_RUNNING: _KeepRunning(),
        ProcessStrategy.FREEZE: _Freeze(),
        ProcessStrategy.CUDA_SUSPEND: _NotYet(ProcessStrategy.CUDA_SUSPEND),
        ProcessStrategy.CHECKPOINT: _NotYet(ProcessStrategy.CHECKPOINT),
        # STOP is not a step: the process is gone, wake is a cold start
    }


class Orchestrator:
    """`Backends` on a runtime: one lock per model, truthful states."""

    def __init__(
        self,
        config: Any,
        runtime: Runtime,
        *,
        engine_factory: EngineFactory = default_engine_factory,
        process_steps: dict[ProcessStrategy, ProcessStep] | None = None,
        warmup: bool | None = None,
        stop_timeout: float = STOP_TIMEOUT,
        ready_timeout: float = READY_TIMEOUT,
    ):
        self.config = config
        self.runtime = runtime
        self.process_steps = process_steps or default_process_steps()
        #: lifecycle hooks (llmuxd.checkpoint.manager.CheckpointManager): backend_env,
        #: before_sleep (may return a safer eviction), after_sleep, after_wake
        self.hooks: list[Any] = []
        # A 1-token warm-up after each cold start, only when a caller asks for it.
        # `config.warmup` is not read here: it means llmux 0.7's one startup
        # warm-up of every model, which DaemonCore.warmup does.
        self._warmup = bool(warmup)
        self._stop_timeout = stop_timeout
        self._ready_timeout = ready_timeout
        policy = getattr(config, "policy", None)
        self._sleep_timeout = getattr(policy, "sleep_timeout", 120.0)
        self._wake_timeout = getattr(policy, "wake_timeout", 120.0)
        self._exit_callbacks: list[Callable[[str, str], None]] = []
        self._engine_factory = engine_factory
        #: model -> GiB of weights its first wake from sleep measured (weights_gib()); tried once each
        self._weights_measured: dict[str, float] = {}
        self._weights_tried: set[str] = set()
        self._models: dict[str, _Model] = {
            name: _Model(mc, ModelStatus(name), engine_factory(mc)) for name, mc in config.models.items()
        }
        runtime.on_exit(self._on_runtime_exit)

    # -- Backends protocol --------------------------------------------------

    def state(self, model: str) -> BackendState:
        return _BACKEND_STATE[self._get(model).status.phase]

    def status(self, model: str) -> ModelStatus:
        return self._get(model).status

    def detail(self, model: str) -> BackendDetail:
        """State, sleeping eviction and failure reason, for the switcher's status."""
        st = self._get(model).status
        return BackendDetail(_BACKEND_STATE[st.phase], st.eviction, st.reason)

    def endpoint(self, model: str) -> str:
        mc = self._get(model).config
        return f"http://{_url_host(mc.host)}:{mc.port}"

    def on_unexpected_exit(self, callback: Callable[[str, str], None]) -> None:
        self._exit_callbacks.append(callback)

    async def ensure_awake(self, model: str) -> None:
        m = self._get(model)
        async with m.lock:
            phase = m.status.phase
            if phase is ModelPhase.READY:
                return
            if phase in (ModelPhase.SLEEPING, ModelPhase.FROZEN):
                await self._wake(m)
            elif phase is ModelPhase.CHECKPOINTED:
                await self._wake(m)  # the checkpoint step's revert restores (or cold-starts)
            elif phase is ModelPhase.STARTING and m.handle is not None:
                await self._wait_ready(m, m.config.startup_timeout, "start")
            else:
                await self._start(m)

    async def sleep(self, model: str, eviction: Eviction) -> None:
        m = self._get(model)
        async with m.lock:
            await self._sleep(m, eviction)

    async def stop(self, model: str) -> None:
        m = self._get(model)
        async with m.lock:
            await self._stop(m)

    # -- the partial steps of an overlapped switch (llmuxd/switching/overlap.py)

    def wakes_in_parts(self, model: str) -> bool:
        """Whether `model` sleeps so that its weights can come back alone
        (`/wake_up?tags=weights`): vLLM sleep with its process running."""
        m = self._get(model)
        ev = m.status.eviction
        return (m.status.phase is ModelPhase.SLEEPING and ev is not None and ev.sleep_level is not None
                and ev.process is ProcessStrategy.KEEP_RUNNING and m.handle is not None
                and not m.handle.exited.is_set())

    async def pause_and_release(self, model: str, eviction: Eviction,
                                on_step: Callable[[str], None] | None = None) -> None:
        """`/sleep?level=0` then `/release_kv_cache_memory` on an awake model:
        its scheduler stops and its KV cache leaves the GPU; its weights stay,
        and a plain `sleep()` takes them after (vLLM accepts level 1 or 2 on a
        paused engine). `on_step("kv_release")` marks the end of the pause.

        Raises BackendError(model, "pause" | "kv release", reason) with
        `.refused` set when the server refused the step for good (vLLM on the
        CPU: "Selective discard is not supported"); the model is then left
        paused with its memory in place, for the caller's sequential sleep.
        The hooks' before_sleep runs first, while the model still answers; the
        eviction it settles on is the one the following `sleep()` applies."""
        m = self._get(model)
        async with m.lock:
            if m.status.phase is not ModelPhase.READY:
                raise BackendError(model, "pause", f"the backend is {m.status.phase}, not ready")
            for hook in self.hooks:
                eviction = await hook.before_sleep(self, m, eviction)
            m.prepared = eviction
            problem = overlap_problem(eviction)
            if problem is not None:
                raise BackendError(model, "pause", f"its eviction is now {eviction}: {problem}")
            phase = "pause"
            try:
                await asyncio.wait_for(m.engine.sleep(0), self._sleep_timeout)
                if on_step is not None:
                    on_step("kv_release")
                phase = "kv release"
                await asyncio.wait_for(m.engine.release_kv_cache_memory(), self._sleep_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - typed for the switcher below
                reason = f"no answer within {self._sleep_timeout:.0f}s" if isinstance(exc, asyncio.TimeoutError) else (str(exc) or type(exc).__name__)
                err = BackendError(model, phase, reason)
                err.refused = refusal(exc)  # type: ignore[attr-defined]
                raise err from None

    async def wake_weights(self, model: str) -> None:
        """Bring only the weights of a sleeping model back (`/wake_up?tags=weights`,
        then `reload_weights` after discard); the KV cache and the scheduler stay
        asleep until `finish_wake`. A failure stops the model (its half-mapped
        memory cannot be trusted, vLLM PR #34600) and raises BackendError."""
        m = self._get(model)
        async with m.lock:
            eviction = m.status.eviction
            if not self.wakes_in_parts(model) or eviction is None:
                raise BackendError(model, "wake weights", f"the backend is {m.status.phase} and cannot wake in parts")
            try:
                await asyncio.wait_for(self._weights_in(m, eviction), self._wake_timeout)
            except asyncio.TimeoutError:
                await self._fail_and_stop(m, "wake weights", f"not done within {self._wake_timeout:.0f}s (policy.wake_timeout)")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                await self._fail_and_stop(m, "wake weights", getattr(exc, "reason", None) or str(exc) or type(exc).__name__)

    async def _weights_in(self, m: _Model, eviction: Eviction) -> None:
        await m.engine.wake_up(["weights"])
        if eviction.weights is WeightStrategy.DISCARD:
            await m.engine.collective_rpc("reload_weights")

    async def finish_wake(self, model: str, on_step: Callable[[str], None] | None = None) -> None:
        """After `wake_weights`: the KV cache (`tags=kv_cache`), then the
        scheduler (`tags=scheduling`), the prefix cache reset after discard,
        readiness and the post-wake hooks. `on_step("scheduling")` marks the
        end of the KV cache step. A failure stops the model and raises BackendError."""
        m = self._get(model)
        async with m.lock:
            eviction = m.status.eviction
            if m.status.phase is ModelPhase.READY:
                return
            if eviction is None or m.status.phase is not ModelPhase.SLEEPING:
                raise BackendError(model, "wake", f"the backend is {m.status.phase}, not asleep")
            phase = "wake kv cache"
            try:
                await asyncio.wait_for(m.engine.wake_up(["kv_cache"]), self._wake_timeout)
                if on_step is not None:
                    on_step("scheduling")
                phase = "wake scheduling"
                await asyncio.wait_for(m.engine.wake_up(["scheduling"]), self._wake_timeout)
            except asyncio.TimeoutError:
                await self._fail_and_stop(m, phase, f"not done within {self._wake_timeout:.0f}s (policy.wake_timeout)")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                await self._fail_and_stop(m, phase, getattr(exc, "reason", None) or str(exc) or type(exc).__name__)
            if eviction.weights is WeightStrategy.DISCARD:
                try:
                    await m.engine.reset_prefix_cache()
                except Exception as exc:  # noqa: BLE001 - a stale cache only costs speed
                    log.warning("model %s: reset_prefix_cache failed (ignored): %s", model, exc)
            await self._wait_ready(m, self._ready_timeout, "wake")
            for hook in self.hooks:
                await hook.after_wake(self, m, eviction, False)  # post-wake canary

    # -- daemon lifecycle ---------------------------------------------------

    async def adopt(self) -> dict[str, BackendState]:
        """Find backends that outlived a previous daemon and reconcile their states.

        Nothing is restarted: a running unit is asked /is_sleeping, a frozen one
        is taken as asleep with its configured eviction (it cannot answer).
        """
        found: dict[str, BackendState] = {}
        for handle in await self.runtime.adopt():
            m = self._models.get(handle.model)
            if m is None:
                log.warning("unit %s runs model '%s', which is not configured; left running", handle.name, handle.model)
                continue
            async with m.lock:
                m.handle = handle
                m.status.adopted = True
                m.status.unit = handle.name
                m.status.main_pid = handle.main_pid
                await self._reconcile(m)
            found[handle.model] = self.state(handle.model)
        return found

    async def _reconcile(self, m: _Model) -> None:
        configured = m.config.eviction
        assert m.handle is not None
        if m.handle.state is RunState.FROZEN:
            weights = configured.weights if configured.process is ProcessStrategy.FREEZE else WeightStrategy.RETAIN
            self._set(m, ModelPhase.FROZEN, eviction=Eviction(weights, ProcessStrategy.FREEZE))
            return
        try:
            sleeping = await asyncio.wait_for(m.engine.is_sleeping(), self._ready_timeout)
        except Exception as exc:  # noqa: BLE001 - still loading after the restart, or wedged
            log.info("model %s: adopted backend does not answer yet (%s); waiting for it on demand", m.status.name, exc)
            self._set(m, ModelPhase.STARTING)
            return
        if sleeping:
            weights = configured.weights if configured.weights is not WeightStrategy.RETAIN else WeightStrategy.OFFLOAD
            self._set(m, ModelPhase.SLEEPING, eviction=Eviction(weights, ProcessStrategy.KEEP_RUNNING))
        else:
            self._set(m, ModelPhase.READY)

    async def close(self, *, stop_backends: bool = True) -> None:
        """Stop every backend (embedded mode always; system mode when configured)."""
        if stop_backends:
            await asyncio.gather(*(self.stop(name) for name in self._models), return_exceptions=True)
        for m in self._models.values():
            try:
                await m.engine.close()
            except Exception:  # noqa: BLE001
                pass

    # -- sequences ----------------------------------------------------------

    async def _start(self, m: _Model) -> None:
        mc = m.config
        name = m.status.name
        if m.handle is not None and not m.handle.exited.is_set():
            # a stop cut short earlier (or one that failed): finish it first, so the
            # old process frees the port and its GPU memory before a new one starts
            await self._stop(m)
        check_port_free(name, mc.host, mc.port)
        state_dir = getattr(self.config, "state_dir", None)
        env = backend_env(mc)
        for hook in self.hooks:
            env = hook.backend_env(name, mc, env)
        spec = LaunchSpec(
            model=name,
            argv=tuple(backend_argv(mc)),
            env=env,
            # a missing state dir (embedded mode, tests) means "inherit ours"; so does
            # one we may not enter (an ordinary user beside an installed llmux, whose
            # /var/lib/llmux is 0750 llmux): chdir would fail every backend start
            working_directory=state_dir if state_dir and os.path.isdir(state_dir)
            and os.access(state_dir, os.X_OK) else None,
            user=mc.user or getattr(self.config, "user", None),
            gpus=tuple(mc.gpus),
            stop_timeout=self._stop_timeout,
            description=name,
        )
        self._set(m, ModelPhase.STARTING, reason=None)
        try:
            m.handle = await self.runtime.start(spec)
        except LLMuxError as exc:
            self._set(m, ModelPhase.FAILED, reason=str(exc))
            raise
        m.status.unit = m.handle.name
        m.status.main_pid = m.handle.main_pid
        m.status.adopted = False
        await self._wait_ready(m, mc.startup_timeout, "start")
        if self._warmup:
            try:
                await m.engine.warmup(name, mc.warmup_prompt)
            except Exception as exc:  # noqa: BLE001
                await self._fail_and_stop(m, "start", f"warm-up request failed: {exc}")

    async def _wait_ready(self, m: _Model, timeout: float, phase: str) -> None:
        """Poll health until ready, failing fast when the process exits meanwhile."""
        assert m.handle is not None
        handle = m.handle
        health = asyncio.ensure_future(
            m.engine.wait_healthy(time.monotonic() + timeout, process_alive=lambda: not handle.exited.is_set())
        )
        exited = asyncio.ensure_future(m.handle.exited.wait())
        try:
            done, _ = await asyncio.wait({health, exited}, timeout=timeout + 5, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (health, exited):
                task.cancel()
            await asyncio.gather(health, exited, return_exceptions=True)
        error = health.exception() if health in done and not health.cancelled() else None
        if isinstance(error, BackendExited):  # seen by the health poll first: collect the status
            try:
                await asyncio.wait_for(handle.exited.wait(), READY_TIMEOUT)
            except asyncio.TimeoutError:
                pass
        if exited in done or handle.exited.is_set():
            reason = f"backend {handle.exit_status or 'exited'} before it became ready"
            self._set(m, ModelPhase.FAILED, reason=reason)
            raise BackendError(m.status.name, phase, reason)
        if health not in done or error is not None:
            why = str(error) if error is not None else f"not healthy within {timeout:.0f}s"
            await self._fail_and_stop(m, phase, why)
        self._set(m, ModelPhase.READY, eviction=None, reason=None)

    async def _sleep(self, m: _Model, eviction: Eviction) -> None:
        name = m.status.name
        phase = m.status.phase
        prepared, m.prepared = m.prepared, None
        if phase in (ModelPhase.NOT_STARTED, ModelPhase.STOPPED, ModelPhase.FAILED):
            return
        if phase is not ModelPhase.READY and eviction.process is not ProcessStrategy.STOP:
            return  # already asleep; escalation to stop is the only change that makes sense
        if prepared is not None and eviction.process is not ProcessStrategy.STOP:
            eviction = prepared  # an overlapped switch ran the hooks before pausing it
        else:
            for hook in self.hooks:
                if phase is ModelPhase.READY:
                    eviction = await hook.before_sleep(self, m, eviction)
        if eviction.process is ProcessStrategy.STOP:
            await self._stop(m)
            return
        step = self.process_steps.get(eviction.process)
        m.evicting = eviction
        try:
            if eviction.weights not in getattr(m.engine, "weight_strategies", (eviction.weights,)):
                raise NotSupported(f"model '{name}': its engine cannot {eviction.weights.value} its weights "
                                   "(no vLLM sleep endpoints); use a retain+... eviction")
            if step is None or isinstance(step, _NotYet):
                raise (step._error(m) if step else NotSupported(f"eviction process '{eviction.process}' is unknown"))
            if eviction.sleep_level is not None:
                await asyncio.wait_for(m.engine.sleep(eviction.sleep_level), self._sleep_timeout)
            await asyncio.wait_for(step.apply(self, m), self._sleep_timeout)
        except NotSupported as exc:
            log.error("model %s: %s; stopping it instead", name, exc)
            await self._stop(m)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure escalates to stop
            log.warning("model %s: sleep (%s) failed: %s; escalating to stop", name, eviction, exc)
            await self._stop(m)
            m.status.reason = f"sleep ({eviction}) failed, stopped instead: {exc}"
            return
        finally:
            m.evicting = None
        self._set(m, step.phase, eviction=eviction)
        for hook in self.hooks:
            await hook.after_sleep(self, m, eviction)  # verified eviction: may escalate

    async def _wake(self, m: _Model) -> None:
        eviction = m.status.eviction
        assert eviction is not None and (m.handle is not None or m.status.phase is ModelPhase.CHECKPOINTED)
        fresh = False
        timeout, limit = self._wake_limit(m)
        try:
            fresh = await asyncio.wait_for(self._wake_steps(m, eviction), timeout)
        except BackendError as exc:
            await self._fail_and_stop(m, "wake", exc.reason)
        except asyncio.TimeoutError:
            await self._fail_and_stop(m, "wake", f"not awake within {timeout:.0f}s ({limit})")
        except Exception as exc:  # noqa: BLE001
            await self._fail_and_stop(m, "wake", str(exc) or type(exc).__name__)
        await self._wait_ready(m, self._ready_timeout, "wake")
        for hook in self.hooks:
            await hook.after_wake(self, m, eviction, bool(fresh))  # post-wake canary

    def _wake_limit(self, m: _Model) -> tuple[float, str]:
        """The wake's time limit and its name. A checkpointed model may have to
        download its image, restore it, or cold-start when that fails, so it gets
        what a cold start gets (as the switcher allows it), not just wake_timeout."""
        if m.status.phase is ModelPhase.CHECKPOINTED and m.config.startup_timeout > self._wake_timeout:
            return m.config.startup_timeout, "startup_timeout of a checkpointed model"
        return self._wake_timeout, "policy.wake_timeout"

    async def _wake_steps(self, m: _Model, eviction: Eviction) -> bool:
        """Process step back, then the weights: wake_up, reload after discard, reset the cache.

        Returns True when the step brought back a fresh process (a failed restore
        cold-starts): its weights are loaded, there is nothing to wake."""
        step = self.process_steps.get(eviction.process)
        fresh = bool(await step.revert(self, m)) if step is not None else False
        if eviction.sleep_level is not None and not fresh:
            if not await self._wake_measuring_weights(m, eviction):
                await m.engine.wake_up()
                if eviction.weights is WeightStrategy.DISCARD:
                    await m.engine.collective_rpc("reload_weights")
            if eviction.weights is WeightStrategy.DISCARD:
                try:
                    await m.engine.reset_prefix_cache()
                except Exception as exc:  # noqa: BLE001 - a stale cache only costs speed
                    log.warning("model %s: reset_prefix_cache failed (ignored): %s", m.status.name, exc)
        return fresh

    def weights_gib(self, model: str) -> float | None:
        """The GiB of `model`'s weights: its `weights_gib`, else what its first
        wake from sleep measured (None: neither), for the overlap plan."""
        configured = getattr(self._get(model).config, "weights_gib", None)
        return float(configured) if configured is not None else self._weights_measured.get(model)

    async def _wake_measuring_weights(self, m: _Model, eviction: Eviction) -> bool:
        """The first wake from sleep of a model without `weights_gib`, where a GPU
        probe sees its processes: wake in parts (weights, then KV cache, then
        scheduling) and take what the weights step added as the weights' size.
        Tried once per model; False (nothing woken) where it does not apply,
        and the caller wakes the plain way."""
        name = m.status.name
        measure = next((h.measure_backend for h in self.hooks if hasattr(h, "measure_backend")), None)
        if measure is None or name in self._weights_tried or self.weights_gib(name) is not None:
            return False
        self._weights_tried.add(name)
        before = await measure(self, m)
        if before is None or before.mib is None:
            return False
        try:
            await m.engine.wake_up(["weights"])
        except Exception as exc:  # noqa: BLE001
            if refusal(exc) is None:
                raise
            log.warning("model %s: the server refused a partial wake (%s); its weights are not measured, "
                        "and its switches stay sequential unless weights_gib is set", name, refusal(exc))
            return False  # nothing was woken: the plain wake follows
        if eviction.weights is WeightStrategy.DISCARD:
            await m.engine.collective_rpc("reload_weights")
        after = await measure(self, m)
        await m.engine.wake_up(["kv_cache"])
        await m.engine.wake_up(["scheduling"])
        if after is not None and after.mib is not None and after.mib > before.mib:
            self._weights_measured[name] = round((after.mib - before.mib) / 1024, 3)
            log.info("model %s: weights measured at its first wake: %.2f GiB (%d -> %d MiB, %s); "
                     "its switches may overlap from now on", name, self._weights_measured[name],
                     before.mib, after.mib, after.method)
        else:
            log.warning("model %s: its weights could not be measured at its first wake (%s -> %s MiB, %s); "
                        "its switches stay sequential unless weights_gib is set", name, before.mib,
                        None if after is None else after.mib, before.method)
        return True

    async def _stop(self, m: _Model) -> None:
        handle = m.handle
        if handle is None or handle.exited.is_set():
            if m.status.phase not in (ModelPhase.NOT_STARTED, ModelPhase.FAILED):
                self._set(m, ModelPhase.STOPPED, eviction=None)
            return
        handle.stopping = True
        try:
            await self.runtime.stop(handle, self._stop_timeout)
        except LLMuxError as exc:
            self._set(m, ModelPhase.FAILED, reason=str(exc))
            raise BackendError(m.status.name, "stop", exc.message) from None
        except BaseException:
            # cut short (a caller's timeout): the backend is on its way down and
            # its exit will not be reported (stopping); it must not pass for awake
            self._set(m, ModelPhase.FAILED, eviction=None, reason="stop interrupted; the backend may still be exiting")
            raise
        self._set(m, ModelPhase.STOPPED, eviction=None)
        m.status.main_pid = None

    async def _stop_after_failure(self, m: _Model) -> None:
        try:
            await self._stop(m)
        except BackendError as exc:
            log.error("model %s: could not stop after a failure: %s", m.status.name, exc)

    async def _fail_and_stop(self, m: _Model, phase: str, reason: str) -> None:
        await self._stop_after_failure(m)
        self._set(m, ModelPhase.FAILED, reason=f"{phase}: {reason}")
        raise BackendError(m.status.name, phase, reason)

    async def reload(self, config: Any) -> None:
        """Take a new config (llmuxd reload; added by the service room): new
        models become known, the others get their new settings, used from
        their next start or wake. A model whose launch settings changed must be
        stopped by the caller first. Removed models stay known until the
        switcher has drained and stopped them."""
        self.config = config
        for name, mc in config.models.items():
            m = self._models.get(name)
            if m is None:
                self._models[name] = _Model(mc, ModelStatus(name), self._engine_factory(mc))
            elif m.config != mc:
                if (m.config.host, m.config.port, getattr(m.config, "engine", DEFAULT_ENGINE)) != (
                        mc.host, mc.port, getattr(mc, "engine", DEFAULT_ENGINE)):
                    old, m.engine = m.engine, self._engine_factory(mc)
                    try:
                        await old.close()
                    except Exception:  # noqa: BLE001 - the old client is gone either way
                        pass
                m.config = mc

    # -- bookkeeping --------------------------------------------------------

    def _get(self, model: str) -> _Model:
        try:
            return self._models[model]
        except KeyError:
            raise UnknownModel(model, list(self._models)) from None

    _UNSET: Any = object()

    def _set(self, m: _Model, phase: ModelPhase, *, eviction: Any = _UNSET, reason: Any = _UNSET) -> None:
        m.status.phase = phase
        if eviction is not self._UNSET:
            m.status.eviction = eviction
        if reason is not self._UNSET:
            m.status.reason = reason
        if m.handle is not None:
            m.status.main_pid = m.handle.main_pid

    def _on_runtime_exit(self, handle: Handle, status: ExitStatus) -> None:
        m = self._models.get(handle.model)
        if m is None or m.handle is not handle or handle.stopping:
            return
        reason = f"backend {status}"
        starting = m.status.phase is ModelPhase.STARTING and m.lock.locked()
        self._set(m, ModelPhase.FAILED, eviction=None, reason=reason)
        m.status.main_pid = None
        if starting:
            return  # the start in progress reports it as its BackendError
        for callback in self._exit_callbacks:
            try:
                callback(handle.model, reason)
            except Exception:  # noqa: BLE001 - a listener must not break the runtime
                log.exception("on_unexpected_exit callback failed")
