"""`llmux-vllm-sim`: a stand-in for `vllm serve` (vLLM 0.32) for tests, demos and benchmarks.

Start it the ways vLLM is started::

    llmux-vllm-sim serve MODEL --port P [--host H] [--served-model-name NAME ...]
    python -m llmuxd.sim.server serve MODEL --port P
    python -m llmuxd.sim.server --model MODEL --port P        # like vllm.entrypoints.openai.api_server

Every other vLLM flag (`--gpu-memory-utilization 0.9`, `-tp 2`, `--enforce-eager`, ...) is
accepted and ignored, except `--tensor-parallel-size/-tp` (recorded), `--max-model-len`,
`--max-num-seqs` (running requests; more wait), `--enable-sleep-mode` and `--shutdown-timeout`
(grace for running requests on SIGTERM). Running requests advance one token per engine step
together, at LLMUX_SIM_TOKENS_PER_S.
`--port 0` binds a free port; the "Uvicorn running on http://HOST:PORT" line names it.

Real device memory (optional, needs `pip install 'llmux[torch]'`; without torch `--device` is a
one-line error naming that extra): `--device cuda|cpu` holds the weights and the KV cache as
torch tensors on that device instead of booking them in the JSON ledger (llmuxd/sim/device.py).
`--sim-weights-gib G` sizes the weights (default LLMUX_SIM_WEIGHTS_MB, else 256 MiB), read at
start from the weights file under LLMUX_SIM_CACHE (written once); the KV cache is what
`--gpu-memory-utilization U` (default 0.9) leaves of the GPU as vLLM sizes it, on the CPU
VLLM_CPU_KVCACHE_SPACE GiB (default: as much as the weights), or `--sim-kv-cache-gib K`.
Sleep level 1 copies the weights to host memory (pinned on CUDA) and frees both on the device
(`torch.cuda.empty_cache()`); level 2 frees both, and its wake gets uninitialised weights until
`reload_weights` reads the file again. Every answer reads the weights through a small matmul
whose checksum seeds the greedy text and comes back in `X-Sim-Weights-Checksum` (plain JSON
answers): wrong bytes after a wake give a different answer. The LLMUX_SIM_GPU_* ledger variables
are not used with `--device`; `/sim/state` reports `device` and `weights_checksum`.

What it matches (reference/vllm-api.md): `/health` (200, empty body; refused while loading,
because the port is bound only once "loaded"), `/version`, `/ping`, `/load`, `/v1/models`,
`/tokenize`, `/detokenize`, `/v1/completions`, `/v1/chat/completions` (JSON and SSE),
`/v1/embeddings`, `/metrics`; vLLM's error envelope `{"error":{message,type,param,code}}` and
FastAPI's `404 {"detail":"Not Found"}`. Dev routes exist only with `VLLM_SERVER_DEV_MODE=1`:
`/sleep?level=0..2&mode=abort|wait|keep`, `/wake_up?tags=...`, `/is_sleeping`,
`/release_kv_cache_memory` (only after `/sleep?level=0`, else 500 as vLLM), `/pause`,
`/resume`, `/is_paused`, `/reset_prefix_cache`, `/reset_mm_cache`, `/collective_rpc`,
`/server_info`. Requests that arrive while asleep are held until wake, not rejected.

Every inference response names the model that produced it: the `model` field, the header
`X-Sim-Model` and `system_fingerprint: "llmux-sim:<served name>"`. Every other answer, errors
included (404 for a model it does not serve, 400, 405, 500), carries `X-Sim-Model` too, so a
request that reached the wrong backend is visible whatever its status. Text is derived from the
served name and the prompt, so a temperature-0 request gives the same answer every time — and
after a level-2 wake without `collective_rpc reload_weights` it gives garbage
(`"\\ufffdgarbage!!!…"`, vLLM #29341).

Environment (all optional):

=============================  ==============================================================
LLMUX_SIM_LOAD_TIME            seconds of cold start before the port is bound (default 0)
LLMUX_SIM_WEIGHTS_MB           weights size: a file of deterministic bytes per model, created
                               once under LLMUX_SIM_CACHE and read into host RAM at start
                               (page cache dropped first, so it is real I/O). Level 1 keeps it,
                               level 2 frees it; `reload_weights` reads the file again
LLMUX_SIM_CACHE                weights cache dir (default /tmp/llmux-sim-cache)
LLMUX_SIM_DROP_CACHE           0 = do not drop the weights file from the page cache
LLMUX_SIM_TOKENS_PER_S         generation speed (default 200; 0 = instant)
LLMUX_SIM_SLEEP_TIME           extra seconds per sleep level for /sleep (default 0)
LLMUX_SIM_WAKE_TIME            extra seconds per sleep level for /wake_up (default 0)
LLMUX_SIM_GPU_LEDGER           path of the GPU ledger shared by all simulators (see ledger.py)
LLMUX_SIM_GPU_MB               this process's GPU need, reserved at start (start fails like CUDA
                               OOM, exit 1, when it does not fit)
LLMUX_SIM_GPU_CAPACITY_MB      ledger capacity when the ledger file is created (default 81920)
LLMUX_SIM_GPU_RESIDUE_MB       what a sleeping process keeps (CUDA context; default 500)
LLMUX_SIM_TP                   tensor-parallel size when no -tp flag is given (default 1)
LLMUX_SIM_TERM_HANG            1 = ignore SIGTERM entirely (for SIGKILL escalation tests)
LLMUX_SIM_EMBED_DIM            embedding size (default 384)
LLMUX_SIM_PLATFORM             cpu = reject --enable-sleep-mode at start and answer
                               /release_kv_cache_memory with 500 "Selective discard is not
                               supported on CPU", like vLLM on CPU
LLMUX_SIM_SELECTIVE_DISCARD    0 = only the /release_kv_cache_memory refusal of the CPU
LLMUX_SIM_H2D_GBPS, _D2H_GBPS  host link GB/s each way (or --h2d-gbps/--d2h-gbps): a level-1
                               sleep copies the weights out, their wake and reload_weights copy
                               them in; each way is independent, the same way is shared by
                               every simulator on the host (llmuxd/sim/link.py; default 0 = free)
LLMUX_SIM_GPU_WEIGHTS_MB       the weights' part of LLMUX_SIM_GPU_MB (default 60 % above the
                               residue); the KV cache is the rest. It is what crosses the link
LLMUX_SIM_LINK_DIR             where running transfers are marked (default: the ledger + .link)
LLMUX_SIM_LEGACY_503           1 = answer inference with 503 while asleep (old vLLM and its docs)
LLMUX_SIM_WORKERS              N child processes named VLLM::EngineCore / VLLM::Worker_TPi, in
                               the same process group, like vLLM's process tree (default 0).
                               Stopped on a clean exit; a SIGKILL of the server alone leaves
                               them running, which is what tests of group kill/freeze need
=============================  ==============================================================

Fault injection (always mounted, not part of vLLM):

- `POST /sim/fault {"kind": K, "count": N, "seconds": S}` arms a fault. `count` is how many
  times it fires (default 1; -1 = until cleared; 0 = clear). Kinds: `fail_sleep` and
  `fail_wake` (HTTP 500), `fail_wake_midway` (a weights wake reserves its memory, copies half,
  then answers 500 and keeps the memory, vLLM PR #34600), `fail_release`
  (`/release_kv_cache_memory` 500), `hang_sleep` (/sleep never answers until cleared), `fail_reload`
  (`reload_weights` 500), `wrong_reload` (`reload_weights` answers 200 but brings back the wrong
  bytes: with `--device` the first MiB is zeroed, so the checksum and the answer change; without
  it the answers are garbage), `sleep_keeps_memory` (sleep answers 200 but keeps its GPU
  reservation, or with `--device` its tensors, vLLM #32714; default until cleared), `crash` (exit 1 now), `crash_mid_stream`
  (exit 1 during the next streamed response), `engine_dead` (/health 503, inference 500,
  until cleared), `garbage` (outputs are garbage; default until
  cleared), `latency` (`seconds` added to every request; until cleared), `slow_start` (the next
  start of a simulator with this served name takes `seconds` longer; kept in the cache dir).
- `DELETE /sim/fault[?kind=K]` clears one or all faults.
- `GET /sim/state`: sleep state, faults pending, calls received, collective_rpc history,
  weights, GPU reservation.

Process: SIGTERM exits within a moment when idle. With requests in flight and the default
`--shutdown-timeout 0` the engine dies at once and the server waits until those clients hang up,
as vLLM does. A line per request and per sleep/wake is printed on stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import aclosing
from typing import Any, Awaitable, Callable

from aiohttp import web

from llmuxd.sim.core import SLEEP_MODES, GenRequest, SimCore, SimError
from llmuxd.sim.device import DeviceOutOfMemory, import_torch
from llmuxd.sim.ledger import GpuOutOfMemory
from llmuxd.sim.settings import VLLM_VERSION, SimSettings, parse_args

SIM_MODEL_HEADER = "X-Sim-Model"
#: the weights checksum an answer was computed with (--device; plain JSON answers)
SIM_CHECKSUM_HEADER = "X-Sim-Weights-Checksum"
CORE_KEY = "llmux_sim_core"
TASKS_KEY = "llmux_sim_handler_tasks"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def log(msg: str) -> None:
    print(f"INFO {time.strftime('%m-%d %H:%M:%S')} [llmux-sim] {msg}", flush=True)


def error_response(status: int, message: str, type_: str, param: str | None = None) -> web.Response:
    """vLLM's error envelope."""
    return web.json_response(
        {"error": {"message": message, "type": type_, "param": param, "code": status}}, status=status
    )


