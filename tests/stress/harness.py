"""The stress harness: a real `llmuxd run` on simulator backends, a load
generator, and an invariant watcher that runs for the whole scenario.

Why a separate harness (and not test_e2e's): the stress suite's pass rule is
stronger than "all 200". Every request is followed to its end and judged:

- *lost*: no answer before `request_timeout` plus a grace (I3: never a hang);
- *misrouted*: an answer of any status that carries another model's
  simulator stamp (the `X-Sim-Model` header, which the simulator puts on its
  errors too; the body's `model`; every SSE chunk's `model`), or a 200 with
  no stamp at all. A backend's 404 "model does not exist" is how a request
  sent to the wrong backend usually shows;
- *cut*: a 200 that a sleep aborted (`finish_reason: abort`), a stream without
  `[DONE]`, or output that is garbage (an L2 wake without `reload_weights`);
- *unexpected*: a status the scenario does not allow, or an error that is not
  in OpenAI's envelope.

The watcher polls, while the load runs, the GPU ledger (capacity never
exceeded, never more awake models than the group admits: I1), the daemon's
`/v1/models` (never two models awake in one group), and each simulator's
`/metrics` (a request waiting inside a sleeping engine was forwarded to a
model that is not ready: I2). After the load, leases must come back
(`in_flight` and `queue_depth` zero: I4) and `/metrics` must have counted
every request once (nothing lost inside the daemon).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

import aiohttp
import yaml

from llmuxd.sim.ledger import GpuLedger
from llmuxd.sim.server import SIM_MODEL_HEADER

from daemon_process import daemon_env, stop_process, wait_healthy  # noqa: E402  (tests/ is on sys.path)
from ports import free_port  # noqa: E402,F401  (re-exported to the stress tests)

BIN = Path(sys.executable).parent
#: the source tree under test: the daemon and its backends import llmuxd from here
REPO = Path(__file__).resolve().parents[2]
SIM = str(BIN / "llmux-vllm-sim")
#: seconds for the daemon to answer /health (the machine is shared: generous)
START_TIMEOUT = 90.0
#: the daemon's policy.request_timeout in stress configs
REQUEST_TIMEOUT = 60.0
#: what a client waits beyond request_timeout before calling a request lost
LOST_GRACE = 45.0
#: seconds for leases and queues to come back to zero after a scenario
SETTLE_TIMEOUT = 60.0
#: what a sleeping simulator keeps on the "GPU" (LLMUX_SIM_GPU_RESIDUE_MB)
RESIDUE_MB = 500
GARBAGE_MARK = "\ufffdgarbage"
#: seconds between two GPU-ledger samples of the invariant watcher
WATCH_INTERVAL = 0.1
#: the share of one-sample-per-interval that `check` asks of the watcher (the
#: rest is scheduling noise on two shared cores)
WATCH_SHARE = 0.5
#: statuses llmux may answer with in OpenAI's envelope (DESIGN.md I3)
ERROR_STATUSES = {400, 404, 408, 413, 429, 502, 503, 504}




# --------------------------------------------------------------------------- config


@dataclass
class SimModel:
    """One simulated backend, scaled down for CI (sub-second sleep and wake)."""

    name: str
    eviction: str = "offload+keep_running"
    gpu_mb: int = 20000
    load_time: float = 0.3
    sleep_time: float = 0.1  # per sleep level
    wake_time: float = 0.2  # per sleep level: an L2 wake takes twice as long
    tokens_per_s: float = 100.0
    startup_timeout: float = 60.0
    command: list[str] | None = None  # default: the simulator
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # more model keys (gpu_memory_gib, ...)

    def to_config(self, ledger: Path, cache: str) -> dict[str, Any]:
        self.port = self.port or free_port()
        return {
            "model_path": f"org/{self.name}-sim",
            "command": self.command or [SIM, "serve"],
            "port": self.port,
            "eviction": self.eviction,
            "startup_timeout": self.startup_timeout,
            "env": {
                "LLMUX_SIM_LOAD_TIME": str(self.load_time),
                "LLMUX_SIM_SLEEP_TIME": str(self.sleep_time),
                "LLMUX_SIM_WAKE_TIME": str(self.wake_time),
                "LLMUX_SIM_TOKENS_PER_S": str(self.tokens_per_s),
                "LLMUX_SIM_GPU_LEDGER": str(ledger),
                "LLMUX_SIM_GPU_MB": str(self.gpu_mb),
                "LLMUX_SIM_GPU_RESIDUE_MB": str(RESIDUE_MB),
                "LLMUX_SIM_WEIGHTS_MB": "4",
                "LLMUX_SIM_CACHE": cache,
                "PYTHONUNBUFFERED": "1",
                **self.env,
            },
            **self.extra,
        }


def write_config(
    tmp: Path,
    models: Iterable[SimModel],
    *,
    capacity_mb: int = 81920,
    policy: dict[str, Any] | None = None,
    **top: Any,
) -> Path:
    """A YAML config for `models`, with a fresh GPU ledger of `capacity_mb`
    (big enough for every model awake at once, so only the switcher's
    discipline keeps one awake; the watcher checks that discipline)."""
    data = config_data(tmp, models, capacity_mb=capacity_mb, policy=policy, **top)
    path = tmp / "llmux.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def config_data(
    tmp: Path,
    models: Iterable[SimModel],
    *,
    capacity_mb: int = 81920,
    policy: dict[str, Any] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """What `write_config` writes, as a dict; the GPU ledger and the
    simulators' cache live under `tmp` (the simulators find the ledger
    through their model's `env`, wherever the daemon runs)."""
    tmp.mkdir(parents=True, exist_ok=True)
    ledger = tmp / "gpu.json"
    ledger.write_text(json.dumps({"capacity_mb": capacity_mb, "reservations": {}}))
    cache = str(tmp / "sim-cache")
    data = {
        "listen": f"127.0.0.1:{free_port()}",
        "max_body_bytes": 1024 * 1024,
        "state_dir": str(tmp / "state"),
        "gpu_probe": "ledger",  # verified eviction reads the simulators' ledger
        "policy": {
            "type": "fifo",
            "request_timeout": REQUEST_TIMEOUT,
            "min_active": 0,
            "drain_timeout": 30,
            "queue_limit": 5000,
            "failure_backoff": 0.2,
            "sleep_timeout": 20,
            "wake_timeout": 20,
            **(policy or {}),
        },
        "models": {m.name: m.to_config(ledger, cache) for m in models},
        **top,
    }
    return data


