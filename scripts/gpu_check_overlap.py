"""gpu-check's overlap section (issue #26): the sequential and the overlapped
switch side by side, against the bandwidth floor gpu-check measured in the
same run.

Kept apart from scripts/gpu-check (which imports it) so the two change
independently. Two llmux-vllm-sim models on the device, each at gpu-check's
footprint (60 % of the GPU: never both awake), in a group whose budget holds
both models' weights at once. One `llmuxd run` switches them back and forth
with `policy.overlap: off`, another with `auto`; times are the daemon's
llmux_switch_duration_seconds minus the drain. The floors: a sequential
switch can be no faster than weights / d2h + weights / h2d, an overlapped one
than weights / min(h2d, d2h). Each model is its own process, so its copies
run in its own CUDA context: a weights-out and a weights-in are concurrent
copies on separate streams, as on a real pair of vLLM servers.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

MODELS = ("gc-a", "gc-b")
SWITCHES = 2  # per direction


def _config(m: Any, plan: Any, out: Path, mode: str, model_config: Callable[..., dict], listen: str) -> dict:
    budget_gib = (m.total_mib * 0.95 if m.device == "cuda" else 4 * (plan.weights_mib + plan.kv_mib)) / 1024
    awake_gib = budget_gib * 0.6 if m.device == "cuda" else (plan.weights_mib + plan.kv_mib) / 1024 * 3
    models = {}
    for name in MODELS:
        entry = model_config(name, m, plan, "offload+keep_running", out)
        entry.update(gpu_group="gc", gpu_memory_gib=round(awake_gib, 3), weights_gib=round(plan.weights_mib / 1024, 3))
        models[name] = entry
    return {
        "listen": listen, "state_dir": str(out / "state"), "user": None, "gpu_probe": "none",
        "groups": {"gc": {"budget_gib": round(budget_gib, 3)}},
        "policy": {"type": "fifo", "request_timeout": 240, "min_active": 0, "drain_timeout": 60,
                   "sleep_timeout": 120, "wake_timeout": 240, "overlap": mode},
        "models": models,
    }


def _duration(metrics: str) -> tuple[float, float, int]:
    """(sum of switch seconds, sum of drain seconds, count) between the two models."""
    total = drain = 0.0
    count = 0
    for line in metrics.splitlines():
        if not any(f'from="{a}"' in line and f'to="{b}"' in line for a in MODELS for b in MODELS if a != b):
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith("llmux_switch_duration_seconds_sum{"):
            total += value
        elif line.startswith("llmux_switch_duration_seconds_count{"):
            count += int(value)
        elif line.startswith("llmux_switch_phase_seconds_sum{") and 'phase="drain"' in line:
            drain += value
    return total, drain, count


async def _one_mode(m: Any, plan: Any, out: Path, mode: str, model_config: Callable[..., dict],
                    daemon_class: Any, free_port: Callable[[], int]) -> tuple[float, int]:
    import aiohttp
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    listen = f"127.0.0.1:{free_port()}"
    config = out / "llmux.yaml"
    config.write_text(yaml.safe_dump(_config(m, plan, out.parent, mode, model_config, listen), sort_keys=False))
    daemon = daemon_class(config, out / "llmuxd.log", listen)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
            await daemon.wait_ready(http)

            async def ask(model: str) -> None:
                body = {"model": model, "prompt": "x", "max_tokens": 1, "temperature": 0}
                async with http.post(daemon.base + "/v1/completions", json=body) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"{model} answered {resp.status}: {(await resp.text())[:300]}")

            async def metrics() -> str:
                async with http.get(daemon.base + "/metrics") as resp:
                    return await resp.text()

            for name in (*MODELS, MODELS[0]):  # both started, gc-b asleep, gc-a serving
                await ask(name)
            before = _duration(await metrics())
            for _ in range(SWITCHES):
                await ask(MODELS[1])
                await ask(MODELS[0])
            after = _duration(await metrics())
            overlapped = len(re.findall(r"; overlapped", daemon.log_path.read_text(errors="replace")))
    finally:
        daemon.stop()
    n = after[2] - before[2]
    if n <= 0:
        raise RuntimeError(f"overlap {mode}: no switch counted")
    return ((after[0] - before[0]) - (after[1] - before[1])) / n, overlapped


async def overlap_section(m: Any, plan: Any, bandwidth: dict, out: Path, *, model_config: Callable[..., dict],
                    daemon_class: Any, free_port: Callable[[], int]) -> list[str]:
    """Report lines: sequential vs overlapped switch time and their floors."""
    print("overlapped switch (issue #26): sequential, then overlapped ...", flush=True)
    started = time.monotonic()
    try:
        seq, seq_overlapped = await _one_mode(m, plan, out / "overlap-off", "off", model_config,
                                              daemon_class, free_port)
        ovl, ovl_overlapped = await _one_mode(m, plan, out / "overlap-auto", "auto", model_config,
                                              daemon_class, free_port)
    except Exception as exc:  # noqa: BLE001 - a section of the report, not the whole check
        print(f"  overlap section FAILED: {exc}", file=sys.stderr, flush=True)
        return ["", f"Overlapped switch: FAILED ({str(exc).splitlines()[0]})"]
    nbytes = plan.weights_mib * (1 << 20)
    h2d, d2h = bandwidth["h2d_gbps"] * 1e9, bandwidth["d2h_gbps"] * 1e9
    floor_seq = nbytes / h2d + nbytes / d2h
    floor_ovl = nbytes / min(h2d, d2h)
    return [
        "",
        f"Overlapped switch (issue #26; two models, weights {plan.weights_mib} MiB each, mean of "
        f"{2 * SWITCHES} switches without the drain, {time.monotonic() - started:.0f} s):",
        "",
        "| switch | seconds | floor s | / floor | overlapped switches |",
        "|---|---|---|---|---|",
        f"| sequential (overlap: off) | {seq:.3f} | {floor_seq:.3f} | {seq / floor_seq:.1f}x | {seq_overlapped} |",
        f"| overlapped (overlap: auto) | {ovl:.3f} | {floor_ovl:.3f} | {ovl / floor_ovl:.1f}x | {ovl_overlapped} |",
        "",
        f"overlapped / sequential: {ovl / seq:.2f}",
    ]
