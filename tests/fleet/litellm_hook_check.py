"""Run by tests/fleet/test_litellm_hook.py with LiteLLM's own Python: llmux's hook inside a real
`litellm.Router` (the SDK; the proxy builds the same Router), against two fake llmux hosts.

Host A says its model is awake but drops every inference connection (a host that just
died); host B says the model is asleep and answers. The hook must send the first request
to A (awake beats asleep), learn from LiteLLM's failure event that A is gone, and send
every later request to B without waiting for a poll. Prints one JSON line of findings.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

import litellm
from litellm import Router

from llmuxd.fleet.litellm import LLMuxRouting, deployment_target
from llmuxd.fleet.signal import HostSignal, ModelSignal


def signal(state: str) -> dict:
    m = ModelSignal(state=state, switcher_state=state, accepts=True, in_flight=0, queue_depth=0,
                    wait_estimate_s=0.0 if state == "awake" else 2.0, fits_without_eviction=True)
    return HostSignal(version="t", mode="auto", pinned=None, policy="fifo", queue_limit=10, models={"m": m}).to_json()


async def host(state: str, answers: bool) -> web.AppRunner:
    async def state_route(request: web.Request) -> web.Response:
        return web.json_response(signal(state))

    async def chat(request: web.Request) -> web.StreamResponse:
        if not answers:
            request.transport.close()  # the connection drops: a dead host
            raise asyncio.CancelledError
        return web.json_response({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                  "system_fingerprint": "llmux-sim:m",
                                  "choices": [{"index": 0, "finish_reason": "length",
                                               "message": {"role": "assistant", "content": "ok"}}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    app = web.Application()
    app.router.add_get("/llmux/v1/state", state_route)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def port(runner: web.AppRunner) -> int:
    return runner.addresses[0][1]


async def main() -> dict:
    dead, live = await host("awake", answers=False), await host("asleep", answers=True)
    a, b = f"http://127.0.0.1:{port(dead)}/v1", f"http://127.0.0.1:{port(live)}/v1"
    hook = LLMuxRouting(refresh_s=60)  # no poll after the first: only the failure event can tell
    litellm.callbacks = [hook]
    model_list = [{"model_name": "m", "litellm_params": {"model": "openai/m", "api_base": base, "api_key": "none"}}
                  for base in (a, b)]
    router = Router(model_list=model_list, num_retries=0)
    for base in (a, b):
        await hook.view.refresh(base)
    served, errors = [], []
    for _ in range(6):
        try:
            resp = await router.acompletion(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
            served.append(resp._hidden_params.get("api_base"))
        except Exception as exc:  # noqa: BLE001 - the first request meets the dead host
            errors.append(type(exc).__name__)
        await asyncio.sleep(0.2)  # failure callbacks run as tasks after the call returns
    record = hook.view.hosts[next(k for k in hook.view.hosts if str(port(dead)) in k)]
    await hook.view.close()
    for runner in (dead, live):
        await runner.cleanup()
    return {"targets": [deployment_target(d) for d in model_list], "a": a, "b": b, "served": served,
            "errors": errors, "a_down": record.down, "a_error": record.error}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
    sys.stdout.flush()