# --------------------------------------------------------------------------- daemon


def http(url: str, data: bytes | None = None, timeout: float = 30.0,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {},
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


class Daemon:
    """`llmuxd run` as a real process; its log goes to a file."""

    def __init__(self, config: Path, log: Path, *, log_level: str = "info",
                 launcher: list[str] | None = None):
        #: the command before `run --config ...`: the daemon's module, or a test hook's script
        self.launcher = launcher or [sys.executable, "-m", "llmuxd.daemon.main"]
        self.config_path = config
        self.config = yaml.safe_load(config.read_text())
        self.base = f"http://{self.config['listen']}"
        self.ledger_path = Path(next(iter(self.config["models"].values()))["env"]["LLMUX_SIM_GPU_LEDGER"])
        self.log_path = log
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    # -- process ---------------------------------------------------------------

    def start(self) -> "Daemon":
        self._log_file = open(self.log_path, "ab")
        argv = [*self.launcher, "run", "--config", str(self.config_path), "--log-level", self.log_level]
        self.proc = subprocess.Popen(
            argv, stdout=self._log_file, stderr=subprocess.STDOUT,
            env=daemon_env(), cwd=str(REPO),
        )
        return self.wait_ready()

    def wait_ready(self) -> "Daemon":
        assert self.proc is not None
        wait_healthy(self.proc, self.base, lambda: self.log()[-4000:], START_TIMEOUT)
        return self

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after a minute); the exit status."""
        if self.proc is None:
            return None
        stop_process(self.proc)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the daemon (not its backends: that is the point)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        if not self.log_path.is_file():  # e.g. /dev/full in the disk-full test
            return ""
        return self.log_path.read_text(errors="replace")

    # -- reading its state (sync; async tests use the Watcher) --------------------

    def models(self) -> dict[str, dict[str, Any]]:
        status, _, body = http(self.base + "/v1/models")
        assert status == 200, body
        return {m["id"]: m["llmux"] for m in json.loads(body)["data"]}

    def metrics(self) -> str:
        return http(self.base + "/metrics")[2].decode()

    def backend_url(self, model: str) -> str:
        return f"http://127.0.0.1:{self.config['models'][model]['port']}"

    def ledger(self) -> dict[str, Any]:
        return GpuLedger(str(self.ledger_path)).snapshot()

    def fault(self, model: str, kind: str, count: int | None = None, seconds: float | None = None) -> None:
        """Arm a fault in `model`'s simulator (POST /sim/fault)."""
        body: dict[str, Any] = {"kind": kind}
        if count is not None:
            body["count"] = count
        if seconds is not None:
            body["seconds"] = seconds
        status, _, data = http(self.backend_url(model) + "/sim/fault", json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
        assert status == 200, data

    def wait_for(self, what: str, predicate, timeout: float = SETTLE_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        models: dict = {}
        while time.monotonic() < deadline:
            models = self.models()
            if predicate(models):
                return models
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: {models}")


def metric_sum(text: str, prefix: str) -> float:
    """Sum of the samples whose line starts with `prefix` (name and labels)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


def requests_counted(text: str) -> float:
    return metric_sum(text, "llmux_requests_total{")


def backend_children(daemon_pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is `daemon_pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == daemon_pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --------------------------------------------------------------------------- requests


@dataclass
class Req:
    """One request to send."""

    model: str
    stream: bool = False
    max_tokens: int = 4
    prompt: str = "hi"
    kind: str = "chat"  # chat | completion | embedding
    abandon_after: float | None = None  # seconds of reading, then hang up
    client: str = "aiohttp"  # aiohttp | openai
    headers: dict[str, str] = field(default_factory=dict)  # extra request headers


@dataclass
class Outcome:
    req: Req
    status: int | None = None  # None: no answer (lost) or abandoned before one
    stamps: set[str] = field(default_factory=set)  # models named by the answer (any status)
    finish_reason: str | None = None
    done: bool = False  # a stream ended with [DONE]
    stream_error: str | None = None
    garbage: bool = False
    error_body: Any = None
    elapsed: float = 0.0
    lost: bool = False
    abandoned: bool = False
    started: float = 0.0  # time.monotonic() when it was sent
    #: a stream's body as read line by line: bytes read, its last line, and the
    #: reader (whose total_bytes also counts bytes received after the last whole line)
    lines_read: int = 0
    last_line: bytes = b""
    body_reader: Any = field(default=None, repr=False)
    #: a stream's first event: when it arrived (time.monotonic()), and an
    #: asyncio.Event send() sets then (or when it ends without one)
    first_event_at: float | None = None
    on_first_event: Any = field(default=None, repr=False)

    @property
    def ended_at_event_boundary(self) -> bool:
        """Whether a stream stopped right after a whole SSE event (its last
        line blank, no byte received after it): what an SSE client can use
        without seeing half an event."""
        received = self.body_reader.total_bytes if self.body_reader is not None else self.lines_read
        return received == self.lines_read and not self.last_line.strip()

    def problems(self, allowed: frozenset[int]) -> list[str]:
        """What is wrong with this answer, by the suite's pass rule (empty: fine)."""
        r = self.req
        what = f"{r.kind}{' stream' if r.stream else ''} for {r.model}"
        if self.lost:
            return [f"lost: {what} had no answer after {self.elapsed:.1f}s"]
        if self.stamps - {r.model}:
            # another model's backend answered, whatever it said: an error
            # from it (404 "does not exist", 400, 500...) is a misrouting too
            return [f"misrouted: {what} answered {self.status} by {sorted(self.stamps)}"]
        if self.abandoned:
            if self.status is not None and self.status != 200 and self.status not in allowed:
                return [f"unexpected: {what} answered {self.status} before it was abandoned"]
            return []
        out = []
        if self.status not in allowed:
            out.append(f"unexpected: {what} answered {self.status}: {str(self.error_body)[:200]}")
        if self.status == 200:
            if not self.stamps:
                out.append(f"misrouted: {what} answered 200 with no simulator stamp")
            if self.garbage:
                out.append(f"garbage: {what} gave garbage output (wake without reload_weights?)")
            if r.kind != "embedding" and self.finish_reason not in ("length", "stop"):
                out.append(f"cut: {what} finished with {self.finish_reason!r}")
            if r.stream and not self.done:
                out.append(f"cut: {what} ended without [DONE] ({self.stream_error})")
            if self.stream_error:
                out.append(f"cut: {what} carried an error event: {self.stream_error}")
        elif self.status is not None and not _openai_error(self.error_body):
            out.append(f"unexpected: {what} {self.status} is not an OpenAI error: {str(self.error_body)[:200]}")
        return out


def _openai_error(body: Any) -> bool:
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and isinstance(err.get("message"), str) and "type" in err


def _payload(r: Req) -> tuple[str, dict[str, Any]]:
    if r.kind == "completion":
        return "/v1/completions", {"model": r.model, "prompt": r.prompt, "max_tokens": r.max_tokens,
                                   "stream": r.stream, "temperature": 0}
    if r.kind == "embedding":
        return "/v1/embeddings", {"model": r.model, "input": r.prompt}
    return "/v1/chat/completions", {
        "model": r.model, "messages": [{"role": "user", "content": r.prompt}],
        "max_tokens": r.max_tokens, "stream": r.stream, "temperature": 0,
    }


def _text_of(choice: dict[str, Any]) -> str:
    if "text" in choice:
        return choice.get("text") or ""
    msg = choice.get("message") or choice.get("delta") or {}
    return msg.get("content") or ""


def _stamp(out: Outcome, headers: Any) -> None:
    """The simulator names itself on every answer, errors included (X-Sim-Model)."""
    if headers.get(SIM_MODEL_HEADER):
        out.stamps.add(headers[SIM_MODEL_HEADER])


async def send(session: aiohttp.ClientSession, base: str, r: Req, deadline: float,
               streaming: asyncio.Event | None = None) -> Outcome:
    """Send one request and follow it to its end (or to `deadline` seconds).
    `streaming` is set once a stream's first event arrived (or it ended without one)."""
    out = Outcome(r, on_first_event=streaming)
    t0 = out.started = time.monotonic()
    try:
        if r.client == "openai":
            await asyncio.wait_for(_send_openai(base, r, out), deadline)
        else:
            await asyncio.wait_for(_send_aiohttp(session, base, r, out), deadline)
    except asyncio.TimeoutError:
        out.lost = True
    except (aiohttp.ClientError, ConnectionError) as exc:
        if not out.abandoned:
            out.stream_error = f"{type(exc).__name__}: {exc}"
            if out.status is None:
                out.lost = True  # the connection broke before any answer
    finally:
        if streaming is not None:
            streaming.set()  # nobody waits for a first event that will not come
    out.elapsed = time.monotonic() - t0
    return out


async def read_error_body(resp: aiohttp.ClientResponse, out: Outcome) -> None:
    """Keep a non-200 answer's body (its JSON, else its first bytes) for the judge."""
    try:
        out.error_body = await resp.json(content_type=None)
    except ValueError:
        out.error_body = (await resp.read())[:300]


async def sse_events(resp: aiohttp.ClientResponse, out: Outcome) -> AsyncIterator[dict]:
    """The JSON events of an SSE response; `[DONE]` sets `out.done`, an error event
    `out.stream_error` (neither is yielded). Every line read is counted in `out`
    (`lines_read`, `last_line`: whether a cut stream ended at an event boundary)."""
    out.body_reader = resp.content
    async for raw in resp.content:
        out.lines_read += len(raw)
        out.last_line = raw
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            out.done = True
            continue
        event = json.loads(data)
        if out.first_event_at is None:
            out.first_event_at = time.monotonic()
            if out.on_first_event is not None:
                out.on_first_event.set()
        if "error" in event:
            out.stream_error = str(event["error"])[:200]
            continue
        yield event


async def _send_aiohttp(session: aiohttp.ClientSession, base: str, r: Req, out: Outcome) -> None:
    path, body = _payload(r)
    t0 = time.monotonic()
    async with session.post(base + path, json=body, headers=r.headers or None) as resp:
        out.status = resp.status
        _stamp(out, resp.headers)
        if resp.status != 200:
            await read_error_body(resp, out)
            return
        if not r.stream:
            data = await resp.json()
            if data.get("model"):
                out.stamps.add(data["model"])
            choice = (data.get("choices") or [{}])[0]
            out.finish_reason = choice.get("finish_reason")
            out.garbage = GARBAGE_MARK in _text_of(choice)
            return
        async for event in sse_events(resp, out):
            if r.abandon_after is not None and time.monotonic() - t0 >= r.abandon_after:
                out.abandoned = True
                resp.close()  # hang up mid-stream
                return
            if event.get("model"):
                out.stamps.add(event["model"])
            for choice in event.get("choices") or []:
                if choice.get("finish_reason"):
                    out.finish_reason = choice["finish_reason"]
                if GARBAGE_MARK in _text_of(choice):
                    out.garbage = True


async def _send_openai(base: str, r: Req, out: Outcome) -> None:
    """The same through the official client (what users run)."""
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0,
                                timeout=REQUEST_TIMEOUT + LOST_GRACE, default_headers=r.headers or None)
    try:
        messages = [{"role": "user", "content": r.prompt}]
        if r.stream:
            stream = await client.chat.completions.create(
                model=r.model, messages=messages, max_tokens=r.max_tokens, stream=True, temperature=0)
            out.status = 200
            async for chunk in stream:
                out.stamps.add(chunk.model)
                for choice in chunk.choices:
                    if choice.finish_reason:
                        out.finish_reason = choice.finish_reason
                    if GARBAGE_MARK in (choice.delta.content or ""):
                        out.garbage = True
            out.done = True  # the client consumed [DONE] without error
        else:
            raw = await client.chat.completions.with_raw_response.create(
                model=r.model, messages=messages, max_tokens=r.max_tokens, temperature=0)
            out.status = raw.http_response.status_code
            _stamp(out, raw.headers)
            reply = raw.parse()
            out.stamps.add(reply.model)
            out.finish_reason = reply.choices[0].finish_reason
            out.garbage = GARBAGE_MARK in (reply.choices[0].message.content or "")
    except openai.APIStatusError as exc:
        out.status = exc.status_code
        _stamp(out, exc.response.headers)
        out.error_body = exc.body if isinstance(exc.body, dict) and "error" in exc.body else {"error": exc.body}
    except openai.APIConnectionError as exc:  # includes APITimeoutError
        if out.status is None:
            out.lost = True
        else:
            out.stream_error = f"{type(exc).__name__}: {exc}"
    finally:
        await client.close()


# --------------------------------------------------------------------------- the watcher


class Watcher:
    """Checks invariants continuously while a scenario runs.

    The GPU ledger (I1) is sampled every `interval` by a thread of its own,
    so a busy event loop (hundreds of clients parsing answers) cannot thin it
    out; its count is `samples`. The daemon's /v1/models (every 2 intervals)
    and the backends' /metrics (every 3) are async loops of their own, so a
    frozen backend's timeout does not delay the rest. A check that raises is a
    broken watcher, not a quiet one: `stop()` re-raises the exception, and
    `check()` wants about one ledger sample per interval of watched time.
    """

    def __init__(self, daemon: Daemon, session: aiohttp.ClientSession, *, max_awake: int = 1,
                 interval: float = WATCH_INTERVAL, budget: bool = False):
        self.daemon = daemon
        self.session = session
        self.max_awake = max_awake
        self.interval = interval
        self.violations: list[str] = []
        self.samples = 0  # GPU ledger checks done
        self.daemon_samples = 0
        self.backend_samples = 0
        self.max_in_flight = 0
        self.peak_awake = 0  # most models holding full GPU memory at once, in any group
        self.started_at: float | None = None
        self.stopped_at: float | None = None
        self._tasks: list[asyncio.Task] = []
        self._ledger_thread: threading.Thread | None = None
        self._ledger_error: BaseException | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # violations come from the thread and the loop
        self._groups = {name: m.get("gpu_group", "default") for name, m in daemon.config["models"].items()}
        self._ports = {name: m["port"] for name, m in daemon.config["models"].items()}
        #: budget mode (overlapped switches, issue #26): instead of counting awake models,
        #: what a group's models hold on the GPU, resident and in transit, must fit its
        #: budget_gib at every sample (each model's CUDA residue aside: the budget is
        #: the models' own memory). None: count awake models (max_awake)
        self._budget_mb = ({g: float(c["budget_gib"]) * 1024 for g, c in (daemon.config.get("groups") or {}).items()
                            if c and c.get("budget_gib")} if budget else None)
        self.peak_group_mb = 0  # the most a group held at one sample, in budget mode

    def _violation(self, text: str) -> None:
        with self._lock:
            if text not in self.violations:
                self.violations.append(text)

    @property
    def watched_s(self) -> float:
        """Seconds from start() to stop() (or to now, while it runs)."""
        if self.started_at is None:
            return 0.0
        return (self.stopped_at or time.monotonic()) - self.started_at

    def start(self) -> None:
        self.started_at, self.stopped_at = time.monotonic(), None
        self._stopping.clear()
        self._ledger_thread = threading.Thread(target=self._ledger_loop, name="watcher-ledger", daemon=True)
        self._ledger_thread.start()
        self._tasks = [
            asyncio.ensure_future(self._every(2 * self.interval, self.check_daemon, "daemon_samples")),
            asyncio.ensure_future(self._every(3 * self.interval, self.check_backends, "backend_samples")),
        ]

    async def stop(self) -> None:
        """Stop watching; re-raise what any of its loops died of."""
        tasks, self._tasks = self._tasks, []
        thread, self._ledger_thread = self._ledger_thread, None
        if self.started_at is not None and self.stopped_at is None:
            self.stopped_at = time.monotonic()
        self._stopping.set()
        for task in tasks:
            # one cancel is not enough: a client timeout firing at the same moment
            # (a frozen backend's /metrics) can swallow it, and the loop runs on
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=2)
        await asyncio.gather(*tasks, return_exceptions=True)
        if thread is not None:
            await asyncio.to_thread(thread.join)
        if self._ledger_error is not None:
            raise self._ledger_error
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()

    def _ledger_loop(self) -> None:
        """Every `interval` (no catch-up bursts after a slow read), until stop()."""
        try:
            while not self._stopping.is_set():
                began = time.monotonic()
                self.check_ledger_now()
                self.samples += 1
                self._stopping.wait(max(0.0, self.interval - (time.monotonic() - began)))
        except BaseException as exc:  # handed to stop(), which raises it
            self._ledger_error = exc

    async def _every(self, period: float, check: Any, counter: str) -> None:
        """Await `check` every `period` seconds (no catch-up bursts after a slow one)."""
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await check()
            setattr(self, counter, getattr(self, counter) + 1)
            await asyncio.sleep(max(0.0, period - (loop.time() - began)))

    async def check_ledger(self) -> None:
        await asyncio.to_thread(self.check_ledger_now)

    def check_ledger_now(self) -> None:
        """I1 on the GPU: used <= capacity, awake reservations <= budget per group."""
        try:
            snap = self.daemon.ledger()
        except (OSError, ValueError):
            return
        if snap["used_mb"] > snap["capacity_mb"]:
            self._violation(f"I1: GPU ledger over capacity: {snap['used_mb']} > {snap['capacity_mb']} MB")
        awake: dict[str, list[str]] = {}
        held: dict[str, dict[str, int]] = {}
        for pid, mb in snap["by_pid"].items():
            model = snap["models"].get(pid, "")
            if mb > RESIDUE_MB and model in self._groups:
                awake.setdefault(self._groups[model], []).append(model)
                held.setdefault(self._groups[model], {})[model] = mb - RESIDUE_MB
        if self._budget_mb is not None:
            self._check_budget(held, awake)
            return
        for group, names in awake.items():
            self.peak_awake = max(self.peak_awake, len(names))
            if len(names) > self.max_awake:
                self._violation(f"I1: {len(names)} models hold full GPU memory in group {group}: {sorted(names)}")

    def _check_budget(self, held: dict[str, dict[str, int]], awake: dict[str, list[str]]) -> None:
        for group, models in held.items():
            total = sum(models.values())
            self.peak_group_mb = max(self.peak_group_mb, total)
            self.peak_awake = max(self.peak_awake, len(awake.get(group, [])))
            budget = (self._budget_mb or {}).get(group)
            if budget is not None and total > budget:
                self._violation(f"budget: group {group} holds {total} MB resident and in transit "
                                f"{dict(sorted(models.items()))} > its budget {budget:.0f} MB")

    async def check_daemon(self) -> None:
        """I1 as the daemon tells it: models awake (or getting/leaving there) per group."""
        try:
            async with self.session.get(self.daemon.base + "/v1/models",
                                        timeout=aiohttp.ClientTimeout(total=10)) as resp:
                data = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return
        on_gpu: dict[str, list[str]] = {}
        flight = 0
        for m in data["data"]:
            st = m["llmux"]
            flight += int(st.get("in_flight") or 0)
            serving = ("active", "draining") if self._budget_mb is not None else ("active", "draining", "evicting", "waking")
            if st["state"] in serving:
                on_gpu.setdefault(st.get("group") or "default", []).append(m["id"])
        self.max_in_flight = max(self.max_in_flight, flight)
        for group, names in on_gpu.items():
            if len(names) > self.max_awake:
                self._violation(f"I1: daemon shows {sorted(names)} on the GPU at once in group {group}")

    async def check_backends(self) -> None:
        """I2: no request waits inside a sleeping engine (it was forwarded to a
        model that is not ready). All backends at once: a frozen one's
        timeout does not delay the others."""
        await asyncio.gather(*(self._check_backend(name, port) for name, port in self._ports.items()))

    async def _check_backend(self, name: str, port: int) -> None:
        try:
            async with self.session.get(f"http://127.0.0.1:{port}/metrics",
                                        timeout=aiohttp.ClientTimeout(total=1)) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return  # not started, stopped or frozen: nothing to judge
        awake = 'sleep_state="awake"} 1.0' in text
        waiting = metric_sum(text, "vllm:num_requests_waiting{")
        if not awake and waiting > 0:
            self._violation(f"I2: {int(waiting)} request(s) forwarded to {name} while it sleeps")