def bad_request(message: str, param: str | None = None) -> web.Response:
    return error_response(400, message, "Bad Request", param)


def validation_error(loc: str, typ: str, msg: str, value: Any) -> web.Response:
    """The message pydantic + FastAPI produce for one invalid field."""
    detail = {"type": typ, "loc": loc, "msg": msg, "input": value}
    return bad_request(f"1 validation error:\n  {detail}", loc)


def _core(request: web.Request) -> SimCore:
    return request.app[CORE_KEY]


def _fingerprint(core: SimCore) -> str:
    return f"llmux-sim:{core.s.name}"


# --------------------------------------------------------------------------- middleware


@web.middleware
async def vllm_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """FastAPI's plain 404/405 for unknown routes; log every request."""
    t0 = time.monotonic()
    core = _core(request)
    if not request.path.startswith("/sim/") and request.path not in ("/health", "/metrics"):
        core.calls.append({"method": request.method, "path": request.path,
                           "query": request.query_string, "time": time.time()})
        del core.calls[:-1000]
    task = asyncio.current_task()
    tasks: set[asyncio.Task[Any]] = request.app[TASKS_KEY]
    if task is not None:
        tasks.add(task)
    try:
        resp = await handler(request)
    except web.HTTPNotFound:
        resp = web.json_response({"detail": "Not Found"}, status=404)
    except web.HTTPMethodNotAllowed:
        resp = web.json_response({"detail": "Method Not Allowed"}, status=405)
    finally:
        if task is not None:
            tasks.discard(task)
    if request.path != "/health":
        log(f'"{request.method} {request.path_qs}" {resp.status} {time.monotonic() - t0:.3f}s')
    return resp


