"""Invariants I1-I7 under randomised interleavings (seeded, so a failure is replayable).

Each seed builds a random config (one group, two groups, or a shared memory
budget; any policy; edge-ish parameters), random backend delays, and a random
mix of requests, cancellations, injected sleep/wake failures, backend deaths and
control calls, all on a virtual clock. Every run checks:

- I1: FakeBackends never saw a group over its budget;
- I2: a lease is only ever granted on a model that is awake and not draining;
- I3: every request is answered (lease or typed error) by its deadline;
- I4: in-flight counts and queues are back to zero at the end;
- every client and the chaos task end with nothing or a cancellation: any
  other exception (one the switcher's contract does not allow) fails the seed;
- I5: after failures are healed, every model is served again;
- I6/I7: control calls go through the same worker; stale switches are skipped
  (counted: the test fails if no seed ever exercised the skip).

Replay one seed: `pytest tests/test_switcher_invariants.py -k 'seed_block' ...` or
call `scenario(seed)` from a shell.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any, Dict, List

import pytest
from fakes import FakeBackends, make_config, run_virtual

from llmuxd.errors import LLMuxError, ModelPinned, QueueFull, SwitchFailed, SwitchTimeout
from llmuxd.switcher import Switcher

SEEDS_PER_BLOCK = 50
BLOCKS = 8  # 400 random sequences per run
EPS = 1e-6
ANSWERS = (SwitchTimeout, SwitchFailed, QueueFull, ModelPinned)


def random_config(rng: random.Random) -> Any:
    names = [f"m{i}" for i in range(rng.randint(2, 4))]
    layout = rng.choice(["one", "two", "budget"])
    models: Dict[str, Dict[str, Any]] = {}
    groups: Dict[str, Dict[str, Any]] = {}
    for i, name in enumerate(names):
        if layout == "two" and i % 2:
            models[name] = {"gpu_group": "g2"}
            groups["g2"] = {}
        elif layout == "budget":
            models[name] = {"gpu_group": "big", "gpu_memory_gib": rng.choice([10, 15, 20])}
            groups["big"] = {"budget_gib": 30}
        else:
            models[name] = {}
    policy = {
        "type": rng.choice(["fifo", "cost_aware", "time_slice"]),
        "min_active": rng.choice([0, 1, 5]),
        "drain_timeout": rng.choice([0, 2, 60]),
        "drain_before_switch": rng.random() < 0.9,
        "request_timeout": rng.choice([3, 20, 60]),
        "failure_backoff": rng.choice([0, 2]),
        "queue_limit": rng.choice([3, 1000]),
        "max_wait": rng.choice([0, 1, 15]),
        "min_quantum": rng.choice([0, 2]),
        "coalesce_window": rng.choice([0, 2]),
        "wake_timeout": rng.choice([4, 120]),
        "sleep_timeout": rng.choice([4, 120]),
    }
    return make_config(models, policy=policy, groups=groups)


async def run_scenario(seed: int, stats: Dict[str, int]) -> None:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    config = random_config(rng)
    names = list(config.models)
    backends = FakeBackends(config)
    for op in ("start", "wake", "sleep", "stop"):
        for name in names:
            backends.set_delay(op, rng.choice([0, 0.5, 2, 6]) if op != "stop" else rng.choice([0, 0.2]), name)
    switcher = Switcher(config, backends, clock=loop.time)
    await switcher.start()
    problems: List[str] = []
    request_timeout = config.policy.request_timeout
    audit = {"on": True}
    real_endpoint = backends.endpoint

    def audited_endpoint(model: str) -> str:
        # the switcher asks for the endpoint exactly when it creates leases: I2 is checked there
        if audit["on"]:
            state = switcher._models[model].state.value
            if state != "active" or backends.state(model).value != "ready":
                problems.append(f"seed {seed}: lease on {model} while switcher={state}, backend={backends.state(model)}")
        return real_endpoint(model)

    backends.endpoint = audited_endpoint  # type: ignore[method-assign]

    async def client(i: int) -> None:
        await asyncio.sleep(rng.uniform(0, 40))
        model = rng.choice(names)
        timeout = rng.choice([None, None, 0, 1, 5, 30])
        limit = request_timeout if timeout is None else timeout
        t0 = loop.time()
        try:
            lease = await switcher.acquire(model, timeout)
        except ANSWERS as exc:
            if loop.time() - t0 > max(limit, 0) + EPS:
                problems.append(f"seed {seed}: {model} answered {type(exc).__name__} after {loop.time() - t0} > {limit}")
            return
        if loop.time() - t0 > max(limit, 0) + EPS:
            problems.append(f"seed {seed}: {model} lease after {loop.time() - t0} > {limit}")
        try:
            await asyncio.sleep(rng.choice([0, 0.1, 1, 3]))
        finally:
            lease.release()
            if rng.random() < 0.1:
                lease.release()  # double release: harmless

    tasks = [loop.create_task(client(i)) for i in range(rng.randint(10, 30))]

    async def chaos() -> None:
        for _ in range(rng.randint(0, 8)):
            await asyncio.sleep(rng.uniform(0, 8))
            action = rng.random()
            model = rng.choice(names)
            try:
                if action < 0.2:
                    rng.choice(tasks).cancel()
                elif action < 0.35:
                    backends.fail(rng.choice(["start", "wake", "sleep"]), model, "chaos", times=rng.choice([1, 2]))
                elif action < 0.45:
                    if backends.state(model).value == "ready":
                        backends.kill(model, "chaos")
                elif action < 0.6:
                    await switcher.switch(model, wait=rng.random() < 0.5, timeout=rng.choice([None, 2]))
                elif action < 0.7:
                    await switcher.sleep_model(model, rng.choice([None, "discard+keep_running", "retain+stop"]))
                elif action < 0.8:
                    await switcher.pin(model)
                    await asyncio.sleep(rng.uniform(0, 5))
                    await switcher.unpin()
                elif action < 0.85:
                    audit["on"] = False
                    switcher.status()
                    audit["on"] = True
                elif action < 0.9:
                    await switcher.set_mode(rng.choice(["auto", "manual"]))
                else:
                    switcher.set_eviction(model, rng.choice([None, "discard+keep_running", "retain+stop"]))
            except LLMuxError:
                pass

    chaos_task = loop.create_task(chaos())
    results = await asyncio.gather(*tasks, chaos_task, return_exceptions=True)
    # a client ends with None or its cancellation (chaos cancels some); anything
    # else escaped the switcher's error contract and is a bug, never noise
    problems += [f"seed {seed}: task ended with {type(r).__name__}: {r}" for r in results
                 if r is not None and not isinstance(r, asyncio.CancelledError)]
    for op in ("start", "wake", "sleep", "stop"):
        for name in names:
            backends.heal(op, name)
            backends.set_delay(op, 0.1, name)  # within any wake_timeout
    await switcher.unpin()
    for name in names:  # I5: everything is served again
        await asyncio.sleep(config.policy.failure_backoff)
        lease = await switcher.acquire(name, timeout=10_000)
        lease.release()
    audit["on"] = False  # status() asks for endpoints too
    status = switcher.status()
    for name, ms in status.models.items():
        if ms.in_flight or ms.queue_depth:
            problems.append(f"seed {seed}: {name} ends with in_flight={ms.in_flight} queue={ms.queue_depth}")
    problems += [f"seed {seed}: {v}" for v in backends.violations]
    for g in switcher._groups.values():
        stats["skipped"] += g.skipped_switches
    stats["switches"] += backends.count("start") + backends.count("wake")
    await switcher.close()
    assert not problems, "\n".join(problems[:10])


def scenario(seed: int) -> Dict[str, int]:
    stats = {"skipped": 0, "switches": 0}
    run_virtual(lambda: run_scenario(seed, stats))
    return stats


@pytest.mark.parametrize("block", range(BLOCKS), ids=[f"seed_block{b}" for b in range(BLOCKS)])
def test_invariants_hold_under_random_interleavings(block):
    totals = {"skipped": 0, "switches": 0}
    for seed in range(block * SEEDS_PER_BLOCK, (block + 1) * SEEDS_PER_BLOCK):
        for key, value in scenario(seed).items():
            totals[key] += value
    assert totals["switches"] > SEEDS_PER_BLOCK  # the sequences really switch


def test_some_random_sequence_exercises_the_stale_switch_skip():
    assert sum(scenario(seed)["skipped"] for seed in range(40)) > 0


def test_an_unexpected_exception_in_a_client_fails_the_run(monkeypatch):
    """The fuzz must not swallow what it does not expect: one acquire()
    raising something that is neither an answer nor a cancellation fails
    the seed, naming the exception."""
    real_acquire = Switcher.acquire
    calls = {"n": 0}

    async def acquire_once_broken(self, model, timeout=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("an unexpected bug in acquire")
        return await real_acquire(self, model, timeout)

    monkeypatch.setattr(Switcher, "acquire", acquire_once_broken)
    with pytest.raises(AssertionError, match="RuntimeError: an unexpected bug in acquire"):
        scenario(0)
