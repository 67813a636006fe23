"""llmuxd.engine.openai.OpenAIClient: readiness from /health, else /v1/models, and no sleep API.

The servers here are small aiohttp apps that answer as reference/shared-host.md §D records
the real ones do (llama-server: 503 on every route while it loads; llama-cpp-python and
Ollama: no /health at all). The real llama-cpp-python server is driven through llmux in
tests/real_vllm/test_llamacpp.py; the simulator stands in for a server with a plain /health.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from llmuxd.config import Config

from llmuxd.engine.errors import BackendHTTPError, BackendTimeout
from llmuxd.engine.openai import EngineTimeouts, OpenAIClient
from llmuxd.errors import NotSupported
from llmuxd.eviction import Eviction, WeightStrategy
from llmuxd.lifecycle import BackendState
from llmuxd.orchestrator import ModelPhase, Orchestrator
from llmuxd.runtime.subprocess import SubprocessRuntime
from sim_fixtures import sim_cache, sim_factory  # noqa: F401
from sysd.helpers import PYTHON, ahttp, completion, free_port

LOADING = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
MODELS = {"object": "list", "data": [{"id": "smol", "object": "model"}]}


class FakeServer:
    """An OpenAI-compatible server that is loading for the first `loading_probes` requests;
    `has_health` False: /health is not a route (404, as FastAPI answers)."""

    def __init__(self, *, has_health: bool, loading_probes: int = 0):
        self.has_health = has_health
        self.loading_probes = loading_probes
        self.paths: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        if request.path == "/health" and not self.has_health:
            return web.json_response({"detail": "Not Found"}, status=404)
        if len(self.paths) <= self.loading_probes:
            return web.json_response(LOADING, status=503)
        if request.path == "/health":
            return web.json_response({"status": "ok"})
        if request.path == "/v1/models":
            return web.json_response(MODELS)
        return web.json_response({"detail": "Not Found"}, status=404)


@pytest.fixture
async def serve():
    runners: list[web.AppRunner] = []

    async def start(fake: FakeServer) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", fake.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


FAST = EngineTimeouts(health_poll=0.01, health_probe=5)

READINESS = [
    # (id, server, probes until ready, paths asked)
    ("llama-server-loading", dict(has_health=True, loading_probes=3), ["/health"] * 4),
    ("llama-cpp-python", dict(has_health=False), ["/health", "/v1/models"]),
    ("no-health-still-loading", dict(has_health=False, loading_probes=2),
     ["/health", "/v1/models", "/v1/models"]),
]


@pytest.mark.parametrize("server,paths", [c[1:] for c in READINESS], ids=[c[0] for c in READINESS])
async def test_wait_healthy_asks_health_else_models(serve, server, paths):
    fake = FakeServer(**server)
    async with OpenAIClient(await serve(fake), timeouts=FAST) as client:
        await client.wait_healthy(time.monotonic() + 30, process_alive=lambda: True)
        assert fake.paths == paths
        # readiness stays where it was found: a server without /health is not asked again
        await client.health()
        assert fake.paths[-1] == paths[-1]


async def test_loading_server_is_not_ready(serve):
    async with OpenAIClient(await serve(FakeServer(has_health=True, loading_probes=10**6)), timeouts=FAST) as c:
        with pytest.raises(BackendHTTPError) as info:
            await c.health()
        assert (info.value.status, info.value.detail) == (503, "Loading model")
        with pytest.raises(BackendTimeout, match="not healthy within .* HTTP 503"):
            await c.wait_healthy(time.monotonic() + 0.3)


async def test_no_sleep_api_and_only_retain(serve):
    fake = FakeServer(has_health=False)
    async with OpenAIClient(await serve(fake), timeouts=FAST) as client:
        assert client.weight_strategies == frozenset({WeightStrategy.RETAIN})
        assert await client.is_sleeping() is False  # it answers: awake
        for call in (client.sleep(1), client.wake_up(), client.collective_rpc("reload_weights"),
                     client.reset_prefix_cache()):
            with pytest.raises(NotSupported, match="no vLLM sleep endpoints"):
                await call
        assert "/sleep" not in fake.paths and "/wake_up" not in fake.paths
        assert await client.version() == ""  # no /version: nothing to record, no failure


async def test_a_server_with_plain_health_is_ready(sim_factory):  # noqa: F811
    sim = sim_factory("plain")
    async with OpenAIClient(sim.base_url, timeouts=FAST) as client:
        await client.wait_healthy(time.monotonic() + 60)
        assert await client.probe("plain", "The capital of France is", 4)


# ------------------------------------------------------- through the orchestrator (embedded)

SIM_AS_OPENAI = [PYTHON, "-m", "llmuxd.sim.server", "serve", "${MODEL_PATH}", "--host", "${HOST}",
                 "--port", "${PORT}", "--served-model-name", "${MODEL_ID}"]


async def test_orchestrator_runs_an_openai_server_as_written_and_evicts_it_by_process():
    """The simulator started as an `engine: openai` command: its placeholders filled in, a
    freeze and thaw keep its answer and never call /sleep; an offload asked of it directly
    (past the switcher's check) is refused and the model stopped, as any failed sleep."""
    config = Config.from_dict({"user": "root", "models": {"o": {
        "engine": "openai", "model_path": "/models/o", "command": SIM_AS_OPENAI, "port": free_port(),
        "eviction": "retain+freeze", "startup_timeout": 120, "env": {"LLMUX_SIM_TOKENS_PER_S": "0"}}}})
    runtime = SubprocessRuntime()
    await runtime.connect()
    orch = Orchestrator(config, runtime, stop_timeout=10)
    try:
        await orch.ensure_awake("o")
        before = await asyncio.to_thread(completion, orch.endpoint("o"), "o", "What is 2+2?")
        await orch.sleep("o", Eviction.parse("retain+freeze"))
        assert orch.status("o").phase is ModelPhase.FROZEN
        await orch.ensure_awake("o")
        assert await asyncio.to_thread(completion, orch.endpoint("o"), "o", "What is 2+2?") == before
        status, state = await ahttp("GET", f"{orch.endpoint('o')}/sim/state")
        assert status == 200 and state["calls"], state
        assert not [c for c in state["calls"] if "sleep" in str(c) or "wake" in str(c)], state["calls"]
        with pytest.raises(NotSupported, match="cannot offload its weights"):
            await orch.sleep("o", Eviction.parse("offload+keep_running"))
        assert orch.state("o") is BackendState.STOPPED
    finally:
        await orch.close()
        await runtime.close()
