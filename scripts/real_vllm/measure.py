"""Measure real vLLM (CPU) lifecycle times alone and under llmux, side by side in one run.

Part 1, vLLM alone (servers started by hand, one at a time): cold start to /health 200,
RSS of the process tree, /sleep?level=1 and /wake_up round trips, SIGSTOP/SIGCONT of the
tree (freeze, thaw until /health answers), idle SIGTERM stop.

Part 2, through `llmuxd run`: two models (SmolLM2 "chat", MiniLM "embed") with the same
eviction, for each eviction given: the first request (cold start through llmux), then
alternating requests, each of which switches. The orchestration overhead is llmux's own
switch time (llmux_switch_duration_seconds) minus what vLLM spent in sleep and wake
(vllm:sleep_mode_operation_duration_seconds from the backends' /metrics).

    .venv/bin/python scripts/real_vllm/measure.py [--rounds 5] [--stop-rounds 2] [--evictions a,b,...]

Prints a Markdown report (docs/real-vllm.md holds the last one) and, with --json FILE, the
raw numbers. Needs the cache from scripts/real-vllm-setup.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realvllm  # noqa: E402

TOP = Path(__file__).resolve().parents[2]
LLMUXD = Path(sys.executable).with_name("llmuxd")
PROMPT = "The capital of France is"


def timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def ok(status_body: tuple[int, bytes], what: str) -> bytes:
    status, body = status_body
    if status != 200:
        raise RuntimeError(f"{what}: HTTP {status}: {body[:300]!r}")
    return body


def request(base: str, kind: str, model: str) -> None:
    """The smallest real request of each kind: 1 generated token, or 1 embedding."""
    if kind == "chat":
        ok(realvllm.http("POST", base + "/v1/completions",
                         {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}, timeout=600),
           f"{model} completion")
    else:
        ok(realvllm.http("POST", base + "/v1/embeddings", {"model": model, "input": "hello"}, timeout=600),
           f"{model} embedding")


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------- part 1


def measure_vllm_alone(cache: realvllm.RealVllmCache, rounds: int, logdir: Path) -> dict:
    out = {}
    for kind, name, model_dir, args in (
        ("chat", "smollm2", cache.smollm2, realvllm.SMOLLM2_ARGS),
        ("embed", "minilm", cache.minilm, realvllm.MINILM_ARGS),
    ):
        srv = realvllm.VllmServer(cache, model_dir, name, args, log_path=logdir / f"{name}.log")
        t0 = time.perf_counter()
        srv.start()
        try:
            srv.wait_healthy(600)
            cold = time.perf_counter() - t0
            request(srv.url, kind, name)  # first request pays for lazy init
            rss = realvllm.rss_bytes(realvllm.process_tree(srv.proc.pid))
            req, sleep, wake, after_wake, freeze, thaw = [], [], [], [], [], []
            for _ in range(rounds):
                req.append(timed(request, srv.url, kind, name)[0])
                sleep.append(timed(lambda: ok(realvllm.http("POST", srv.url + "/sleep?level=1"), "sleep"))[0])
                wake.append(timed(lambda: ok(realvllm.http("POST", srv.url + "/wake_up"), "wake"))[0])
                after_wake.append(timed(request, srv.url, kind, name)[0])
                pids = realvllm.process_tree(srv.proc.pid)
                t = time.perf_counter()
                os.killpg(srv.proc.pid, signal.SIGSTOP)
                while any(realvllm.proc_state(p) not in ("T", None) for p in pids):
                    time.sleep(0.001)
                freeze.append(time.perf_counter() - t)
                t = time.perf_counter()
                os.killpg(srv.proc.pid, signal.SIGCONT)
                ok(realvllm.http("GET", srv.url + "/health"), "health after thaw")
                thaw.append(time.perf_counter() - t)
            t = time.perf_counter()
            srv.stop(grace=30)
            stop = time.perf_counter() - t
        finally:
            srv.stop()
        out[name] = {"cold_start": cold, "rss_bytes": rss, "request": med(req), "sleep_l1": med(sleep),
                     "wake": med(wake), "request_after_wake": med(after_wake), "freeze": med(freeze), "thaw_to_health": med(thaw), "stop_idle": stop}
        print(f"# vLLM alone {name}: {json.dumps(out[name])}", file=sys.stderr)
    return out


# --------------------------------------------------------------------------- part 2

_SAMPLE = re.compile(r'^([a-zA-Z_:]+)\{([^}]*)\}\s+([-0-9.e+naninf]+)$')


def scrape(url: str) -> list[tuple[str, dict, float]]:
    body = ok(realvllm.http("GET", url + "/metrics"), "metrics").decode()
    samples = []
    for line in body.splitlines():
        m = _SAMPLE.match(line.strip())
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            samples.append((m.group(1), labels, float(m.group(3))))
    return samples


def sum_count(samples, name: str, **labels) -> tuple[float, float]:
    s = c = 0.0
    for n, lab, v in samples:
        if all(lab.get(k) == want for k, want in labels.items()):
            if n == name + "_sum":
                s += v
            elif n == name + "_count":
                c += v
    return s, c


def vllm_sleep_wake(ports: dict[str, int]) -> float:
    """Seconds all backends spent in sleep and wake so far (their own histogram)."""
    total = 0.0
    for port in ports.values():
        if realvllm.server_pid(port):
            samples = scrape(f"http://127.0.0.1:{port}")
            total += sum_count(samples, "vllm:sleep_mode_operation_duration_seconds", operation="sleep")[0]
            total += sum_count(samples, "vllm:sleep_mode_operation_duration_seconds", operation="wake")[0]
    return total


def measure_llmux(cache: realvllm.RealVllmCache, eviction: str, rounds: int, workdir: Path) -> dict:
    import yaml  # the llmux venvs have it; the measurement venv is one of them

    ports = {"chat": realvllm.free_port(), "embed": realvllm.free_port()}
    listen = realvllm.free_port()
    models = {}
    for kind, model_dir, args in (("chat", cache.smollm2, realvllm.SMOLLM2_ARGS),
                                  ("embed", cache.minilm, realvllm.MINILM_ARGS)):
        models[kind] = {"model_path": str(model_dir), "command": cache.command, "port": ports[kind],
                        "sleep_mode": False, "eviction": eviction, "extra_args": list(args),
                        "env": dict(realvllm.VLLM_ENV), "startup_timeout": 600}
    state_dir = workdir / f"state-{eviction}"  # also the backends' cwd: never /var/lib/llmux
    state_dir.mkdir(exist_ok=True)
    config = {"listen": f"127.0.0.1:{listen}", "models": models, "state_dir": str(state_dir),
              "policy": {"min_active": 0, "request_timeout": 600, "coalesce_window": 0}}
    cfg = workdir / f"llmux-{eviction}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{listen}"
    with open(workdir / f"llmuxd-{eviction}.log", "ab") as log:
        proc = subprocess.Popen([str(LLMUXD), "run", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        realvllm.wait_http_ok(base + "/health", 60, proc)
        cold = {k: timed(request, base, k, k)[0] for k in ("chat", "embed")}
        # vLLM's own sleep/wake time: only where llmux calls /sleep (a frozen backend
        # cannot answer /metrics, and retain never sleeps)
        sleeping = not eviction.startswith("retain+")
        before, vllm_before = scrape(base), (vllm_sleep_wake(ports) if sleeping else 0.0)
        plain = {"chat": [], "embed": []}
        switch = {"chat": [], "embed": []}
        for _ in range(rounds):
            for k in ("chat", "embed"):
                switch[k].append(timed(request, base, k, k)[0])  # the other one was awake: switch
                plain[k].append(timed(request, base, k, k)[0])   # no switch
        after, vllm_after = scrape(base), (vllm_sleep_wake(ports) if sleeping else 0.0)
    finally:
        t = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutdown = time.perf_counter() - t
    sw_sum = sum_count(after, "llmux_switch_duration_seconds")[0] - sum_count(before, "llmux_switch_duration_seconds")[0]
    sw_count = sum_count(after, "llmux_switch_duration_seconds")[1] - sum_count(before, "llmux_switch_duration_seconds")[1]
    phases = {}
    for samples, sign in ((after, 1), (before, -1)):
        for n, lab, v in samples:
            if n == "llmux_switch_phase_seconds_sum":
                phases[lab["phase"]] = phases.get(lab["phase"], 0.0) + sign * v
    n = max(sw_count, 1)
    return {
        "eviction": eviction, "cold_first_request": cold,
        "switch_request": {k: med(v) for k, v in switch.items()},
        "plain_request": {k: med(v) for k, v in plain.items()},
        "llmux_switches": sw_count, "llmux_switch_mean": sw_sum / n,
        "vllm_sleep_plus_wake_mean": (vllm_after - vllm_before) / n,
        "phases_mean": {p: v / n for p, v in phases.items()},
        "shutdown": shutdown,
    }


# --------------------------------------------------------------------------- report


def report(alone: dict, runs: list[dict]) -> str:
    ms = lambda s: f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"  # noqa: E731
    lines = ["### vLLM alone", "", "| model | cold start | RSS | request | /sleep?level=1 | /wake_up | "
             "first request after wake | SIGSTOP tree | SIGCONT to /health | idle SIGTERM stop |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in alone.items():
        lines.append(f"| {name} | {ms(r['cold_start'])} | {r['rss_bytes'] / 2**30:.2f} GiB | {ms(r['request'])} | "
                     f"{ms(r['sleep_l1'])} | {ms(r['wake'])} | {ms(r['request_after_wake'])} | {ms(r['freeze'])} | {ms(r['thaw_to_health'])} | "
                     f"{ms(r['stop_idle'])} |")
    lines += ["", "### Through llmuxd run (medians; request = 1 token or 1 embedding)", "",
              "| eviction | first request chat / embed (cold) | switching request → chat / → embed | "
              "plain request chat / embed | llmux switch (mean) | vLLM sleep+wake (mean) | overhead |",
              "|---|---|---|---|---|---|---|"]
    for r in runs:
        c, s, p = r["cold_first_request"], r["switch_request"], r["plain_request"]
        # with +stop vLLM's own part is a stop and a cold start, which its metrics do not show
        overhead = "n/a (cold start)" if r["eviction"].endswith("+stop") else \
            ms(r["llmux_switch_mean"] - r["vllm_sleep_plus_wake_mean"])
        lines.append(f"| {r['eviction']} | {ms(c['chat'])} / {ms(c['embed'])} | {ms(s['chat'])} / {ms(s['embed'])} | "
                     f"{ms(p['chat'])} / {ms(p['embed'])} | {ms(r['llmux_switch_mean'])} | "
                     f"{ms(r['vllm_sleep_plus_wake_mean'])} | {overhead} |")
    lines += ["", "Switch phases (mean per alternating switch):", ""]
    for r in runs:
        ph = ", ".join(f"{k} {ms(v)}" for k, v in sorted(r["phases_mean"].items()))
        lines.append(f"- {r['eviction']}: {ph}; llmuxd shutdown {ms(r['shutdown'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--evictions", default="offload+keep_running,retain+freeze,retain+stop")
    ap.add_argument("--stop-rounds", type=int, default=2, help="rounds for '+stop' (each switch is a cold start)")
    ap.add_argument("--skip-alone", action="store_true", help="only the llmux part")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    ap.add_argument("--report-from", type=Path, help="only print the report of an earlier --json file")
    args = ap.parse_args(argv)
    if args.report_from:
        data = json.loads(args.report_from.read_text())
        print(report(data["alone"], data["llmux"]))
        return 0
    cache, why = realvllm.find_cache()
    if cache is None:
        print(f"measure: {why}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="llmux-measure-"))
    print(f"# logs in {workdir}", file=sys.stderr)
    alone = {} if args.skip_alone else measure_vllm_alone(cache, args.rounds, workdir)
    runs = []
    for ev in args.evictions.split(","):
        rounds = args.stop_rounds if ev.endswith("+stop") else args.rounds
        runs.append(measure_llmux(cache, ev, rounds, workdir))
        print(f"# llmux {ev}: {json.dumps(runs[-1])}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"alone": alone, "llmux": runs}, indent=2))
    print(report(alone, runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
