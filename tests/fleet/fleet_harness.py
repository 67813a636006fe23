"""A fleet on one machine: `llmuxd run` hosts on 127.0.0.2, .3, .4 … behind a real LiteLLM proxy.

Shared by tests/fleet/ and benchmarks/fleet.py. Each host is the stress suite's `Daemon`
(tests/stress/harness.py) with the same three simulated models and one GPU of its own (a
GPU ledger whose capacity holds one model awake), listening on its own loopback address.
The proxy is LiteLLM from PyPI in the venv `scripts/litellm-setup` builds, with this
checkout on its PYTHONPATH so that the hook it loads is the one under test.

Requests go through LiteLLM and are judged by the stress suite's rule (`Outcome.problems`):
the simulator stamps its identity on every answer (the `X-Sim-Model` header, which LiteLLM
relays as `llm_provider-x-sim-model`, and `system_fingerprint: llmux-sim:<model>`), so an
answer from another model is *misrouted*; no answer in time is *lost*. LiteLLM's
`x-litellm-model-api-base` header says which host served it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import aiohttp
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "stress"))

from daemon_process import stop_process, wait_healthy  # noqa: E402
from ports import free_port  # noqa: E402
from harness import (  # noqa: E402  (the stress suite's daemon, client rule and helpers)
    LOST_GRACE, REQUEST_TIMEOUT, REPO, Daemon, Outcome, Req, SimModel, backend_children, config_data,
    free_port, http, metric_sum, pid_alive, read_error_body, sse_events,
)

MODELS = ("alpha", "beta", "gamma")
#: one GPU per host: room for one of the three models awake (20 GB each)
GPU_MB = 24000
MODEL_MB = 20000
#: seconds LiteLLM may take to start (imports are heavy; the machine is shared)
PROXY_START_TIMEOUT = 240.0
#: what the proxy polls each host at, in the tests (the default is 1 s)
REFRESH_S = 0.25


# --------------------------------------------------------------------------- LiteLLM's venv


def litellm_cache() -> Path:
    """Where scripts/litellm-setup puts the venv (the same rule as the script)."""
    if os.environ.get("LLMUX_LITELLM_CACHE"):
        return Path(os.environ["LLMUX_LITELLM_CACHE"])
    if os.geteuid() == 0:
        return Path("/var/cache/llmux-litellm")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmux-litellm"


def litellm_bin() -> tuple[Optional[Path], str]:
    """(the `litellm` program, "") when the venv is ready, else (None, why not)."""
    cache = litellm_cache()
    exe = cache / "venv" / "bin" / "litellm"
    if not (cache / ".ready").is_file() or not exe.is_file():
        return None, f"no LiteLLM venv at {cache} (run scripts/litellm-setup; scripts/test does as root)"
    return exe, ""


def require_litellm() -> Path:
    """The `litellm` program; in a test without it: skip with the reason (a `fleet`
    test's skip fails as root or under CI: tests/skip_policy.py)."""
    import pytest

    exe, why = litellm_bin()
    if exe is None:
        pytest.skip(f"fleet tests need LiteLLM: {why}")
    return exe


# --------------------------------------------------------------------------- hosts


def sim_models() -> List[SimModel]:
    return [SimModel(m, eviction="offload+keep_running", gpu_mb=MODEL_MB, load_time=0.3,
                     sleep_time=0.1, wake_time=0.3, tokens_per_s=100.0) for m in MODELS]


class FleetHost:
    """One `llmuxd run` host on its own loopback address with its own GPU ledger."""

    def __init__(self, tmp: Path, ip: str, *, policy: Optional[Dict[str, Any]] = None):
        self.ip = ip
        self.tmp = tmp
        data = config_data(tmp, sim_models(), capacity_mb=GPU_MB, policy={"min_active": 1, **(policy or {})})
        self.port = free_port(ip)
        data["listen"] = f"{ip}:{self.port}"
        path = tmp / "llmux.yaml"
        path.write_text(yaml.safe_dump(data))
        self.daemon = Daemon(path, tmp / "llmuxd.log")
        self.children: List[int] = []

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    def start(self) -> "FleetHost":
        self.daemon.start()
        return self

    def kill(self) -> None:
        """The machine is lost: SIGKILL the daemon and every backend it ran."""
        assert self.daemon.proc is not None
        children = backend_children(self.daemon.pid)
        self.daemon.kill()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while any(pid_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        # the ledger keeps the dead processes' reservations: a new machine has an empty GPU
        ledger = self.daemon.ledger_path
        ledger.write_text(json.dumps({"capacity_mb": GPU_MB, "reservations": {}}))

    def stop(self) -> Optional[int]:
        return self.daemon.stop()

    def state(self) -> Dict[str, Any]:
        status, _, body = http(self.url + "/llmux/v1/state", timeout=10)
        assert status == 200, body
        return json.loads(body)

    def awake(self) -> List[str]:
        return sorted(n for n, m in self.state()["models"].items() if m["state"] == "awake")

    def switches(self) -> int:
        """Switches that woke a model (ok or failed) since the daemon started."""
        return int(metric_sum(self.daemon.metrics(), "llmux_switch_total{"))


def start_hosts(tmp: Path, count: int = 3, **kw: Any) -> List[FleetHost]:
    hosts = [FleetHost(tmp / f"host{i + 2}", f"127.0.0.{i + 2}", **kw) for i in range(count)]
    for h in hosts:
        h.tmp.mkdir(parents=True, exist_ok=True)
    started: List[FleetHost] = []
    try:
        for h in hosts:
            started.append(h.start())
    except BaseException:
        for h in started:
            h.stop()
        raise
    return hosts


# --------------------------------------------------------------------------- the proxy


def litellm_config(hosts: Sequence[FleetHost], *, llmux_routing: bool) -> Dict[str, Any]:
    """What `llmuxctl fleet --only litellm` prints for these hosts (see llmuxd/fleet/cli.py),
    without llmux's hook for LiteLLM's default routing."""
    from llmuxd.fleet.cli import HostReport, litellm_config as build
    from llmuxd.fleet.signal import HostSignal

    config = build([HostReport(h.url, HostSignal.from_json(h.state())) for h in hosts])
    if not llmux_routing:
        config.pop("litellm_settings")
    return config


class LiteLLMProxy:
    """`litellm --config FILE` on a free loopback port, its log in `tmp`."""

    def __init__(self, exe: Path, tmp: Path, config: Dict[str, Any], *, name: str = "litellm",
                 refresh_s: float = REFRESH_S):
        self.exe = exe
        self.tmp = tmp
        self.key = "sk-llmux-test-" + secrets.token_hex(16)
        self.port = free_port()
        self.config_path = tmp / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = tmp / f"{name}.log"
        self.refresh_s = refresh_s
        self.proc: Optional[subprocess.Popen] = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(
            LITELLM_MASTER_KEY=self.key,
            LITELLM_LOCAL_MODEL_COST_MAP="True",  # never fetch the cost map from the network
            LITELLM_TELEMETRY="False",
            NO_PROXY="*",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            LLMUX_FLEET_REFRESH_S=str(self.refresh_s),
            LLMUX_FLEET_STALE_S="5",
            LLMUX_FLEET_TIMEOUT_S="2",
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self) -> "LiteLLMProxy":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(self.exe), "--config", str(self.config_path), "--host", "127.0.0.1", "--port", str(self.port),
             "--num_workers", "1"],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env(), cwd=str(self.tmp))
        return self

    def wait_ready(self) -> "LiteLLMProxy":
        assert self.proc is not None
        wait_healthy(self.proc, self.base, lambda: self.log()[-4000:], PROXY_START_TIMEOUT,
                     path="/health/liveliness", name="LiteLLM")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=30)
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""