async def _stamp(request: web.Request, response: web.StreamResponse) -> None:
    """Name this simulator on every response it prepares: answers, errors, 404s."""
    response.headers[SIM_MODEL_HEADER] = _core(request).s.name


# --------------------------------------------------------------------------- plain routes


async def health(request: web.Request) -> web.Response:
    core = _core(request)
    return web.Response(status=503 if core.dead or core.engine_failed else 200)


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": VLLM_VERSION})


async def ping(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def load(request: web.Request) -> web.Response:
    core = _core(request)
    return web.json_response({"server_load": len(core.requests) + core.waiting})


async def models(request: web.Request) -> web.Response:
    core = _core(request)
    created = int(core.started_at)
    data = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": core.s.model,
            "parent": None,
            "max_model_len": core.s.max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{abs(hash((name, created))) % (1 << 64):016x}",
                    "object": "model_permission",
                    "created": created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        for name in core.s.served_names
    ]
    return web.json_response({"object": "list", "data": data})


def _tokens_of(text: str) -> list[int]:
    return [(sum(w.encode()) * 31 + len(w)) % 30000 + 100 for w in text.split()]


async def tokenize(request: web.Request) -> web.Response:
    core = _core(request)
    body, err = await _json_body(request)
    if err is not None:
        return err
    text = body.get("prompt")
    if text is None and isinstance(body.get("messages"), list):
        text = _chat_prompt(body["messages"]) or ""
    if not isinstance(text, str):
        return _missing("prompt")
    tokens = _tokens_of(text)
    return web.json_response({"count": len(tokens), "max_model_len": core.s.max_model_len,
                              "tokens": tokens, "token_strs": None})


async def detokenize(request: web.Request) -> web.Response:
    body, err = await _json_body(request)
    if err is not None:
        return err
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        return _missing("tokens")
    return web.json_response({"prompt": _token_text(tokens)})


async def metrics(request: web.Request) -> web.Response:
    core = _core(request)
    base = f'engine="0",model_name="{core.s.name}"'
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{base}}} {float(len(core.requests))}",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{base}}} {float(core.waiting)}",
        "# HELP vllm:engine_sleep_state Engine sleep state.",
        "# TYPE vllm:engine_sleep_state gauge",
    ]
    for st in ("awake", "weights_offloaded", "discard_all"):
        value = 1.0 if core.sleep_state == st else 0.0
        lines.append(f'vllm:engine_sleep_state{{{base},sleep_state="{st}"}} {value}')
    lines += [
        "# HELP vllm:sleep_mode_operation_duration_seconds Duration of sleep mode operations.",
        "# TYPE vllm:sleep_mode_operation_duration_seconds summary",
    ]
    for op, durations in core.op_durations.items():
        lab = f'{base},operation="{op}"'
        lines.append(f"vllm:sleep_mode_operation_duration_seconds_count{{{lab}}} {float(len(durations))}")
        lines.append(f"vllm:sleep_mode_operation_duration_seconds_sum{{{lab}}} {float(sum(durations))}")
    lines += [
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
        f"vllm:request_success_total{{{base}}} {float(core.served)}",
        "# HELP llmux_sim_gpu_reserved_mb GPU memory this simulator holds in the ledger.",
        "# TYPE llmux_sim_gpu_reserved_mb gauge",
        f"llmux_sim_gpu_reserved_mb{{{base}}} {float(core.gpu_reserved_mb)}",
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain",
                        charset="utf-8")


# --------------------------------------------------------------------------- inference