# --------------------------------------------------------------------------- scenarios


@dataclass
class Wave:
    """Requests fired together: `at` seconds after the scenario starts, or
    after the wave named `after` has been answered, or once the daemon shows
    `when` = (model, state)."""

    requests: list[Req]
    at: float = 0.0
    after: str | None = None
    when: tuple[str, str] | None = None
    name: str = ""


@dataclass
class Scenario:
    name: str
    waves: list[Wave]
    allowed: frozenset[int] = frozenset({200})
    note: str = ""


@dataclass
class Report:
    scenario: str
    outcomes: list[Outcome]
    violations: list[str]
    samples: int
    max_in_flight: int
    peak_awake: int = 0
    peak_group_mb: int = 0  # budget mode: the most one group held at a sample
    watched_s: float = 0.0  # how long the watcher ran
    interval: float = WATCH_INTERVAL  # its ledger period

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    def problems(self, allowed: frozenset[int]) -> list[str]:
        found = []
        for o in self.outcomes:
            found.extend(o.problems(allowed))
        return found

    def count(self, kind: str, allowed: frozenset[int]) -> int:
        return sum(1 for p in self.problems(allowed) if p.startswith(kind))

    def statuses(self) -> dict[Any, int]:
        out: dict[Any, int] = {}
        for o in self.outcomes:
            key = "lost" if o.lost else ("abandoned" if o.abandoned else o.status)
            out[key] = out.get(key, 0) + 1
        return out


