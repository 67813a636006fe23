"""Who must make room, and how long a request would wait: pure functions over
the switcher's records (llmuxd/switching/state.py) and the learned switch
costs. Below the state machine so that the records, the status snapshot and
the machine itself all read the same answer without importing the machine."""

from __future__ import annotations

import math
from typing import List, Optional, Protocol

from llmuxd.policies import SwitchCosts
from llmuxd.switching.demand import interactive_work
from llmuxd.switching.state import GroupRuntime, ModelRuntime, ModelState

class PolicySettings(Protocol):
    """What wait_estimate reads of the policy config (PolicyConfig has both)."""

    min_active: float
    failure_backoff: float


#: budget arithmetic tolerance (GiB) so that 10.1 + 19.9 fits in 30
BUDGET_EPS = 1e-6


def memory_gib(g: GroupRuntime, m: ModelRuntime) -> float:
    """What `m` takes of its group's budget (all of it without a budget or a size)."""
    if g.budget_gib is None:
        return math.inf
    return m.memory_gib if m.memory_gib is not None else g.budget_gib


def plan_victims(g: GroupRuntime, target: ModelRuntime, pinned: Optional[str]) -> List[ModelRuntime]:
    """Which awake models must go so that `target` fits: none if it fits already;
    otherwise idle before busy, the pinned one last, least recently used first."""
    awake = [a for a in g.awake if a is not target]
    if not awake:
        return []
    if g.budget_gib is None:
        return awake
    need = memory_gib(g, target)
    used = sum(memory_gib(g, a) for a in awake)
    if used + need <= g.budget_gib + BUDGET_EPS:
        return []
    victims: List[ModelRuntime] = []
    # idle first, then busy with batch work only, then with interactive work
    for a in sorted(awake, key=lambda a: (a.busy, interactive_work(a), a.name == pinned, a.last_used)):
        victims.append(a)
        used -= memory_gib(g, a)
        if used + need <= g.budget_gib + BUDGET_EPS:
            break
    return victims


def wait_estimate(
    g: GroupRuntime,
    m: ModelRuntime,
    victims: List[ModelRuntime],
    costs: SwitchCosts,
    policy: PolicySettings,
    now: float,
) -> float:
    """Seconds until `m` would serve a new request: 0 when awake, else the learned
    switch costs of the switches ahead of it (the one running, the models wanted
    before it, its own) plus any cooldown (`min_active`) or backoff left.
    `victims` is what `plan_victims` says must make room for `m`."""
    if m.state is ModelState.ACTIVE:
        return 0.0
    own = costs.estimate(victims[0].name if victims else None, m.name)
    if g.switching is not None:
        evicted, to = g.switching
        elapsed = now - (g.switch_started_at or now)
        if to == m.name:
            return max(0.0, own - elapsed)
        running = costs.estimate(evicted[0] if evicted else None, to) if to else 0.0
        estimate = max(0.0, running - elapsed) + own
    else:
        estimate = own
    ahead = list(g.wanted)
    if m.name in ahead:
        ahead = ahead[: ahead.index(m.name)]
    for name in ahead:
        estimate += costs.estimate(None, name) if name != m.name else 0.0
    for v in victims:
        if v.activated_at is not None:
            estimate += max(0.0, v.activated_at + policy.min_active - now)
            break
    if g.last_failure is not None:
        estimate += max(0.0, g.last_failure + policy.failure_backoff - now)
    return estimate

