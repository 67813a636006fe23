"""Switching policies: fifo, cost_aware, time_slice (see base.py for the protocol)."""

from __future__ import annotations

from typing import Any

from llmuxd.policies.base import NOW, SKIP, Decision, Policy, PolicyContext, TickContext
from llmuxd.policies.cost_aware import CostAwarePolicy
from llmuxd.policies.costs import SwitchCosts
from llmuxd.policies.fifo import FifoPolicy
from llmuxd.policies.time_slice import TimeSlicePolicy

POLICY_TYPES = ("fifo", "cost_aware", "time_slice")


def make_policy(policy_config: Any, costs: SwitchCosts) -> Policy:
    """Build the policy named by `policy_config.type` with its parameters."""
    kind = policy_config.type
    if kind == "fifo":
        return FifoPolicy(drain_before_switch=policy_config.drain_before_switch, max_wait=policy_config.max_wait)
    if kind == "cost_aware":
        return CostAwarePolicy(
            costs,
            coalesce_window=policy_config.coalesce_window,
            amortization_factor=policy_config.amortization_factor,
            max_wait=policy_config.max_wait,
        )
    if kind == "time_slice":
        return TimeSlicePolicy(
            tick_interval=policy_config.tick_interval,
            min_quantum=policy_config.min_quantum,
            max_wait=policy_config.max_wait,
        )
    raise ValueError(f"unknown policy type '{kind}'; allowed: {', '.join(POLICY_TYPES)}")


__all__ = [
    "NOW", "SKIP", "Decision", "Policy", "PolicyContext", "TickContext", "SwitchCosts",
    "FifoPolicy", "CostAwarePolicy", "TimeSlicePolicy", "make_policy", "POLICY_TYPES",
]
