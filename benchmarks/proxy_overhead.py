#!/usr/bin/env python3
"""What a proxy in front of vLLM costs, measured from outside with wrk.

One fixed-answer backend written in C (benchmarks/native/fixed_backend.c),
and side by side in front of it, each in its own process:

  direct          wrk -> backend (the ceiling: what the backend and the load
                  generator manage without a proxy)
  bare-asyncio    the strongest minimal aiohttp reverse proxy (benchmarks/bare_proxy.py)
  bare-uvloop     the same on uvloop
  llmux-asyncio   `llmuxd run --event-loop asyncio`, one model whose command
                  is the same backend program (llmux starts it, as it would vLLM)
  llmux-uvloop    `llmuxd run --event-loop uvloop`
  watched-*       the same with --consoles N readers of /llmux/v1/events   [--consoles]
  keyed-asyncio   with --keys: llmuxd as above with API keys configured
  keyed-uvloop    (KEYS_IN_STORE keys; every request of every target sends
                  one of them as `Authorization: Bearer`, which the others ignore)
  vllm-router     PyPI vllm-router (Rust), --policy round_robin     [optional]
  litellm         PyPI litellm[proxy], one worker                   [optional]

The optional peers are installed on first use into venvs under
/var/cache/llmux-bench (~/.cache/llmux-bench when not root, or
$LLMUX_BENCH_CACHE); when that fails they are skipped with one line. wrk is
installed with apt when missing (as root).

Each round takes four measurements, each one on every target back to back
(the order rotating from round to round), so that the figures a ratio
compares are taken seconds apart and drift in a shared machine's load hits
all targets alike: wrk at 1 connection (added latency p50/p99 over
`direct`), at 32 and at 256 connections (requests/s, and the proxy's CPU
seconds per request from /proc/<pid>/stat utime+stime before and after),
and 32 SSE streams (benchmarks/native/sse_client.c: time to first event,
events per second, proxy CPU per event). The report gives medians over
rounds and, for ratios, the median of the per-round ratios. The load
generators' own CPU is reported too: they must stay far from a full core
for a proxy's row to mean the proxy.

    python benchmarks/proxy_overhead.py             # full table, under 10 minutes
    python benchmarks/proxy_overhead.py --quick     # one round of 1-s measurements, ~1 minute
    python benchmarks/proxy_overhead.py --targets direct,bare-uvloop,llmux-uvloop --rounds 3
    python benchmarks/proxy_overhead.py --no-peers --keys --targets llmux-asyncio,keyed-asyncio,llmux-uvloop,keyed-uvloop
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from ports import free_port  # noqa: E402

NATIVE_SRC = ROOT / "benchmarks" / "native"
CACHE = Path(os.environ.get("LLMUX_BENCH_CACHE") or (
    "/var/cache/llmux-bench" if os.geteuid() == 0 else os.path.expanduser("~/.cache/llmux-bench")))
CLK_TCK = os.sysconf("SC_CLK_TCK")
NAN = float("nan")

MODEL = "bench"
PATH = "/v1/chat/completions"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
BODY = json.dumps(CHAT)
STREAM_BODY = json.dumps({**CHAT, "stream": True})
SSE_STREAMS = 32
CONCURRENCY = (32, 256)

#: optional peers: venv name -> pip requirement
PEERS = {"vllm-router": "vllm-router", "litellm": "litellm[proxy]"}
PEER_INSTALL_TIMEOUT = 900

#: --keys: how many keys the keyed targets hold (a lookup compares the presented key's hash with each)
KEYS_IN_STORE = 10
#: --keys: the secret every request sends (to every target, so that all carry the same bytes)
BENCH_SECRET = "sk-llmux-benchmark-secret-0000000000000000000000000"

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
%s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %%d, "duration_us": %%d, "socket_errors": %%d, "non2xx": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- setup: wrk, the native tools, the peers ---------------------------------------


def apt_install(*packages: str) -> bool:
    if os.geteuid() != 0:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    say(f"setup: apt-get install {' '.join(packages)}")
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-qq", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
        return True
    subprocess.run(["apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode == 0


def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path is None and apt_install("wrk"):
        path = shutil.which("wrk")
    if path is None:
        sys.exit("proxy_overhead: wrk is not installed; run as root (it installs the Debian package) "
                 "or `apt install wrk`")
    return path


def build_native() -> dict[str, str]:
    """Compile benchmarks/native/*.c into the cache (rebuilt when a source changes)."""
    if shutil.which("cc") is None and not apt_install("gcc", "libc6-dev"):
        sys.exit("proxy_overhead: no C compiler; `apt install gcc` (needed for the backend and SSE client)")
    out = CACHE / "bin"
    out.mkdir(parents=True, exist_ok=True)
    built = {}
    for src in sorted(NATIVE_SRC.glob("*.c")):
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
        exe = out / f"{src.stem}-{digest}"
        if not exe.exists():
            tmp = exe.with_suffix(".tmp")
            subprocess.run(["cc", "-O2", "-Wall", "-o", str(tmp), str(src)], check=True)
            tmp.rename(exe)
        built[src.stem] = str(exe)
    return built


def ensure_peer(name: str, requirement: str) -> Optional[Path]:
    """The peer's venv bin directory, installing it on first use; None (said why) when it cannot be."""
    venv = CACHE / name
    stamp = venv / ".llmux-bench-ok"
    if stamp.exists():
        return venv / "bin"
    say(f"setup: installing {requirement} into {venv} (first run only)")
    try:
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", str(venv)], check=True,
                       stdout=subprocess.DEVNULL, timeout=120)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", requirement], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=PEER_INSTALL_TIMEOUT)
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", None) or b""
        last = detail.decode(errors="replace").strip().splitlines()[-1:] if detail else [str(exc)]
        say(f"skipped {name}: `pip install {requirement}` failed ({last[0][:160] if last else exc})")
        return None
    stamp.write_text(requirement + "\n")
    return venv / "bin"


# -- targets -------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    optional: bool = False
    proc: Optional[subprocess.Popen] = None
    log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, logdir: Path) -> None:
        self.log = open(logdir / f"{self.name}.log", "wb")
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(self.argv, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(ROOT))

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        except ProcessLookupError:
            pass

    def cpu_ticks(self) -> int:
        """utime+stime of the target's processes: its own and its descendants',
        except backends (llmux starts one as its child); for `direct`, the backend's."""
        assert self.proc is not None
        return sum(ticks for _, ticks in proxy_processes(self.proc.pid))


def read_stat(pid: int) -> Optional[tuple[str, int, int]]:
    """(comm, ppid, utime+stime) from /proc/<pid>/stat, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1: raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2:].split()
    return comm, int(fields[1]), int(fields[11]) + int(fields[12])


def proxy_processes(root: int) -> list[tuple[int, int]]:
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        st = stats.get(pid)
        if st is None or (pid != root and st[0].startswith("fixed_backend")):
            continue
        found.append((pid, st[2]))
        todo.extend(child for child, (_, ppid, _) in stats.items() if ppid == pid)
    return found


def make_targets(args: argparse.Namespace, tools: dict[str, str], workdir: Path, backend_port: int) -> list[Target]:
    backend = f"http://127.0.0.1:{backend_port}"
    py = sys.executable
    targets = [Target("direct", backend_port, [tools["fixed_backend"], "--port", str(backend_port),
                                               "--chunks", str(args.chunks)])]
    for loop in ("asyncio", "uvloop"):
        port = free_port()
        targets.append(Target(f"bare-{loop}", port, [py, str(ROOT / "benchmarks" / "bare_proxy.py"), "--port",
                                                     str(port), "--backend", backend, "--loop", loop]))
    checkouts = [("llmux", ROOT)] + ([("base", Path(args.baseline).resolve())] if args.baseline else [])
    checkouts += [("keyed", ROOT)] if args.keys else []
    checkouts += [("watched", ROOT)] if args.consoles else []
    empty_keys_dir = workdir / "no-keys.d"
    empty_keys_dir.mkdir(exist_ok=True)
    for (prefix, checkout), loop in itertools.product(checkouts, ("asyncio", "uvloop")):
        port = free_port()
        config = workdir / f"{prefix}-{loop}.yaml"
        config.write_text(json.dumps({
            "listen": f"127.0.0.1:{port}",
            "models": {MODEL: {"model_path": "/bench", "command": [tools["fixed_backend"]],
                               "port": free_port(), "extra_args": ["--chunks", str(args.chunks)]}},
            # never the host's /etc/llmux/keys.d: only the keyed targets have keys
            **({"keys_dir": str(write_keys(workdir) if prefix == "keyed" else empty_keys_dir)}
               if args.keys else {}),
        }))
        # llmuxd from that checkout, whatever else is installed
        targets.append(Target(f"{prefix}-{loop}", port, [py, "-m", "llmuxd.daemon.main", "run", "--config",
                                                          str(config), "--bus", "none", "--event-loop", loop],
                              env={"PYTHONPATH": str(checkout)}))
    if not args.no_peers:
        bindir = ensure_peer("vllm-router", PEERS["vllm-router"])
        if bindir is not None:
            port = free_port()
            targets.append(Target("vllm-router", port, [
                str(bindir / "vllm-router"), "--host", "127.0.0.1", "--port", str(port),
                "--worker-urls", backend, "--policy", "round_robin", "--log-level", "warning",
                "--prometheus-port", str(free_port())], optional=True))
        bindir = ensure_peer("litellm", PEERS["litellm"])
        if bindir is not None:
            port = free_port()
            config = workdir / "litellm.yaml"
            config.write_text(json.dumps({
                "model_list": [{"model_name": MODEL, "litellm_params": {
                    "model": f"openai/{MODEL}", "api_base": f"{backend}/v1", "api_key": "none"}}],
                "litellm_settings": {"telemetry": False, "drop_params": True},
            }))
            targets.append(Target("litellm", port, [
                str(bindir / "litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                "--num_workers", "1"], env={"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
                     "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"},
                optional=True))
    wanted = set(args.targets.split(",")) if args.targets else None
    if wanted is not None:
        unknown = wanted - {t.name for t in targets}
        if unknown:
            sys.exit(f"proxy_overhead: unknown or unavailable targets {sorted(unknown)}")
        targets = [t for t in targets if t.name == "direct" or t.name in wanted]
    return targets


def write_keys(workdir: Path) -> Path:
    """A keys dir of KEYS_IN_STORE keys, the last one BENCH_SECRET's (a lookup checks all of them anyway)."""
    keys_dir = workdir / "keys.d"
    keys_dir.mkdir(exist_ok=True)
    entries = []
    for n in range(KEYS_IN_STORE):
        secret = BENCH_SECRET if n == KEYS_IN_STORE - 1 else f"sk-llmux-other-{n}"
        entries.append({"id": f"bench-{n}", "sha256": hashlib.sha256(secret.encode()).hexdigest()})
    path = keys_dir / "bench.yaml"
    path.write_text(json.dumps({"keys": entries}))
    path.chmod(0o640)
    return keys_dir


#: headers every request carries (set by main: the key with --keys)
REQUEST_HEADERS: dict[str, str] = {}


def answers(url: str) -> bool:
    req = urllib.request.Request(url + PATH, data=BODY.encode(),
                                 headers={"Content-Type": "application/json", **REQUEST_HEADERS})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status == 200 and b"choices" in r.read()
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(target: Target, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if target.proc is not None and target.proc.poll() is not None:
            return False
        if answers(target.url):
            return True
        time.sleep(0.2)
    return False


# -- load ----------------------------------------------------------------------------


def run_child(argv: list[str]) -> tuple[dict[str, Any], float]:
    """Run a load generator; (the JSON line it printed, the CPU seconds it used)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read().decode()  # type: ignore[union-attr]
    err = proc.stderr.read().decode()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{argv[0]} printed no result (exit {proc.returncode}): {(out + err).strip()[-500:]}")
    return json.loads(lines[-1]), usage.ru_utime + usage.ru_stime


def wrk(wrk_bin: str, script: str, target: Target, conns: int, duration: int) -> dict[str, float]:
    before = target.cpu_ticks()
    r, gen_cpu = run_child([wrk_bin, "-t1", f"-c{conns}", f"-d{duration}s", "--timeout", "10s", "-s", script,
                              target.url + PATH])
    proxy_cpu = (target.cpu_ticks() - before) / CLK_TCK
    seconds = r["duration_us"] / 1e6
    done = r["requests"]  # none: a proxy too slow to answer one request within the duration
    return {
        "rps": done / seconds,
        "p50_ms": r["p50_us"] / 1000 if done else NAN,
        "p99_ms": r["p99_us"] / 1000 if done else NAN,
        "errors": r["socket_errors"] + r["non2xx"],
        "cpu_ms_per_req": proxy_cpu / done * 1000 if done else NAN,
        "gen_core": gen_cpu / seconds,
    }


def sse(client: str, target: Target, duration: int) -> dict[str, float]:
    before = target.cpu_ticks()
    headers = [arg for name, value in REQUEST_HEADERS.items() for arg in ("--header", f"{name}: {value}")]
    r, gen_cpu = run_child([client, "--port", str(target.port), "--path", PATH, "--body", STREAM_BODY,
                            "--streams", str(SSE_STREAMS), "--duration", str(duration), *headers])
    proxy_cpu = (target.cpu_ticks() - before) / CLK_TCK
    return {
        "sse_chunks_per_s": r["events_in_window"] / r["window_s"],
        "sse_ttfc_p50_ms": r["ttfc_p50_ms"],
        "sse_ttfc_p99_ms": r["ttfc_p99_ms"],
        "errors": r["errors"],
        "sse_cpu_us": proxy_cpu / max(1, r["events"]) * 1e6,
        "sse_gen_core": gen_cpu / r["window_s"],
    }


def at_concurrency(tools: dict[str, str], target: Target, conns: int, duration: int) -> dict[str, float]:
    r = wrk(tools["wrk"], tools["wrk_script"], target, conns, duration)
    if conns == 1:
        return {"c1_p50_ms": r["p50_ms"], "c1_p99_ms": r["p99_ms"], "errors": r["errors"]}
    return {f"c{conns}_rps": r["rps"], f"c{conns}_cpu_ms": r["cpu_ms_per_req"],
            f"c{conns}_gen_core": r["gen_core"], "errors": r["errors"]}


#: one round: each measurement in turn, every target back to back within it, so
#: that the figures compared in a ratio are taken seconds apart
MEASUREMENTS: list[Callable[[dict[str, str], Target, int], dict[str, float]]] = [
    lambda tools, t, d: at_concurrency(tools, t, 1, d),
    lambda tools, t, d: at_concurrency(tools, t, 32, d),
    lambda tools, t, d: at_concurrency(tools, t, 256, d),
    lambda tools, t, d: sse(tools["sse_client"], t, d),
]


def measure_round(targets: list[Target], tools: dict[str, str], duration: int) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {t.name: {"errors": 0} for t in targets}
    for measurement in MEASUREMENTS:
        for t in targets:
            figures = measurement(tools, t, duration)
            rows[t.name]["errors"] += figures.pop("errors")
            rows[t.name].update(figures)
    return rows


# -- report --------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    """The median of the values that are numbers (NaN: nothing measured that round)."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else NAN


def ratio(x: float, y: float) -> float:
    return x / y if y else NAN


def median_of(rounds: list[dict[str, float]], key: str) -> float:
    return median(r[key] for r in rounds)


def paired(results: dict[str, list[dict[str, float]]], a: str, b: str, fn: Callable[[dict, dict, dict], float]) -> float:
    """Median over rounds of fn(round of a, round of b, round of direct)."""
    return median(fn(x, y, d) for x, y, d in zip(results[a], results[b], results["direct"]))


def added(key: str) -> Callable[[dict, dict, dict], float]:
    return lambda x, y, d: x[key] - d[key]


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    out = {}
    for name, rounds in results.items():
        row = {key: median_of(rounds, key) for key in rounds[0]}
        row["errors"] = sum(r["errors"] for r in rounds)
        row["added_p50_ms"] = median(r["c1_p50_ms"] - d["c1_p50_ms"] for r, d in zip(rounds, results["direct"]))
        row["added_p99_ms"] = median(r["c1_p99_ms"] - d["c1_p99_ms"] for r, d in zip(rounds, results["direct"]))
        out[name] = row
    return out


COLUMNS = [
    ("c=1 p50 ms", "c1_p50_ms", "{:.3f}"), ("added p50 ms", "added_p50_ms", "{:.3f}"),
    ("added p99 ms", "added_p99_ms", "{:.3f}"),
    ("req/s c=32", "c32_rps", "{:.0f}"), ("CPU ms/req c=32", "c32_cpu_ms", "{:.3f}"),
    ("req/s c=256", "c256_rps", "{:.0f}"), ("CPU ms/req c=256", "c256_cpu_ms", "{:.3f}"),
    ("SSE TTFC p50 ms", "sse_ttfc_p50_ms", "{:.2f}"), ("SSE chunks/s", "sse_chunks_per_s", "{:.0f}"),
    ("CPU µs/chunk", "sse_cpu_us", "{:.1f}"), ("errors", "errors", "{:.0f}"),
]
GENERATOR_COLUMNS = [("wrk c=32", "c32_gen_core"), ("wrk c=256", "c256_gen_core"), ("sse_client", "sse_gen_core")]

#: (label, numerator, denominator, goal text)
COMPARISONS = [
    ("llmux / bare proxy, asyncio loop", "llmux-asyncio", "bare-asyncio"),
    ("llmux / bare proxy, uvloop", "llmux-uvloop", "bare-uvloop"),
    ("llmux (uvloop) / vllm-router (far target)", "llmux-uvloop", "vllm-router"),
    ("llmux (uvloop) / litellm", "llmux-uvloop", "litellm"),
    ("this checkout / --baseline, asyncio loop", "llmux-asyncio", "base-asyncio"),
    ("this checkout / --baseline, uvloop", "llmux-uvloop", "base-uvloop"),
    ("--keys: a key on every request / no keys, asyncio loop", "keyed-asyncio", "llmux-asyncio"),
    ("--keys: a key on every request / no keys, uvloop", "keyed-uvloop", "llmux-uvloop"),
    ("--consoles: N consoles following /llmux/v1/events / none, asyncio loop", "watched-asyncio", "llmux-asyncio"),
    ("--consoles: N consoles following /llmux/v1/events / none, uvloop", "watched-uvloop", "llmux-uvloop"),
]


def ratios(results: dict[str, list[dict[str, float]]], a: str, b: str) -> dict[str, float]:
    def added_ratio(x: dict, y: dict, d: dict) -> float:
        theirs = y["c1_p50_ms"] - d["c1_p50_ms"]
        return (x["c1_p50_ms"] - d["c1_p50_ms"]) / theirs if theirs > 0 else NAN

    return {
        "rps_c32": paired(results, a, b, lambda x, y, d: ratio(x["c32_rps"], y["c32_rps"])),
        "added_p50_c1": paired(results, a, b, added_ratio),
        "cpu_per_req_c32": paired(results, a, b, lambda x, y, d: ratio(x["c32_cpu_ms"], y["c32_cpu_ms"])),
        "rps_c256": paired(results, a, b, lambda x, y, d: ratio(x["c256_rps"], y["c256_rps"])),
        "sse_chunks_per_s": paired(results, a, b, lambda x, y, d: ratio(x["sse_chunks_per_s"], y["sse_chunks_per_s"])),
    }


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> dict[str, Any]:
    summary = summarize(results)
    print(f"proxy overhead: {os.cpu_count()} CPUs, {args.rounds} rounds x {args.duration:g} s per measurement, "
          f"{args.chunks} SSE chunks per stream, python {sys.version.split()[0]}, aiohttp {aiohttp_version()}; "
          "medians over rounds\n")
    print("| target | " + " | ".join(label for label, _, _ in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for name, row in summary.items():
        print(f"| {name} | " + " | ".join(show(row[key], fmt) for _, key, fmt in COLUMNS) + " |")
    print("\nload generators' own CPU, in cores (1.0 = one core busy):\n")
    print("| target | " + " | ".join(label for label, _ in GENERATOR_COLUMNS) + " |")
    print("|---|" + "---|" * len(GENERATOR_COLUMNS))
    for name, row in summary.items():
        print(f"| {name} | " + " | ".join(show(row[key], "{:.2f}") for _, key in GENERATOR_COLUMNS) + " |")
    print("\nratios (median of per-round ratios; goals: req/s >= 1.00, added latency <= 1.05, CPU/req <= 1.00):\n")
    print("| comparison | req/s c=32 | added p50 c=1 | CPU/req c=32 | req/s c=256 | SSE chunks/s |")
    print("|---|---|---|---|---|---|")
    compared = {}
    for label, a, b in COMPARISONS:
        if a in results and b in results:
            r = ratios(results, a, b)
            compared[label] = r
            print(f"| {label} | " + " | ".join(show(r[key], "{:.2f}x") for key in RATIO_KEYS) + " |")
    return {"summary": summary, "ratios": compared, "rounds": results}


RATIO_KEYS = ("rps_c32", "added_p50_c1", "cpu_per_req_c32", "rps_c256", "sse_chunks_per_s")


def show(value: float, fmt: str) -> str:
    return fmt.format(value) if math.isfinite(value) else "–"


def aiohttp_version() -> str:
    try:
        import aiohttp

        return aiohttp.__version__
    except ImportError:
        return "?"


# -- main ----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    parser.add_argument("--duration", type=int, default=2, help="whole seconds per measurement (default 2)")
    parser.add_argument("--chunks", type=int, default=200, help="SSE events per stream (default 200)")
    parser.add_argument("--targets", help="comma-separated subset (direct is always measured)")
    parser.add_argument("--no-peers", action="store_true", help="leave out vllm-router and litellm")
    parser.add_argument("--quick", action="store_true", help="one round of 1 s measurements")
    parser.add_argument("--json", metavar="FILE", help="also write every round's numbers as JSON")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also measure llmuxd from another checkout (base-asyncio, base-uvloop), "
                             "e.g. one made with `git worktree add DIR HEAD~1`, to see what a change costs")
    parser.add_argument("--keys", action="store_true",
                        help=f"also measure llmuxd with API keys ({KEYS_IN_STORE} keys; keyed-asyncio, keyed-uvloop); "
                             "every request of every target then sends a key")
    parser.add_argument("--consoles", type=int, default=0, metavar="N",
                        help="also measure llmuxd with N console readers (`curl -N /llmux/v1/events`) "
                             "following it throughout (watched-asyncio, watched-uvloop)")
    args = parser.parse_args()
    if args.keys:
        REQUEST_HEADERS["Authorization"] = f"Bearer {BENCH_SECRET}"
    if args.quick:
        args.rounds, args.duration = 1, 1

    wrk_bin = ensure_wrk()
    tools = build_native()
    workdir = Path(tempfile.mkdtemp(prefix="llmux-proxy-bench-"))
    tools["wrk"] = wrk_bin
    tools["wrk_script"] = str(workdir / "post.lua")
    Path(tools["wrk_script"]).write_text(WRK_SCRIPT % (BODY, "\n".join(
        f'wrk.headers["{name}"] = "{value}"' for name, value in REQUEST_HEADERS.items())))

    targets = make_targets(args, tools, workdir, free_port())
    consoles: list[subprocess.Popen] = []
    try:
        for t in targets:
            t.start(workdir)
        ready = []
        for t in targets:
            if wait_ready(t, 180 if t.optional else 60):
                ready.append(t)
            elif t.optional:
                say(f"skipped {t.name}: did not answer within 180 s (log: {workdir / (t.name + '.log')})")
                t.stop()
            else:
                sys.exit(f"proxy_overhead: {t.name} did not come up; see {workdir / (t.name + '.log')}")
        consoles += [subprocess.Popen(["curl", "-sN", *[a for k, v in REQUEST_HEADERS.items() for a in ("-H", f"{k}: {v}")],
                                      "-o", "/dev/null", t.url + "/llmux/v1/events"], stdin=subprocess.DEVNULL)
                     for t in ready if t.name.startswith("watched-") for _ in range(args.consoles)]
        per_round = len(ready) * (4 * args.duration + 0.5) + (15 if any(t.name == "litellm" for t in ready) else 0)
        say(f"measuring {', '.join(t.name for t in ready)}: {args.rounds} rounds, about "
            f"{per_round * args.rounds / 60:.1f} minutes")
        for t in ready:  # warm up connection pools and code paths
            wrk(wrk_bin, tools["wrk_script"], t, 32, 1)
        results: dict[str, list[dict[str, float]]] = {t.name: [] for t in ready}
        for n in range(args.rounds):
            order = ready[n % len(ready):] + ready[: n % len(ready)]  # no target always first
            for name, row in measure_round(order, tools, args.duration).items():
                results[name].append(row)
            say(f"round {n + 1}/{args.rounds} done")
    finally:
        for reader in consoles:
            reader.terminate()
            reader.wait(10)
        for t in targets:
            t.stop()
    data = report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))
    shutil.rmtree(workdir, ignore_errors=True)  # kept when something failed: the logs are there
    return 0


if __name__ == "__main__":
    sys.exit(main())