async def _json_body(request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return {}, bad_request(
            f"[{{'type': 'json_invalid', 'loc': ('body', {exc.pos if hasattr(exc, 'pos') else 0}), "
            f"'msg': 'JSON decode error', 'input': {{}}, 'ctx': {{'error': {str(exc)!r}}}}}]"
        )
    if not isinstance(body, dict):
        return {}, bad_request(
            "[{'type': 'model_attributes_type', 'loc': ('body',), "
            "'msg': 'Input should be a valid dictionary or object to extract fields from'}]"
        )
    return body, None


async def _inference_request(request: web.Request
                             ) -> tuple[SimCore, dict[str, Any], str, web.Response | None]:
    """The core, JSON body and model name of an inference request, or vLLM's error answer.

    Shared by completions, chat and embeddings so that all three reject a bad body or an unknown
    model the same way (and in the same order) as vLLM does.
    """
    core = _core(request)
    body, err = await _json_body(request)
    if err is not None:
        return core, body, "", err
    model, err = _check_model(core, body)
    return core, body, model, err


def _token_text(ids: list[Any]) -> str:
    """The text the simulator reads for a list of token ids (what /detokenize answers)."""
    return " ".join(f"t{t}" for t in ids)


def _texts(body: dict[str, Any], field: str, *, batches_of_ids: bool = False
           ) -> tuple[list[str], web.Response | None]:
    """The `prompt` or `input` (`field`) of a request as a list of texts, or vLLM's 400.

    A string, a list of strings, or a list of token ids (one text); embeddings also take a list
    of token-id lists (`batches_of_ids`, one text each).
    """
    value = body.get(field)
    if value is None:
        return [], _missing(field)
    if isinstance(value, str):
        return [value], None
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value):
            return list(value), None
        if all(isinstance(x, int) for x in value):
            return [_token_text(value)], None
        if batches_of_ids and all(isinstance(x, list) for x in value):
            return [_token_text(x) for x in value], None
    ids = "token ids or lists of token ids" if batches_of_ids else "a list of token ids"
    return [], bad_request(f"{field} must be a string, a list of strings or {ids}", field)


def _missing(field: str) -> web.Response:
    return bad_request(
        f"[{{'type': 'missing', 'loc': ('body', '{field}'), 'msg': 'Field required', 'input': {{}}}}]"
    )


def _check_model(core: SimCore, body: dict[str, Any]) -> tuple[str, web.Response | None]:
    model = body.get("model")
    if model is None:
        return core.s.name, None
    if model not in core.s.served_names:
        return model, error_response(
            404,
            f"The model `{model}` does not exist. Valid aliases: {', '.join(core.s.served_names)}.",
            "NotFoundError",
            "model",
        )
    return model, None


def _common_params(body: dict[str, Any]) -> tuple[dict[str, Any], web.Response | None]:
    out: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < 0):
        return out, bad_request(f"max_tokens must be a non-negative integer, got {max_tokens!r}",
                                "max_tokens")
    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if not isinstance(temperature, (int, float)) or temperature < 0:
        return out, bad_request(f"temperature must be a non-negative number, got {temperature!r}",
                                "temperature")
    seed = body.get("seed")
    if seed is not None and not isinstance(seed, int):
        return out, bad_request(f"seed must be an integer, got {seed!r}", "seed")
    out.update(max_tokens=max_tokens, temperature=float(temperature), seed=seed,
               stream=bool(body.get("stream", False)),
               include_usage=bool((body.get("stream_options") or {}).get("include_usage", False)))
    return out, None


def _usage(prompt: str, completion_tokens: int) -> dict[str, Any]:
    p = max(1, len(prompt.split()))
    return {"prompt_tokens": p, "total_tokens": p + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None}


def _context_check(core: SimCore, prompt: str, max_tokens: int | None) -> web.Response | None:
    p = max(1, len(prompt.split()))
    want = p + (max_tokens or 0)
    if want > core.s.max_model_len:
        return bad_request(
            f"This model's maximum context length is {core.s.max_model_len} tokens. However, you "
            f"requested {want} tokens ({p} in the messages, {max_tokens or 0} in the completion). "
            "Please reduce the length of the messages or completion.",
            "max_tokens",
        )
    return None


