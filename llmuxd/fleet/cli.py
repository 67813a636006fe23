"""`llmuxctl fleet HOST_URL...`: a fleet's state on one screen, and the router config for it.

Reads each host's `GET /llmux/v1/state` (in parallel, a few seconds at most) and prints:

- a table, one row per host: its GPU groups' budget use, then each model's state
  there (`awake 2+1`: in flight + queued; `asleep ~3.0s`: the wait a request
  would see; `starting`, `failed`, `down`);
- a LiteLLM proxy config: every model as a deployment on every host that serves
  it, with llmux's routing hook (`llmuxd.fleet.litellm`) in `litellm_settings`;
- a `vllm-router` command line per model where its routing fits: vllm-router sends
  any request to any worker (it does not read the `model` field), which fits only
  hosts pinned to one model (`llmuxctl pin MODEL`).

`--only table|litellm|vllm-router` prints one part (`--only litellm > config.yaml`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import aiohttp
import yaml

from llmuxd.fleet.signal import AWAKE, FAILED, STARTING, HostSignal, SignalError, state_url

PARTS = ("table", "litellm", "vllm-router")
#: the callbacks entry that loads llmux's routing hook into LiteLLM
LITELLM_CALLBACK = "llmuxd.fleet.litellm.llmux_routing"
#: seconds to wait for one host's state
FETCH_TIMEOUT = 5.0


@dataclass
class HostReport:
    url: str
    signal: Optional[HostSignal] = None
    error: Optional[str] = None

    @property
    def name(self) -> str:
        return self.url.split("://", 1)[-1]


def normalize(url: str) -> str:
    """`host:port`, `http://host:port/` or an OpenAI base `…/v1` → `http://host:port`."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url[: -len("/v1")] if url.endswith("/v1") else url


async def fetch_all(urls: Sequence[str], timeout: float = FETCH_TIMEOUT) -> List[HostReport]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        return list(await asyncio.gather(*(fetch(session, normalize(u)) for u in urls)))


async def fetch(session: aiohttp.ClientSession, url: str) -> HostReport:
    try:
        async with session.get(state_url(url)) as resp:
            if resp.status != 200:
                return HostReport(url, error=f"HTTP {resp.status} from {state_url(url)} (not llmux, or an llmux without the fleet signal)")
            return HostReport(url, HostSignal.from_json(await resp.json(content_type=None)))
    except SignalError as exc:
        return HostReport(url, error=str(exc))
    except asyncio.TimeoutError:
        return HostReport(url, error=f"no answer within {session.timeout.total:g}s")
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return HostReport(url, error=str(exc) or type(exc).__name__)


def models_of(reports: Sequence[HostReport]) -> List[str]:
    return sorted({m for r in reports if r.signal for m in r.signal.models})


# -- the table ----------------------------------------------------------------------------


def cell(signal: HostSignal, model: str) -> str:
    m = signal.models.get(model)
    if m is None:
        return "-"
    if m.state == AWAKE:
        text = f"awake {m.in_flight}+{m.queue_depth}"
    elif m.state == STARTING:
        text = f"starting ~{m.wait_estimate_s:.1f}s" + (f" q{m.queue_depth}" if m.queue_depth else "")
    elif m.state == FAILED:
        text = "failed"
    else:
        text = f"asleep ~{m.wait_estimate_s:.1f}s" + (f" q{m.queue_depth}" if m.queue_depth else "")
    return text if m.accepts else text + " (refused)"


def budget_use(signal: HostSignal) -> str:
    parts = []
    for name, g in sorted(signal.groups.items()):
        if g.budget_gib is None:
            parts.append(f"{name} {len(g.awake)}/1")
        else:
            parts.append(f"{name} {g.used_gib or 0:g}/{g.budget_gib:g}GiB")
    return " ".join(parts) or "-"


