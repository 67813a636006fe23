"""A fleet for real: three `llmuxd run` hosts (127.0.0.2, .3, .4; the same three simulated
models each; one GPU each) behind a real LiteLLM proxy from PyPI, configured with what
`llmuxctl fleet` prints, i.e. with llmux's routing hook.

What a user must see:
- mixed load from several clients loses nothing and nothing is misrouted;
- the hook's effect: once each model is awake somewhere, every request goes to a host
  where its model is awake, so the steady phase runs without a single switch and each
  model is served by one host, where the same load through LiteLLM's default routing
  (a second proxy, same hosts) switches models all the time;
- a host that dies is routed around (LiteLLM retries the requests it dropped, the hook
  skips it at once), and once it is back it serves again.

Needs the LiteLLM venv (scripts/litellm-setup, which scripts/test runs as root). Without
it the tests skip with the reason, and fail when CI is set or as root.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
import yaml

from daemon_process import wait_until
from fleet_harness import (
    MODELS, FleetHost, FleetOutcome, LiteLLMProxy, Req, hosts_by_model, litellm_config, problems,
    require_litellm, run_clients, start_hosts,
)

pytestmark = [pytest.mark.fleet]

CLIENTS = 6
PER_CLIENT = 30
#: what any wait for the fleet to settle may take (the machine is shared: generous)
SETTLE = 90.0


class Fleet:
    def __init__(self, hosts: List[FleetHost], routed: LiteLLMProxy, default: LiteLLMProxy):
        self.hosts, self.routed, self.default = hosts, routed, default

    def switches(self) -> int:
        return sum(h.switches() for h in self.hosts)

    def awake_map(self) -> Dict[str, List[str]]:
        """model -> hosts where it is awake."""
        where: Dict[str, List[str]] = {m: [] for m in MODELS}
        for h in self.hosts:
            for m in h.awake():
                where[m].append(h.url)
        return where


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    exe = require_litellm()
    tmp = tmp_path_factory.mktemp("fleet")
    hosts = start_hosts(tmp)
    proxies: List[LiteLLMProxy] = []
    try:
        # the routed proxy's config is exactly what a user gets from llmuxctl fleet
        out = subprocess.run([sys.executable, "-m", "llmuxd.ctl", "fleet", "--only", "litellm",
                              *(h.url for h in hosts)], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        assert out.returncode == 0, out.stderr
        routed_config = yaml.safe_load(out.stdout)
        assert routed_config == litellm_config(hosts, llmux_routing=True)
        proxies = [LiteLLMProxy(exe, tmp, routed_config, name="litellm-llmux").start(),
                   LiteLLMProxy(exe, tmp, litellm_config(hosts, llmux_routing=False), name="litellm-default").start()]
        for p in proxies:
            p.wait_ready()
        yield Fleet(hosts, *proxies)
    finally:
        for p in proxies:
            p.stop()
        for h in hosts:
            h.stop()


def mixed(seed: int, clients: int = CLIENTS, per_client: int = PER_CLIENT, stream_share: float = 0.2) -> List[List[Req]]:
    """Several clients, each with its own random mix of the three models (seeded)."""
    rng = random.Random(seed)
    return [[Req(rng.choice(MODELS), stream=rng.random() < stream_share, max_tokens=rng.randint(2, 8))
             for _ in range(per_client)] for _ in range(clients)]


def send(proxy: LiteLLMProxy, per_client: List[List[Req]]) -> List[FleetOutcome]:
    return asyncio.run(run_clients(proxy.base, proxy.key, per_client))


def settle(fleet: Fleet) -> None:
    """Warm-up through the routed proxy until each model is awake on its own host."""
    def one_per_host() -> bool:
        outcomes = send(fleet.routed, [[Req(m, max_tokens=2)] for m in MODELS])
        assert not problems(outcomes), problems(outcomes)
        where = fleet.awake_map()
        return all(len(v) == 1 for v in where.values()) and len({v[0] for v in where.values()}) == len(MODELS)

    wait_until("each model awake on a host of its own", one_per_host, SETTLE)
    time.sleep(4 * fleet.routed.refresh_s)  # the proxy's view catches up (not a timing assertion)


def assert_clean(outcomes: List[FleetOutcome], sent: int) -> None:
    found = problems(outcomes)
    assert len(outcomes) == sent
    assert not found, f"{len(found)} problems in {sent} requests:\n" + "\n".join(found[:20])


def test_mixed_load_loses_nothing_and_runs_without_switches(fleet: Fleet) -> None:
    settle(fleet)
    before = fleet.switches()
    awake = fleet.awake_map()
    outcomes = send(fleet.routed, mixed(seed=17))
    assert_clean(outcomes, CLIENTS * PER_CLIENT)
    assert fleet.switches() - before == 0, f"switches during the steady phase; awake before: {awake}"
    served = hosts_by_model(outcomes)
    assert served == {m: {awake[m][0]: sum(1 for o in outcomes if o.req.model == m)} for m in MODELS}


def test_default_routing_switches_where_the_hook_does_not(fleet: Fleet) -> None:
    """The same load through LiteLLM's default routing (simple-shuffle) on the same hosts."""
    settle(fleet)
    before = fleet.switches()
    outcomes = send(fleet.default, mixed(seed=17))
    assert_clean(outcomes, CLIENTS * PER_CLIENT)
    default_switches = fleet.switches() - before
    served = hosts_by_model(outcomes)
    assert default_switches > 0 and all(len(per) > 1 for per in served.values()), (default_switches, served)


def test_a_host_that_dies_is_routed_around_and_used_again_once_back(fleet: Fleet) -> None:
    settle(fleet)
    victim = next(h for h in fleet.hosts if h.awake())
    its_model = victim.awake()[0]
    rng = random.Random(5)

    async def scenario() -> Dict[str, List[FleetOutcome]]:
        loop = asyncio.get_running_loop()
        phases: Dict[str, List[FleetOutcome]] = {}

        def load(n: int) -> "asyncio.Future[List[FleetOutcome]]":
            per_client = [[Req(rng.choice(MODELS), max_tokens=4) for _ in range(n)] for _ in range(3)]
            return asyncio.ensure_future(run_clients(fleet.routed.base, fleet.routed.key, per_client))

        during = load(40)
        await asyncio.sleep(0.5)  # let requests be in flight on every host, the victim's included
        await loop.run_in_executor(None, victim.kill)
        phases["kill"] = await during
        phases["down"] = await load(10)
        await loop.run_in_executor(None, victim.start)
        served_again: List[FleetOutcome] = []
        deadline = time.monotonic() + SETTLE
        while not any(o.host == victim.url for o in served_again) and time.monotonic() < deadline:
            served_again.extend(await load(5))
        phases["back"] = served_again
        return phases

    phases = asyncio.run(scenario())
    everything = [o for p in phases.values() for o in p]
    assert_clean(everything, len(everything))
    down = phases["down"]
    assert down and all(o.host != victim.url for o in down), "requests went to the dead host"
    assert any(o.req.model == its_model for o in down), "the dead host's model was not asked for"
    assert any(o.host == victim.url for o in phases["back"]), "the restarted host never served again"