def burst(model: str, n: int, **kw: Any) -> list[Req]:
    return [Req(model, **kw) for _ in range(n)]


def alternating(models: list[str], n: int, **kw: Any) -> list[Req]:
    return [Req(models[i % len(models)], **kw) for i in range(n)]


def mixed(models: list[str], n: int, seed: int, *, max_tokens: tuple[int, int] = (1, 12),
          stream_share: float = 0.3) -> list[Req]:
    """Random models, lengths and streaming, from a fixed seed (reproducible)."""
    rng = random.Random(seed)
    return [Req(rng.choice(models), stream=rng.random() < stream_share,
                max_tokens=rng.randint(*max_tokens)) for _ in range(n)]


async def run_scenario(daemon: Daemon, scenario: Scenario, *, max_awake: int = 1,
                       settle: bool = True, budget: bool = False) -> Report:
    """Fire the waves, watch invariants meanwhile, then check leases and counts."""
    deadline = REQUEST_TIMEOUT + LOST_GRACE
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        before = requests_counted(await _get_text(session, daemon.base + "/metrics"))
        watcher = Watcher(daemon, session, max_awake=max_awake, budget=budget)
        watcher.start()
        done: dict[str, asyncio.Event] = {w.name: asyncio.Event() for w in scenario.waves if w.name}
        outcomes: list[Outcome] = []
        t0 = time.monotonic()

        async def fire(wave: Wave) -> None:
            if wave.after:
                await done[wave.after].wait()
            if wave.when:
                await _wait_state(session, daemon, *wave.when)
            wait = wave.at - (time.monotonic() - t0) if not wave.after else wave.at
            if wait > 0:
                await asyncio.sleep(wait)
            results = await asyncio.gather(*(send(session, daemon.base, r, deadline) for r in wave.requests))
            outcomes.extend(results)
            if wave.name:
                done[wave.name].set()

        try:
            await asyncio.gather(*(fire(w) for w in scenario.waves))
            if settle:
                await _settle(session, daemon, watcher, before + len(outcomes))
        finally:
            await watcher.stop()
    return Report(scenario.name, outcomes, watcher.violations, watcher.samples, watcher.max_in_flight,
                  watcher.peak_awake, watcher.peak_group_mb, watcher.watched_s, watcher.interval)


