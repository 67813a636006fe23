"""Start `llmux-vllm-sim` as a real subprocess for tests.

Import the fixtures into a test module (or conftest.py)::

    from sim_fixtures import sim_factory, sim_cache  # noqa: F401   (pytest puts tests/ on sys.path)

`sim_factory(name, env={...}, args=[...], dev_mode=True, device=None)` starts one
simulator on a free port (`--port 0`; the port is read from its "Uvicorn
running on" line) and returns a `SimProcess`; every simulator it started is
stopped (SIGKILL if SIGTERM is ignored) at the end of the test.
`mode_sim_factory` is the same factory once per way the simulator holds a model
(SIM_MODES): the JSON ledger, and real torch tensors on the CPU (`--device cpu`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from functools import partial
from typing import Any, Callable, Iterator

import pytest

from ports import free_port  # noqa: F401  (re-exported: tests import it from here)

READY_RE = re.compile(r"Uvicorn running on http://([^:\s]+):(\d+)")
START_TIMEOUT = 60.0  # generous: the machine is shared
#: the simulator's ways of holding a model: the JSON ledger (no torch) and real tensors
#: (`--device cpu`, marker torch: run in the PyPI venv, skipped where torch is absent)
SIM_MODES = [pytest.param(None, id="ledger"), pytest.param("cpu", id="torch-cpu", marks=pytest.mark.torch)]
#: a short greedy completion: the same text each time, so answers compare across sleep and faults
PROMPT = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}




class SimProcess:
    """One running simulator."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name = name
        self.argv = argv
        self.lines: list[str] = []
        self.port: int | None = None
        self._ready = threading.Event()
        self._line_added = threading.Condition()
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._line_added:
                self.lines.append(line.rstrip("\n"))
                m = READY_RE.search(line)
                if m and self.port is None:
                    self.port = int(m.group(2))
                    self._ready.set()
                self._line_added.notify_all()
        with self._line_added:
            self._line_added.notify_all()
        self._ready.set()  # EOF: wake waiters, they check the process

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base_url(self) -> str:
        assert self.port is not None, "simulator is not listening"
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> "SimProcess":
        if not self._ready.wait(timeout) or self.port is None:
            raise AssertionError(f"simulator {self.name} did not start:\n{self.output}")
        return self

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._line_added:
            while True:
                for line in self.lines:
                    if rx.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r} in:\n{self.output}")
                self._line_added.wait(min(left, 0.5))

    def wait_exit(self, timeout: float = START_TIMEOUT) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def terminate(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.wait_exit(timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.kill()

    def kill(self) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            return self.wait_exit(15)
        except subprocess.TimeoutExpired:
            return None

    # small synchronous HTTP helpers (async tests use aiohttp)
    def request(self, method: str, path: str, body: Any = None, timeout: float = 30.0,
                raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url(path), data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def json(self, method: str, path: str, body: Any = None, timeout: float = 30.0
             ) -> tuple[int, Any]:
        status, _, data = self.request(method, path, body, timeout)
        return status, (json.loads(data) if data.strip() else None)

    def answer(self) -> str:
        """The text of a 200 answer to `PROMPT` (an error answer fails the test)."""
        status, data = self.json("POST", "/v1/completions", PROMPT)
        assert status == 200, data
        return data["choices"][0]["text"]

    def state(self) -> dict[str, Any]:
        status, data = self.json("GET", "/sim/state")
        assert status == 200, data
        return data

    def fault(self, kind: str, count: int | None = None, seconds: float | None = None) -> None:
        body: dict[str, Any] = {"kind": kind}
        if count is not None:
            body["count"] = count
        if seconds is not None:
            body["seconds"] = seconds
        status, data = self.json("POST", "/sim/fault", body)
        assert status == 200, data

    def wait_state(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0
                   ) -> dict[str, Any]:
        """Poll /sim/state until `pred(state)`; event-like, no fixed sleeps."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.state()
            if pred(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"simulator state never matched; last: {st}")
            time.sleep(0.02)


def sim_env(cache: str, extra: dict[str, str] | None = None, dev_mode: bool = True
            ) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LLMUX_SIM_") and k != "VLLM_SERVER_DEV_MODE"}
    env.update({
        "LLMUX_SIM_CACHE": cache,
        "LLMUX_SIM_WEIGHTS_MB": "8",
        "LLMUX_SIM_TOKENS_PER_S": "2000",
        "PYTHONUNBUFFERED": "1",
    })
    if dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    env.update(extra or {})
    return env


SimFactory = Callable[..., SimProcess]


@pytest.fixture(scope="session")
def sim_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One weights cache per test session, so weight files are written once."""
    return str(tmp_path_factory.mktemp("llmux-sim-cache"))


@pytest.fixture
def sim_factory(sim_cache: str) -> Iterator[SimFactory]:
    started: list[SimProcess] = []

    def start(name: str = "alpha", *, env: dict[str, str] | None = None,
              args: list[str] | None = None, dev_mode: bool = True, port: int = 0,
              wait: bool = True, served_name: str | None = None, device: str | None = None) -> SimProcess:
        argv = [sys.executable, "-m", "llmuxd.sim.server", "serve", f"/models/{name}",
                "--served-model-name", served_name or name, "--port", str(port), *(args or [])]
        if device is not None:
            argv += ["--device", device]
        sim = SimProcess(name, argv, sim_env(sim_cache, env, dev_mode))
        started.append(sim)
        if wait:
            sim.wait_ready()
        return sim

    yield start
    for sim in started:
        sim.terminate(timeout=10)


@pytest.fixture(params=SIM_MODES)
def mode_sim_factory(request: pytest.FixtureRequest, sim_factory: SimFactory) -> SimFactory:  # noqa: F811
    """`sim_factory` in each of SIM_MODES: a test using it runs once per mode."""
    return partial(sim_factory, device=request.param)