# --------------------------------------------------------------------------- requests


@dataclass
class FleetOutcome(Outcome):
    #: the host LiteLLM sent it to (x-litellm-model-api-base, without /v1)
    host: Optional[str] = None
    retries: int = 0


SIM_HEADER = "llm_provider-x-sim-model"
FINGERPRINT = "llmux-sim:"


def _stamp(data: Dict[str, Any], out: FleetOutcome) -> None:
    fp = data.get("system_fingerprint") or ""
    if fp.startswith(FINGERPRINT):
        out.stamps.add(fp[len(FINGERPRINT):])
    for choice in data.get("choices") or []:
        if choice.get("finish_reason"):
            out.finish_reason = choice["finish_reason"]


async def send(session: aiohttp.ClientSession, base: str, r: Req,
               deadline: float = REQUEST_TIMEOUT + LOST_GRACE) -> FleetOutcome:
    """One chat completion through the proxy, followed to its end."""
    out = FleetOutcome(r)
    t0 = out.started = time.monotonic()
    body = {"model": r.model, "messages": [{"role": "user", "content": r.prompt}],
            "max_tokens": r.max_tokens, "stream": r.stream, "temperature": 0}
    try:
        await asyncio.wait_for(_post(session, base, body, r, out), deadline)
    except asyncio.TimeoutError:
        out.lost = True
    except (aiohttp.ClientError, ConnectionError) as exc:
        out.stream_error = f"{type(exc).__name__}: {exc}"
        out.lost = out.status is None
    out.elapsed = time.monotonic() - t0
    return out


async def _post(session: aiohttp.ClientSession, base: str, body: Dict[str, Any], r: Req, out: FleetOutcome) -> None:
    async with session.post(base + "/v1/chat/completions", json=body) as resp:
        out.status = resp.status
        if resp.headers.get(SIM_HEADER):
            out.stamps.add(resp.headers[SIM_HEADER])
        api_base = resp.headers.get("x-litellm-model-api-base")
        out.host = api_base[: -len("/v1")] if api_base and api_base.endswith("/v1") else api_base
        out.retries = int(resp.headers.get("x-litellm-attempted-retries") or 0)
        if resp.status != 200:
            await read_error_body(resp, out)
            return
        if not r.stream:
            _stamp(await resp.json(), out)
            return
        async for event in sse_events(resp, out):
            _stamp(event, out)


async def run_clients(base: str, key: str, per_client: Sequence[Sequence[Req]], *,
                      stop: Optional[asyncio.Event] = None) -> List[FleetOutcome]:
    """Each client (its own connection pool) sends its requests one after another; all
    clients run at once. `stop` ends every client after its current request."""
    outcomes: List[FleetOutcome] = []

    async def client(reqs: Sequence[Req]) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, headers={"Authorization": f"Bearer {key}"},
                                         timeout=aiohttp.ClientTimeout(total=None)) as session:
            for r in reqs:
                if stop is not None and stop.is_set():
                    return
                outcomes.append(await send(session, base, r))

    await asyncio.gather(*(client(reqs) for reqs in per_client))
    return outcomes


def problems(outcomes: Iterable[Outcome], allowed: frozenset = frozenset({200})) -> List[str]:
    found: List[str] = []
    for o in outcomes:
        found.extend(o.problems(allowed))
    return found


def hosts_by_model(outcomes: Iterable[FleetOutcome]) -> Dict[str, Dict[str, int]]:
    """model -> {host: answers it gave}."""
    seen: Dict[str, Dict[str, int]] = {}
    for o in outcomes:
        if o.status == 200 and o.host:
            per = seen.setdefault(o.req.model, {})
            per[o.host] = per.get(o.host, 0) + 1
    return seen