async def _get_text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
        return await resp.text()


async def _wait_state(session: aiohttp.ClientSession, daemon: Daemon, model: str, state: str,
                      timeout: float = SETTLE_TIMEOUT) -> None:
    """Until the daemon shows `model` in `state` ("a|b": either)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        data = json.loads(await _get_text(session, daemon.base + "/v1/models"))
        if any(m["id"] == model and m["llmux"]["state"] in state.split("|") for m in data["data"]):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{model} never reached state {state}")


async def _settle(session: aiohttp.ClientSession, daemon: Daemon, watcher: Watcher,
                  expected_count: float) -> None:
    """I4 and nothing lost inside: leases back to zero, every request counted once."""
    end = time.monotonic() + SETTLE_TIMEOUT
    models: list[dict[str, Any]] = []
    counted = 0.0
    while time.monotonic() < end:
        data = json.loads(await _get_text(session, daemon.base + "/v1/models"))
        models = data["data"]
        idle = all(not m["llmux"].get("in_flight") and not m["llmux"].get("queue_depth") for m in models)
        counted = requests_counted(await _get_text(session, daemon.base + "/metrics"))
        if idle and counted >= expected_count:
            if counted > expected_count:
                watcher._violation(f"metrics counted {counted:.0f} requests, {expected_count:.0f} were sent")
            return
        await asyncio.sleep(0.05)
    leaks = {m["id"]: (m["llmux"].get("in_flight"), m["llmux"].get("queue_depth")) for m in models}
    watcher._violation(f"I4: leases or queues not back to zero after {SETTLE_TIMEOUT:.0f}s "
                       f"(in_flight, queue_depth): {leaks}; metrics counted {counted:.0f} "
                       f"of {expected_count:.0f} requests")


# --------------------------------------------------------------------------- the pass rule

#: totals over the run, for the terminal summary
TOTALS: dict[str, Any] = {"scenarios": 0, "sent": 0, "lost": 0, "misrouted": 0, "cut": 0,
                          "unexpected": 0, "violations": 0, "failed": []}


def record(report: Report, allowed: frozenset[int]) -> None:
    """Add one scenario's numbers to the run's summary."""
    TOTALS["scenarios"] += 1
    TOTALS["sent"] += report.sent
    for kind in ("lost", "misrouted", "cut", "unexpected"):
        TOTALS[kind] += report.count(kind, allowed)
    TOTALS["violations"] += len(report.violations)
    if report.problems(allowed) or report.violations:
        TOTALS["failed"].append(report.scenario)


def check(report: Report, allowed: frozenset[int] = frozenset({200})) -> None:
    """Record, then fail with every problem listed (the pass rule)."""
    record(report, allowed)
    problems = report.problems(allowed)
    head = f"{report.scenario}: {report.sent} requests, statuses {report.statuses()}"
    assert not problems and not report.violations, "\n".join(
        [head, *problems[:30], *(f"violation: {v}" for v in report.violations)])
    assert_watched(report)


def assert_watched(report: Report) -> None:
    """The watcher kept watching: about one GPU-ledger sample per interval of
    the time it ran (a stalled or dead one has next to none)."""
    due = report.watched_s / report.interval
    assert report.samples >= int(WATCH_SHARE * due), (
        f"{report.scenario}: the invariant watcher sampled the GPU ledger {report.samples} times in "
        f"{report.watched_s:.1f}s, where about one per {report.interval}s ({due:.0f}) was due: "
        f"it stalled, so the invariants went unwatched")


def start_daemon(tmp: Path, models: Iterable[SimModel], *, launcher: list[str] | None = None,
                 **config: Any) -> Daemon:
    path = write_config(tmp, list(models), **config)
    return Daemon(path, tmp / "llmuxd.log", launcher=launcher).start()


def stop_and_check(daemon: Daemon) -> None:
    """SIGTERM: exit 0, every backend gone, the GPU ledger empty."""
    children = backend_children(daemon.pid) if daemon.proc and daemon.proc.poll() is None else []
    rc = daemon.stop()
    assert rc == 0, f"llmuxd exited {rc}:\n{daemon.log()[-3000:]}"
    left = [p for p in children if pid_alive(p)]
    assert left == [], f"backends {left} outlived llmuxd"
    assert daemon.ledger()["used_mb"] == 0, f"GPU memory still held: {daemon.ledger()}"




# --------------------------------------------------------------------------- system mode


class SystemdDaemon(Daemon):
    """The same scenario target, as `llmuxd.service` under the project's test
    systemd (tests/sysd) in system mode: the scenarios, the watcher and the
    pass rule do not change, only how the daemon is started and stopped.

    `svc` is tests/test_service.py's `ServiceBed` (units and bus policy from
    the checkout, booted by its `boot_from_tree`). Why these choices:
    - the daemon is started and restarted with systemctl inside the test bed
      (Type=notify: `start` returns once it is ready);
    - its HTTP address is llmux.socket's port (systemd holds the listening
      socket, so connections made during a restart wait in its backlog);
    - the GPU ledger lives under `tmp` (the test bed shares /tmp with the
      host) and reaches the simulators, which run as transient units the
      daemon starts, through each model's `env` in the config;
    - its log is the journal of llmuxd.service.
    """

    def __init__(self, svc: Any, tmp: Path, models: Iterable[SimModel], **config: Any):
        self.svc = svc
        data = config_data(tmp, list(models), **config)
        data.update(listen=f"127.0.0.1:{svc.port}", state_dir=svc.state_dir, user=svc.user)
        path = svc.host_path(svc.config_file)
        path.write_text(yaml.safe_dump(data))
        super().__init__(path, tmp / "llmuxd.log")

    def start(self) -> "SystemdDaemon":
        self.svc.enable_now()
        return self.wait_ready()

    def restart(self) -> None:
        """`systemctl restart llmuxd.service`: returns once the new one is ready."""
        result = self.svc.systemctl("restart", "llmuxd.service")
        assert result.returncode == 0, f"systemctl restart failed: {result.stderr}\n{self.log()[-4000:]}"

    def wait_ready(self) -> "SystemdDaemon":
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.svc.prop("llmuxd.service", "ActiveState") == "active":
                try:
                    if http(self.base + "/health", timeout=5)[0] == 200:
                        return self
                except OSError:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"llmuxd.service not ready in {START_TIMEOUT}s:\n{self.log()[-4000:]}")

    def stop(self) -> int | None:
        """`systemctl stop llmuxd.service`; the exit status of its main process
        (0: it drained and exited cleanly). The backends stay running."""
        result = self.svc.systemctl("stop", "llmuxd.service")
        assert result.returncode == 0, f"systemctl stop failed: {result.stderr}"
        return int(self.svc.prop("llmuxd.service", "ExecMainStatus") or 0)

    def kill(self) -> None:
        self.svc.systemctl("kill", "--kill-who=main", "--signal=SIGKILL", "llmuxd.service")

    @property
    def pid(self) -> int:
        """MainPID of llmuxd.service (valid inside the test bed only)."""
        return int(self.svc.prop("llmuxd.service", "MainPID") or 0)

    def backend_pids(self) -> dict[str, int]:
        """MainPID of each model's unit (0: not running)."""
        return {name: self.svc.unit_pid(name) for name in self.config["models"]}

    def log(self) -> str:
        return self.svc.journal("-u", "llmuxd.service")[-20000:]

    def stop_backends(self) -> None:
        """Stop the models' units (system mode leaves them running on purpose)."""
        self.svc.systemctl("stop", "llmux-model-*.service")