def _chat_prompt(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return None
    parts = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            return None
        content = m.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        parts.append(f"{m['role']}: {content or ''}")
    return "\n".join(parts)


async def _collect(core: SimCore, req: GenRequest) -> str:
    async with aclosing(core.generate(req)) as tokens:
        return "".join([tok async for tok in tokens])


def _watch_client(request: web.Request, *reqs: GenRequest) -> None:
    """Let the engine abort requests whose client hung up, as vLLM does."""
    def alive() -> bool:
        transport = request.transport
        return transport is not None and not transport.is_closing()
    for req in reqs:
        req.client_alive = alive


def _unavailable(core: SimCore) -> web.Response | None:
    """The answer to an inference request that cannot be served at all."""
    if core.engine_failed:
        return error_response(500, "EngineCore encountered an issue. See stack trace (above) for "
                                   "the root cause. (fault engine_dead)", "InternalServerError")
    if core.s.legacy_503 and core.is_sleeping:
        return error_response(503, "Model is sleeping", "ServiceUnavailableError")
    return None


async def completions(request: web.Request) -> web.StreamResponse:
    core, body, model, err = await _inference_request(request)
    if err is not None:
        return err
    prompts, err = _texts(body, "prompt")
    if err is not None:
        return err
    params, err = _common_params(body)
    if err is not None:
        return err
    max_tokens = 16 if params["max_tokens"] is None else params["max_tokens"]
    for p in prompts:
        err = _context_check(core, p, max_tokens)
        if err is not None:
            return err
    err = _unavailable(core)
    if err is not None:
        return err
    reqs = [core.new_request("cmpl", p, max_tokens, params["temperature"], params["seed"])
            for p in prompts]
    _watch_client(request, *reqs)
    rid, created = reqs[0].rid, int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": model}

    if params["stream"]:
        def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
            return {**head, "choices": [{"index": index, "text": text, "logprobs": None,
                                         "finish_reason": finish, "stop_reason": None}],
                    "system_fingerprint": _fingerprint(core)}

        async def events(resp: web.StreamResponse) -> int:
            total = 0
            for i, req in enumerate(reqs):
                async with aclosing(core.generate(req)) as tokens:
                    async for tok in tokens:
                        await _send(resp, chunk(i, tok, None))
                        total += 1
                await _send(resp, chunk(i, "", req.finish_reason))
            if params["include_usage"]:
                await _send(resp, {**head, "choices": [], "usage": _usage("\n".join(prompts), total)})
            return total

        return await _stream(request, core, events)

    choices = []
    total = 0
    for i, req in enumerate(reqs):
        text = await _collect(core, req)
        total += req.produced
        choices.append({"index": i, "text": text, "logprobs": None,
                        "finish_reason": req.finish_reason, "stop_reason": None,
                        "token_ids": None, "prompt_logprobs": None, "prompt_token_ids": None,
                        "routed_experts": None})
    return web.json_response({
        **head, "choices": choices, "service_tier": None,
        "system_fingerprint": _fingerprint(core), "usage": _usage("\n".join(prompts), total),
        "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
    }, headers=_checksum_headers(reqs))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    core, body, model, err = await _inference_request(request)
    if err is not None:
        return err
    if "messages" not in body:
        return _missing("messages")
    prompt = _chat_prompt(body["messages"])
    if prompt is None:
        return bad_request("messages must be a non-empty list of {role, content} objects", "messages")
    params, err = _common_params(body)
    if err is not None:
        return err
    err = _context_check(core, prompt, params["max_tokens"])
    if err is not None:
        return err
    err = _unavailable(core)
    if err is not None:
        return err
    req = core.new_request("chatcmpl", prompt, params["max_tokens"], params["temperature"],
                           params["seed"])
    _watch_client(request, req)
    head = {"id": req.rid, "created": int(time.time()), "model": model}

    if params["stream"]:
        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": finish, "stop_reason": None}],
                    "system_fingerprint": _fingerprint(core)}

        async def events(resp: web.StreamResponse) -> int:
            await _send(resp, chunk({"role": "assistant", "content": ""}, None))
            async with aclosing(core.generate(req)) as tokens:
                async for tok in tokens:
                    await _send(resp, chunk({"content": tok}, None))
            await _send(resp, chunk({}, req.finish_reason))
            if params["include_usage"]:
                await _send(resp, {**head, "object": "chat.completion.chunk", "choices": [],
                                   "usage": _usage(prompt, req.produced)})
            return req.produced

        return await _stream(request, core, events)

    text = await _collect(core, req)
    return web.json_response({
        **head, "object": "chat.completion",
        "choices": [{"index": 0,
                     "message": {"role": "assistant", "content": text, "refusal": None,
                                 "annotations": None, "audio": None, "function_call": None,
                                 "tool_calls": [], "reasoning_content": None},
                     "logprobs": None, "finish_reason": req.finish_reason, "stop_reason": None,
                     "token_ids": None}],
        "service_tier": None, "system_fingerprint": _fingerprint(core),
        "usage": _usage(prompt, req.produced), "prompt_logprobs": None,
        "prompt_token_ids": None, "kv_transfer_params": None,
    }, headers=_checksum_headers([req]))


def _checksum_headers(reqs: list[GenRequest]) -> dict[str, str]:
    """The weights checksum the answer was computed with (--device only)."""
    sums = sorted({r.checksum for r in reqs if r.checksum})
    return {SIM_CHECKSUM_HEADER: ",".join(sums)} if sums else {}


async def _send(resp: web.StreamResponse, payload: dict[str, Any]) -> None:
    await resp.write(b"data: " + json.dumps(payload).encode() + b"\n\n")