def format_table(reports: Sequence[HostReport]) -> str:
    models = models_of(reports)
    up = [r for r in reports if r.signal]
    awake_where = {m: sum(1 for r in up if r.signal and m in r.signal.awake_models()) for m in models}
    head = f"fleet: {len(up)} of {len(reports)} hosts answering, {len(models)} models"
    rows = [["HOST", "GPU USE", *models]]
    for r in reports:
        if r.signal is None:
            rows.append([r.name, "down", *["-" for _ in models]])
            continue
        name = r.name + (f" (pinned {r.signal.pinned})" if r.signal.pinned else "")
        rows.append([name, budget_use(r.signal), *[cell(r.signal, m) for m in models]])
    rows.append(["awake on", "", *[f"{awake_where[m]} of {len(up)}" for m in models]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [head, ""] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines += [f"(!) {r.name}: {r.error}" for r in reports if r.error]
    return "\n".join(lines)


# -- router configuration ----------------------------------------------------------------


def litellm_config(reports: Sequence[HostReport]) -> Dict[str, Any]:
    """A LiteLLM proxy config: each model on each host that serves it, llmux's hook on."""
    model_list = []
    for model in models_of(reports):
        for r in reports:
            if r.signal and model in r.signal.models:
                model_list.append({
                    "model_name": model,
                    "litellm_params": {"model": f"openai/{model}", "api_base": r.url + "/v1", "api_key": "none"},
                    "model_info": {"id": f"{model}@{r.name}"},
                })
    return {
        "model_list": model_list,
        "litellm_settings": {"callbacks": [LITELLM_CALLBACK]},
        # a host that drops a connection is retried elsewhere (the hook skips it at once)
        "router_settings": {"num_retries": 2},
    }


def format_litellm(reports: Sequence[HostReport]) -> str:
    hosts = ", ".join(r.name for r in reports if r.signal)
    header = (f"# LiteLLM proxy config for llmux hosts {hosts} (llmuxctl fleet).\n"
              "# LiteLLM must be able to import llmuxd (pip install 'llmux[fleet]' in its environment).\n"
              "# Set general_settings.master_key or LITELLM_MASTER_KEY before exposing it.\n")
    return header + yaml.safe_dump(litellm_config(reports), sort_keys=False)


def vllm_router_commands(reports: Sequence[HostReport], port: int = 30000) -> List[Tuple[str, List[str]]]:
    """(model, argv) of one vllm-router per model that some hosts are pinned to."""
    pinned: Dict[str, List[str]] = {}
    for r in reports:
        if r.signal and r.signal.pinned:
            pinned.setdefault(r.signal.pinned, []).append(r.url)
    return [
        (model, ["vllm-router", "--worker-urls", *urls, "--policy", "round_robin",
                 "--host", "0.0.0.0", "--port", str(port + i)])
        for i, (model, urls) in enumerate(sorted(pinned.items()))
    ]


def vllm_router_lines(reports: Sequence[HostReport]) -> List[str]:
    commands = vllm_router_commands(reports)
    lines = ["# vllm-router sends any request to any worker: it does not read the \"model\" field.",
             "# It fits hosts pinned to one model (llmuxctl pin MODEL on each), one router per model."]
    if not commands:
        lines.append("# No host is pinned, so vllm-router's routing does not fit this fleet: use LiteLLM (above).")
    lines += [f"{' '.join(argv)}   # {model}" for model, argv in commands]
    return lines


def render(reports: Sequence[HostReport], only: Optional[str] = None) -> str:
    parts = {
        "table": lambda: format_table(reports),
        "litellm": lambda: format_litellm(reports),
        "vllm-router": lambda: "\n".join(vllm_router_lines(reports)),
    }
    chosen = [only] if only else list(PARTS)
    return "\n\n".join(parts[p]() for p in chosen)


def as_json(reports: Sequence[HostReport]) -> Dict[str, Any]:
    return {
        "hosts": {r.url: (r.signal.to_json() if r.signal else {"error": r.error}) for r in reports},
        "litellm": litellm_config(reports),
        "vllm_router": [{"model": m, "argv": argv} for m, argv in vllm_router_commands(reports)],
    }
