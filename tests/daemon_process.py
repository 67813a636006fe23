"""`llmuxd run` as a real process on `llmux-vllm-sim` backends, for the end-to-end tests.

Shared by tests/test_e2e.py (HTTP and the openai client) and tests/test_e2e_bus.py (the session
bus): free ports, a config of simulator models, the environment that puts this checkout first,
and a `DaemonProcess` that starts the daemon, waits for /health and stops it with SIGTERM.
Every wait is a bounded poll of the daemon's own state; nothing here measures a duration.
Import it as `from daemon_process import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from sim_fixtures import free_port

BIN = Path(sys.executable).parent
#: the checkout under test, first on the path of the daemon and its backends
#: (an installed llmux package elsewhere on sys.path must not stand in for it)
REPO = Path(__file__).resolve().parent.parent
SIM = str(BIN / "llmux-vllm-sim")
#: seconds for the daemon to answer /health or to exit (the machine is shared: generous)
START_TIMEOUT = 60.0
#: seconds any other wait (a state, a reply) may take
WAIT = 60.0

T = TypeVar("T")


def sim_model(path: str, ledger: Path, gpu_mb: int, **env: str) -> dict:
    """The config of one simulator model on a free port, sharing the GPU ledger `ledger`."""
    return {
        "model_path": path,
        "command": [SIM, "serve"],
        "port": free_port(),
        "eviction": "offload+keep_running",
        "env": {
            "LLMUX_SIM_LOAD_TIME": "0.2",
            "LLMUX_SIM_TOKENS_PER_S": "20",
            "LLMUX_SIM_GPU_LEDGER": str(ledger),
            "LLMUX_SIM_GPU_MB": str(gpu_mb),
            **env,
        },
    }


def write_config(tmp: Path, models: dict, **top) -> Path:
    """`tmp/llmux.yaml` listening on a free port, with a small queue and short backoffs."""
    data = {
        "listen": f"127.0.0.1:{free_port()}",
        "max_body_bytes": 1024 * 1024,
        "gpu_probe": "ledger",  # verified eviction reads the simulators' ledger (sim_model)
        "policy": {
            "type": "fifo",
            "request_timeout": 60,
            "min_active": 0,
            "drain_timeout": 120,
            "queue_limit": 2,
            "failure_backoff": 0.5,
        },
        "models": models,
        **top,
    }
    path = tmp / "llmux.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def http_json(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 30):
    """(status, headers, parsed JSON body) for a plain request."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read() or b"null")


def daemon_env() -> dict[str, str]:
    """This environment with the venv's tools first on PATH and this checkout first on
    PYTHONPATH, so that the daemon and the simulators it starts run the code under test."""
    return {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def wait_healthy(proc: subprocess.Popen, base: str, log: Callable[[], str],
                 timeout: float = START_TIMEOUT, *, path: str = "/health", name: str = "llmuxd") -> None:
    """Return once `base` + `path` answers 200; AssertionError with the log if the
    process (`name`) exits first or is not ready within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited {proc.returncode}:\n{log()}")
        try:
            with urllib.request.urlopen(base + path, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{name} not ready in {timeout}s:\n{log()}")


def stop_process(proc: subprocess.Popen, grace: float = 60) -> int:
    """SIGTERM, wait `grace` seconds, then SIGKILL; the exit status (which then says so)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_until(what: str, predicate: Callable[[], T], timeout: float = WAIT) -> T:
    """The first truthy value of `predicate()`, polled until `timeout` (then AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class DaemonProcess:
    """`llmuxd run --config CONFIG` in a subprocess, its output in `log`.

    `bus` adds `--bus BUS`; `env` replaces `daemon_env()`; `argv_prefix`, `pass_fds` and
    `listen` (where it really listens, when not the config's) serve socket activation.
    """

    def __init__(self, config: Path, log: Path, *, bus: str | None = None, env: dict | None = None,
                 argv_prefix: list[str] | None = None, listen: str | None = None,
                 pass_fds: tuple = ()):
        self.config = config
        self.listen = listen or yaml.safe_load(config.read_text())["listen"]
        self.base = f"http://{self.listen}"
        self.log_path = log
        self._log = open(log, "wb")
        argv = [sys.executable, "-m", "llmuxd.daemon.main", "run", "--config", str(config),
                *(["--bus", bus] if bus is not None else []), "--log-level", "debug"]
        self.proc = subprocess.Popen((argv_prefix or []) + argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     pass_fds=pass_fds, env=daemon_env() if env is None else env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self):
        """Self, once /health answers 200; AssertionError with the log if it exits or times out."""
        wait_healthy(self.proc, self.base, self.log)
        return self

    def wait_exit(self) -> int:
        """The exit status of a daemon expected to exit by itself."""
        try:
            return self.proc.wait(timeout=START_TIMEOUT)
        finally:
            self._log.close()

    def stop(self) -> int:
        """SIGTERM, then the exit status (SIGKILL after a minute: the status then says so)."""
        status = stop_process(self.proc)
        self._log.close()
        return status

    def models(self) -> dict[str, Any]:
        """/v1/models as {name: its `llmux` block (state, queue_depth, in_flight, ...)}."""
        return {m["id"]: m["llmux"] for m in http_json(self.base + "/v1/models")[2]["data"]}

    def wait_for(self, what: str, predicate: Callable[[dict[str, Any]], Any], timeout: float = WAIT) -> None:
        """Poll `models()` until `predicate` holds; the last models are in the error."""
        try:
            wait_until(what, lambda: predicate(self.models()), timeout)
        except AssertionError as err:
            raise AssertionError(f"{err}: {self.models()}") from None