async def _stream(request: web.Request, core: SimCore,
                  events: Callable[[web.StreamResponse], Awaitable[int]]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    crash = core.take_fault("crash_mid_stream")
    if crash is not None:
        original = resp.write
        sent = 0

        async def crashing_write(data: bytes) -> None:
            nonlocal sent
            sent += 1
            if sent > 2:
                log("fault crash_mid_stream: exiting in the middle of a stream")
                os._exit(1)
            await original(data)

        resp.write = crashing_write  # type: ignore[method-assign]
    try:
        await events(resp)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except (ConnectionResetError, ConnectionError):
        log("client went away mid-stream")
    return resp


async def embeddings(request: web.Request) -> web.Response:
    core, body, model, err = await _inference_request(request)
    if err is not None:
        return err
    texts, err = _texts(body, "input", batches_of_ids=True)
    if err is not None:
        return err
    # pass through the scheduler, so an embedding request is held while asleep
    err = _unavailable(core)
    if err is not None:
        return err
    req = core.new_request("embd", "\n".join(texts), 1, 0.0, None)
    _watch_client(request, req)
    await _collect(core, req)
    data = [{"index": i, "object": "embedding", "embedding": core.embedding(t, req.garbage)}
            for i, t in enumerate(texts)]
    tokens = sum(max(1, len(t.split())) for t in texts)
    return web.json_response({
        "id": req.rid, "object": "list", "created": int(time.time()), "model": model, "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                  "prompt_tokens_details": None},
    })


# --------------------------------------------------------------------------- dev routes


def _parse_int_query(request: web.Request, name: str, default: int, lo: int, hi: int
                     ) -> tuple[int, web.Response | None]:
    raw = request.query.get(name)
    if raw is None:
        return default, None
    loc = f"query.{name}"
    try:
        value = int(raw)
    except ValueError:
        return 0, validation_error(loc, "int_parsing",
                                   "Input should be a valid integer, unable to parse string as an integer", raw)
    if value > hi:
        return 0, validation_error(loc, "less_than_equal", f"Input should be less than or equal to {hi}", raw)
    if value < lo:
        return 0, validation_error(loc, "greater_than_equal",
                                   f"Input should be greater than or equal to {lo}", raw)
    return value, None


def _parse_mode(request: web.Request) -> tuple[str, web.Response | None]:
    mode = request.query.get("mode", "abort")
    if mode not in SLEEP_MODES:
        return mode, validation_error("query.mode", "literal_error",
                                      "Input should be 'abort', 'wait' or 'keep'", mode)
    return mode, None


async def sleep(request: web.Request) -> web.Response:
    core = _core(request)
    level, err = _parse_int_query(request, "level", 1, 0, 2)
    if err is not None:
        return err
    mode, err = _parse_mode(request)
    if err is not None:
        return err
    log(f"sleep level={level} mode={mode} (was {core.sleep_state}, sleeping={core.is_sleeping})")
    try:
        await core.sleep(level, mode)
    except SimError as exc:
        log(f"sleep failed: {exc.message}")
        return error_response(exc.status, exc.message, exc.type)
    log(f"asleep: level={core.sleep_level} tags={sorted(core.sleeping_tags)} "
        f"gpu_reserved_mb={core.gpu_reserved_mb}")
    return web.json_response({"status": "sleeping", "level": level})


async def wake_up(request: web.Request) -> web.Response:
    core = _core(request)
    tags = request.query.getall("tags", []) or None
    log(f"wake_up tags={tags}")
    try:
        await core.wake_up(tags)
    except SimError as exc:
        log(f"wake_up failed: {exc.message}")
        return error_response(exc.status, exc.message, exc.type)
    status = "sleeping" if core.is_sleeping else "awake"
    log(f"wake_up done: {status} tags_asleep={sorted(core.sleeping_tags)} "
        f"gpu_reserved_mb={core.gpu_reserved_mb}")
    return web.json_response({"status": status, "tags": tags})


async def release_kv_cache_memory(request: web.Request) -> web.Response:
    core = _core(request)
    log("release_kv_cache_memory")
    try:
        await core.release_kv_cache_memory()
    except SimError as exc:
        log(f"release_kv_cache_memory failed: {exc.message}")
        return error_response(exc.status, exc.message, exc.type)
    log(f"kv cache released: tags_asleep={sorted(core.sleeping_tags)} gpu_reserved_mb={core.gpu_reserved_mb}")
    return web.Response(status=200)


async def is_sleeping(request: web.Request) -> web.Response:
    return web.json_response({"is_sleeping": _core(request).is_sleeping})


async def pause(request: web.Request) -> web.Response:
    mode, err = _parse_mode(request)
    if err is not None:
        return err
    core = _core(request)
    if mode == "abort":
        for req in list(core.requests.values()):
            req.abort_evt.set()
    core.pause()
    return web.json_response({"status": "paused"})


async def resume(request: web.Request) -> web.Response:
    _core(request).resume()
    return web.json_response({"status": "resumed"})


async def is_paused(request: web.Request) -> web.Response:
    return web.json_response({"is_paused": _core(request).scheduler_paused})


async def reset_prefix_cache(request: web.Request) -> web.Response:
    core = _core(request)
    reset_running = request.query.get("reset_running_requests", "false").lower() == "true"
    success = reset_running or not core.requests
    if success:
        core.prefix_cache_resets += 1
    return web.json_response({"success": success})


async def empty_ok(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def collective_rpc(request: web.Request) -> web.Response:
    core = _core(request)
    body, err = await _json_body(request)
    if err is not None:
        return err
    method = body.get("method")
    if not method:
        return bad_request("Missing 'method' in request body")
    log(f"collective_rpc method={method}")
    try:
        results = await core.collective_rpc(str(method))
    except SimError as exc:
        log(f"collective_rpc {method} failed: {exc.message}")
        return error_response(exc.status, exc.message, exc.type)
    if results is None:
        return web.Response(status=200)
    return web.json_response({"results": results})


async def server_info(request: web.Request) -> web.Response:
    core = _core(request)
    return web.json_response({
        "vllm_config": {"model": core.s.model, "served_model_name": core.s.served_names,
                        "max_model_len": core.s.max_model_len,
                        "tensor_parallel_size": core.s.tp,
                        "enable_sleep_mode": core.s.enable_sleep_mode},
        "vllm_env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
        "system_env": {"platform": core.s.platform, "simulator": "llmux-vllm-sim",
                       "pid": os.getpid()},
    })


# --------------------------------------------------------------------------- sim routes


async def sim_fault(request: web.Request) -> web.Response:
    core = _core(request)
    body, err = await _json_body(request)
    if err is not None:
        return err
    kind = body.get("kind")
    if not isinstance(kind, str):
        return bad_request("give the fault as {\"kind\": ..., \"count\": N, \"seconds\": S}", "kind")
    try:
        fault = core.add_fault(kind, body.get("count"), body.get("seconds"))
    except SimError as exc:
        return error_response(exc.status, exc.message, exc.type, "kind")
    log(f"fault armed: {kind} count={fault.count} seconds={fault.seconds}")
    if kind == "crash":
        asyncio.get_running_loop().call_later(0.05, _crash_now)
    return web.json_response({"kind": kind, "count": fault.count, "seconds": fault.seconds})


def _crash_now() -> None:
    log("fault crash: exiting now")
    os._exit(1)


async def sim_fault_clear(request: web.Request) -> web.Response:
    core = _core(request)
    core.clear_fault(request.query.get("kind"))
    return web.json_response({"faults": list(core.faults)})


async def sim_state(request: web.Request) -> web.Response:
    return web.json_response(_core(request).state())


# --------------------------------------------------------------------------- app and main


def build_app(core: SimCore) -> web.Application:
    app = web.Application(middlewares=[vllm_errors], client_max_size=64 << 20)
    app[CORE_KEY] = core
    app[TASKS_KEY] = set()
    app.on_response_prepare.append(_stamp)
    r = app.router
    r.add_get("/health", health)
    r.add_get("/version", version)
    r.add_route("*", "/ping", ping)
    r.add_get("/load", load)
    r.add_get("/v1/models", models)
    r.add_post("/tokenize", tokenize)
    r.add_post("/detokenize", detokenize)
    r.add_get("/metrics", metrics)
    r.add_post("/v1/completions", completions)
    r.add_post("/v1/chat/completions", chat_completions)
    r.add_post("/v1/embeddings", embeddings)
    if core.s.dev_mode:
        r.add_post("/sleep", sleep)
        r.add_post("/wake_up", wake_up)
        r.add_get("/is_sleeping", is_sleeping)
        r.add_post("/release_kv_cache_memory", release_kv_cache_memory)
        r.add_post("/pause", pause)
        r.add_post("/resume", resume)
        r.add_get("/is_paused", is_paused)
        r.add_post("/reset_prefix_cache", reset_prefix_cache)
        r.add_post("/reset_mm_cache", empty_ok)
        r.add_post("/reset_encoder_cache", empty_ok)
        r.add_post("/collective_rpc", collective_rpc)
        r.add_get("/server_info", server_info)
    r.add_post("/sim/fault", sim_fault)
    r.add_delete("/sim/fault", sim_fault_clear)
    r.add_get("/sim/state", sim_state)
    return app


async def serve(settings: SimSettings) -> int:
    """Load, bind, serve until SIGTERM/SIGINT; the process exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signame: str) -> None:
        if settings.term_hang and signame == "SIGTERM":
            log("SIGTERM ignored (LLMUX_SIM_TERM_HANG=1)")
            return
        log(f"{signame} received, shutting down")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)

    core = SimCore(settings)
    load_time = settings.load_time + core.consume_slow_start()
    log(f"loading model {settings.model} (load time {load_time:.1f}s, weights {settings.weights_mb} MB, "
        f"gpu {settings.gpu_mb} MB, tp {settings.tp})")
    if load_time > 0:
        try:
            await asyncio.wait_for(stop.wait(), timeout=load_time)
            return 0  # stopped while loading
        except asyncio.TimeoutError:
            pass
    try:
        await loop.run_in_executor(None, core.load)
    except GpuOutOfMemory as exc:
        print(f"torch.OutOfMemoryError: {exc} (llmux-vllm-sim: GPU ledger {settings.gpu_ledger} "
              f"cannot hold {settings.gpu_mb} MB; stop another model or raise its capacity)",
              file=sys.stderr, flush=True)
        return 1
    except DeviceOutOfMemory as exc:
        print(f"torch.OutOfMemoryError: {exc} (llmux-vllm-sim --device {settings.device}: weights "
              f"{settings.weights_mb} MiB plus the KV cache do not fit)", file=sys.stderr, flush=True)
        core.release_gpu()
        return 1
    except ValueError as exc:  # the KV cache cannot be sized (vLLM's own messages)
        print(f"ValueError: {exc}", file=sys.stderr, flush=True)
        core.release_gpu()
        return 1
    except OSError as exc:
        print(f"llmux-vllm-sim: cannot load the model (weights cache {settings.cache_dir}, "
              f"GPU ledger {settings.gpu_ledger}): {exc}", file=sys.stderr, flush=True)
        core.release_gpu()
        return 1

    app = build_app(core)
    workers = _spawn_workers(settings)
    core.worker_pids = [w.pid for w in workers]
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    # backlog 2048: uvicorn's default, so a burst of connections queues as it does before vLLM
    # (aiohttp's 128 overflows and resets connections; added by the stress room)
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True, backlog=2048)
    try:
        await site.start()
    except OSError as exc:
        print(f"llmux-vllm-sim: cannot listen on {settings.host}:{settings.port}: {exc}",
              file=sys.stderr, flush=True)
        core.release_gpu()
        _stop_workers(workers)
        await runner.cleanup()
        return 1
    port = settings.port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        port = server.sockets[0].getsockname()[1]
    log(f"model {settings.name} loaded (pid {os.getpid()}); served as {', '.join(settings.served_names)}")
    print(f"INFO:     Uvicorn running on http://{settings.host}:{port} (Press CTRL+C to quit)",
          flush=True)
    print("INFO:     Application startup complete.", flush=True)

    await stop.wait()
    if core.requests and settings.shutdown_timeout > 0:
        deadline = time.monotonic() + settings.shutdown_timeout
        while core.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    busy = bool(core.requests) or core.waiting > 0
    core.kill_engine()
    if server is not None:
        server.close()  # stop accepting; keep open connections
    if busy:
        log("Waiting for connections to close.")
        while not _connections_closed(runner):
            await asyncio.sleep(0.1)
    for task in list(app[TASKS_KEY]):
        task.cancel()  # handlers of a dead engine whose clients are gone
    core.release_gpu()
    _stop_workers(workers)
    await runner.cleanup()
    log("shutdown complete")
    return 0


_WORKER_CODE = (
    "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "while True:\n    time.sleep(3600)\n"
)


def _spawn_workers(settings: SimSettings) -> list[subprocess.Popen[bytes]]:
    """Idle children whose command line names them like vLLM's processes."""
    names = ["VLLM::EngineCore"] + [f"VLLM::Worker_TP{i}" for i in range(settings.tp)]
    return [
        subprocess.Popen([sys.executable, "-c", _WORKER_CODE, names[i % len(names)]],
                         stdin=subprocess.DEVNULL)
        for i in range(settings.workers)
    ]


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for w in workers:
        if w.poll() is None:
            w.terminate()
    for w in workers:
        try:
            w.wait(5)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait(5)


def _connections_closed(runner: web.AppRunner) -> bool:
    srv = runner.server
    conns = getattr(srv, "connections", None) if srv is not None else None
    if conns is None:
        conns = getattr(srv, "_connections", {}) if srv is not None else {}
    for proto in list(conns):
        transport = getattr(proto, "transport", None)
        if transport is not None and not transport.is_closing():
            return False
    return True


def _check_device(device: str) -> None:
    """Fail at once, in one line, when --device cannot work here."""
    torch = import_torch()
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"llmux-vllm-sim: --device cuda, but torch {torch.__version__} finds no CUDA device "
                         "(a CPU build, or no driver); use --device cpu")
    log(f"device {device}: weights and KV cache are torch tensors (torch {torch.__version__})")


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    log(f"vLLM API server version {VLLM_VERSION} (llmux-vllm-sim)")
    if settings.ignored_flags:
        log(f"ignoring vLLM flags: {' '.join(settings.ignored_flags)}")
    if settings.enable_sleep_mode and settings.platform == "cpu":
        print("ValueError: Sleep mode is not supported on current platform.", file=sys.stderr,
              flush=True)
        raise SystemExit(1)
    if settings.device is not None:
        _check_device(settings.device)
    if settings.dev_mode:
        log("SECURITY WARNING: Development endpoints are enabled! This should NOT be used in production!")
    raise SystemExit(asyncio.run(serve(settings)))


if __name__ == "__main__":
    main()
