"""The orchestrator on the vLLM simulator, under both runtimes.

`subprocess` cases run anywhere; `systemd` cases run the same sequences as
transient units of the real test systemd (root only, skipped elsewhere).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import uuid

import pytest

from llmuxd.config import Config
from llmuxd.errors import BackendError, NotSupported
from llmuxd.eviction import Eviction, ProcessStrategy, WeightStrategy
from llmuxd.lifecycle import BackendState
from llmuxd.orchestrator import ModelPhase, Orchestrator, backend_argv
from llmuxd.runtime.subprocess import SubprocessRuntime
from llmuxd.runtime.systemd import SystemdRuntime
from sysd.helpers import PYTHON, ahttp, completion, free_port, wait_until

SIM_COMMAND = [PYTHON, "-m", "llmuxd.sim.server", "serve"]
PROMPT = "What is the capital of France?"


#: every eviction supported now (offload+stop and discard+stop included: llmux 0.7's README lists them)
EVICTIONS = [
    Eviction(w, p)
    for w, p in itertools.product(
        WeightStrategy, (ProcessStrategy.KEEP_RUNNING, ProcessStrategy.FREEZE, ProcessStrategy.STOP)
    )
]


def model_config(name: str, **overrides) -> dict:
    return {
        "model_path": f"/models/{name}",
        "command": SIM_COMMAND,
        "port": free_port(),
        "startup_timeout": 120,
        "gpu_memory_gib": 1,
        **overrides,
    }


@pytest.fixture(params=["subprocess", pytest.param("systemd", marks=pytest.mark.systemd)])
def runtime_kind(request):
    if request.param == "systemd":
        request.getfixturevalue("real_systemd")
    return request.param


@pytest.fixture
async def make(runtime_kind, request):
    """make(models={name: overrides}) -> a started Orchestrator; all stopped afterwards."""
    made: list[Orchestrator] = []

    async def factory(models: dict[str, dict], **kw) -> Orchestrator:
        if runtime_kind == "systemd":
            runtime = SystemdRuntime(bus_address=request.getfixturevalue("real_systemd").bus_address)
        else:
            runtime = SubprocessRuntime()
        await runtime.connect()
        config = Config.from_dict(
            {
                "user": "root",
                # a budget admitting two awake models makes retain+keep_running legal
                "groups": {"default": {"budget_gib": 1000}},
                "models": {name: model_config(name, **o) for name, o in models.items()},
            }
        )
        orchestrator = Orchestrator(config, runtime, stop_timeout=10, **kw)
        made.append(orchestrator)
        return orchestrator

    yield factory
    for orchestrator in made:
        await orchestrator.close()
        await orchestrator.runtime.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def answer(orch: Orchestrator, model: str) -> str:
    return await asyncio.to_thread(completion, orch.endpoint(model), model, PROMPT)


async def sim_state(orch: Orchestrator, model: str) -> dict:
    status, body = await ahttp("GET", f"{orch.endpoint(model)}/sim/state")
    assert status == 200, body
    return body


async def fault(orch: Orchestrator, model: str, kind: str) -> None:
    status, body = await ahttp("POST", f"{orch.endpoint(model)}/sim/fault", {"kind": kind})
    assert status == 200, body


def refuses_connections(orch: Orchestrator, model: str) -> bool:
    host, port = orch.endpoint(model).rsplit("/", 1)[1].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError:
        return True
    return False


# -- full cycles ------------------------------------------------------------

EXPECTED_PHASE = {
    ProcessStrategy.KEEP_RUNNING: ModelPhase.SLEEPING,
    ProcessStrategy.FREEZE: ModelPhase.FROZEN,
    ProcessStrategy.STOP: ModelPhase.STOPPED,
}


@pytest.mark.parametrize("eviction", EVICTIONS, ids=str)
async def test_sleep_wake_cycle_answers_the_same(make, eviction):
    model = unique("cycle")
    orch = await make({model: {"eviction": str(eviction)}})
    await orch.ensure_awake(model)
    assert orch.state(model) is BackendState.READY
    before = await answer(orch, model)

    await orch.sleep(model, eviction)
    assert orch.status(model).phase is EXPECTED_PHASE[eviction.process]
    if eviction.process is ProcessStrategy.STOP:
        assert refuses_connections(orch, model)
    elif eviction.process is ProcessStrategy.KEEP_RUNNING and eviction.sleep_level:
        state = await sim_state(orch, model)
        assert state["is_sleeping"] and state["sleep_level"] == eviction.sleep_level

    await orch.ensure_awake(model)
    assert orch.state(model) is BackendState.READY
    assert await answer(orch, model) == before
    if eviction.weights is WeightStrategy.DISCARD and eviction.process is not ProcessStrategy.STOP:
        # (discard+stop, llmux 0.7's pair, stops the process without the weight step: a cold start)
        rpc = [call.get("method") if isinstance(call, dict) else call for call in (await sim_state(orch, model))["collective_rpc"]]
        assert "reload_weights" in str(rpc)


async def test_discard_without_reload_would_be_caught(make):
    """Negative control: skipping reload_weights after a level-2 sleep gives garbage,
    so the cycle test above fails for an orchestrator that forgets it."""
    model = unique("noreload")
    orch = await make({model: {"eviction": "discard+keep_running"}})
    await orch.ensure_awake(model)
    before = await answer(orch, model)
    engine = orch._models[model].engine

    async def skip(method: str, **_kw):
        return None

    engine.collective_rpc = skip
    await orch.sleep(model, Eviction.parse("discard+keep_running"))
    await orch.ensure_awake(model)
    assert await answer(orch, model) != before


# -- escalation -------------------------------------------------------------


async def test_a_failing_sleep_ends_stopped(make):
    model = unique("failsleep")
    orch = await make({model: {}})
    await orch.ensure_awake(model)
    await fault(orch, model, "fail_sleep")
    await orch.sleep(model, Eviction.parse("offload+keep_running"))
    assert orch.state(model) is BackendState.STOPPED
    assert "sleep" in orch.status(model).reason
    assert refuses_connections(orch, model)
    await orch.ensure_awake(model)  # a cold start brings it back
    assert orch.state(model) is BackendState.READY


async def test_a_failing_wake_ends_stopped_and_names_model_and_phase(make):
    model = unique("failwake")
    orch = await make({model: {}})
    await orch.ensure_awake(model)
    await orch.sleep(model, Eviction.parse("offload+keep_running"))
    await fault(orch, model, "fail_wake")
    with pytest.raises(BackendError) as err:
        await orch.ensure_awake(model)
    assert err.value.model == model and err.value.phase == "wake"
    assert f"model '{model}' failed to wake" in str(err.value)
    assert orch.state(model) is BackendState.FAILED
    assert refuses_connections(orch, model)


@pytest.mark.parametrize("process", ["cuda_suspend", "checkpoint"])
async def test_not_yet_supported_process_steps_stop_the_model_and_say_so(make, process):
    model = unique("notyet")
    orch = await make({model: {}})
    await orch.ensure_awake(model)
    with pytest.raises(NotSupported) as err:
        await orch.sleep(model, Eviction(WeightStrategy.RETAIN, ProcessStrategy(process)))
    assert "not supported yet" in str(err.value) and model in str(err.value)
    assert orch.state(model) is BackendState.STOPPED


# -- failures seen by the orchestrator ---------------------------------------


async def test_a_backend_that_exits_during_start_fails_fast_with_its_status(make):
    model = unique("exits")
    orch = await make({model: {"command": ["sh", "-c", "echo loading; exit 3"], "startup_timeout": 600}})
    with pytest.raises(BackendError) as err:
        await asyncio.wait_for(orch.ensure_awake(model), 120)
    assert err.value.phase == "start" and "exited with status 3" in str(err.value)
    assert orch.state(model) is BackendState.FAILED


async def test_a_backend_that_dies_later_is_reported(make):
    model = unique("crash")
    orch = await make({model: {}})
    reports: list[tuple[str, str]] = []
    orch.on_unexpected_exit(lambda name, reason: reports.append((name, reason)))
    await orch.ensure_awake(model)
    await fault(orch, model, "crash")
    await wait_until(lambda: reports, what="unexpected-exit report")
    assert reports == [(model, "backend exited with status 1")]
    assert orch.state(model) is BackendState.FAILED and orch.status(model).reason == "backend exited with status 1"


async def test_a_stop_cut_short_leaves_the_model_not_awake_and_the_next_wake_restarts_it(make):
    """The switcher bounds a stop by its sleep timeout; a backend slower to exit
    than that must not stay "ready" (requests forwarded to a dying port), and
    the next wake must finish the stop and start a fresh backend."""
    model = unique("slowstop")
    orch = await make({model: {"env": {"LLMUX_SIM_TERM_HANG": "1"}}})  # exits only on SIGKILL (10 s)
    await orch.ensure_awake(model)
    old_pid = orch.status(model).main_pid
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(orch.stop(model), 0.5)
    assert orch.state(model) is BackendState.FAILED
    assert "stop interrupted" in orch.status(model).reason
    await asyncio.wait_for(orch.ensure_awake(model), 120)
    assert orch.state(model) is BackendState.READY
    assert orch.status(model).main_pid not in (None, old_pid)
    assert await answer(orch, model)  # the fresh backend answers (completion asserts a 200)


async def test_a_missing_command_fails_at_start(make):
    model = unique("ghost")
    orch = await make({model: {"command": ["/nonexistent/vllm", "serve"]}})
    with pytest.raises(BackendError) as err:
        await orch.ensure_awake(model)
    assert "/nonexistent/vllm" in str(err.value) and err.value.phase == "start"
    assert orch.state(model) is BackendState.FAILED


async def test_a_port_in_use_is_refused_before_spawning(make):
    model = unique("busy")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        orch = await make({model: {"port": port}})
        with pytest.raises(BackendError) as err:
            await orch.ensure_awake(model)
    assert f"port {port}" in str(err.value) and "already in use" in str(err.value)
    assert orch._models[model].handle is None  # nothing was spawned


def test_model_path_is_positional_after_serve_else_model_flag():
    config = Config.from_dict(
        {
            "models": {
                "a": {"model_path": "/m/a", "command": ["vllm", "serve"], "port": 9001, "extra_args": ["-tp", "2"]},
                "b": {"model_path": "/m/b", "command": ["python", "-m", "vllm.entrypoints.openai.api_server"],
                      "port": 9002, "sleep_mode": False, "eviction": "retain+stop"},
            }
        }
    )
    assert backend_argv(config.models["a"]) == [
        "vllm", "serve", "/m/a", "--host", "127.0.0.1", "--port", "9001",
        "--served-model-name", "a", "--enable-sleep-mode", "-tp", "2",
    ]
    assert backend_argv(config.models["b"]) == [
        "python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m/b", "--host", "127.0.0.1",
        "--port", "9002", "--served-model-name", "b",
    ]


# -- systemd only -------------------------------------------------------------


@pytest.mark.systemd
async def test_units_log_to_the_journal_with_the_model_field(real_systemd):  # noqa: F811
    model = unique("journal")
    runtime = SystemdRuntime(bus_address=real_systemd.bus_address)
    await runtime.connect()
    config = Config.from_dict({"user": "root", "models": {model: model_config(model)}})
    orch = Orchestrator(config, runtime, stop_timeout=10)
    try:
        await orch.ensure_awake(model)
        assert orch.status(model).unit.startswith("llmux-model-journal")
        await answer(orch, model)
        await wait_until(lambda: "/v1/completions" in real_systemd.journal(f"LLMUX_MODEL={model}"), what="journal")
    finally:
        await orch.close()
        await runtime.close()


@pytest.mark.systemd
async def test_a_new_orchestrator_adopts_running_sleeping_and_frozen_units(real_systemd):  # noqa: F811
    names = {"awake": unique("awake"), "asleep": unique("asleep"), "frozen": unique("frozen")}
    models = {
        names["awake"]: model_config(names["awake"]),
        names["asleep"]: model_config(names["asleep"], eviction="offload+keep_running"),
        names["frozen"]: model_config(names["frozen"], eviction="offload+freeze"),
    }
    config = Config.from_dict({"user": "root", "models": models})
    first_rt = SystemdRuntime(bus_address=real_systemd.bus_address)
    await first_rt.connect()
    first = Orchestrator(config, first_rt, stop_timeout=10)
    second_rt = SystemdRuntime(bus_address=real_systemd.bus_address)
    second = Orchestrator(config, second_rt, stop_timeout=10)
    try:
        for name in names.values():
            await first.ensure_awake(name)
        answers = {name: await answer(first, name) for name in names.values()}
        await first.sleep(names["asleep"], Eviction.parse("offload+keep_running"))
        await first.sleep(names["frozen"], Eviction.parse("offload+freeze"))
        pids = {name: first.status(name).main_pid for name in names.values()}
        await first_rt.close()  # the daemon goes away; the units stay

        await second_rt.connect()
        found = await second.adopt()
        assert found == {
            names["awake"]: BackendState.READY,
            names["asleep"]: BackendState.SLEEPING,
            names["frozen"]: BackendState.SLEEPING,
        }
        assert second.status(names["frozen"]).phase is ModelPhase.FROZEN
        assert str(second.status(names["frozen"]).eviction) == "offload+freeze"
        assert {name: second.status(name).main_pid for name in names.values()} == pids  # not restarted
        for name in names.values():
            await second.ensure_awake(name)
            assert await answer(second, name) == answers[name]
            assert second.status(name).main_pid == pids[name]
    finally:
        await first.close(stop_backends=False)
        await second.close()
        await second_rt.close()
