"""Whether a switch may move both models' weights at once (issue #26), pure.

A sequential switch costs sleep(A) + wake(B). On a GPU both halves are copies
over the host link, which carries both directions at once, so the switch can
cost about the larger half instead:

    drain A -> pause A, release its KV cache -> in parallel { A's weights out,
    B's weights in } -> B's KV cache -> B's scheduling -> serve

That is only allowed where the group's budget holds at *every instant*,
failures included. Memory in transit counts as held: B's weights are
reserved from the start of their copy, A's until the end of theirs. So at the
widest point the group holds the other awake models, A's weights and B's
weights, and that sum must fit the budget. A failure can only shrink it (a
failed step stops the model that failed), never grow it.

`plan_overlap` answers with the reason when it says no, because a person
reading the journal or `llmuxctl status` wants to know why a switch was not
hidden: the budget, an eviction that cannot move weights alone, or an engine
that refused a step (vLLM on the CPU refuses /release_kv_cache_memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from llmuxd.eviction import Eviction, overlap_problem as eviction_problem

#: what SwitchFinished.overlap says of a switch whose transfers overlapped
OVERLAPPED = "overlapped"
#: budget arithmetic tolerance (GiB), as planning.BUDGET_EPS
_EPS = 1e-6


@dataclass(frozen=True)
class Side:
    """One model of the switch as the plan sees it."""

    name: str
    #: the GiB of its weights (config `weights_gib`, or measured); None: unknown
    weights_gib: Optional[float]
    #: the eviction it sleeps with (A: the one about to be applied; B: the one it sleeps with)
    eviction: Optional[Eviction]
    #: why its engine refused a partial step before (learned), None if it never did
    refused: Optional[str] = None
    #: B only: asleep with vLLM sleep and its process running, so its weights can come back alone
    wakes_in_parts: bool = True


@dataclass(frozen=True)
class OverlapPlan:
    overlap: bool
    #: "overlapped", or the reason not: "off: ...", "budget: ...", "eviction: ...", "engine: ..."
    reason: str


def switch_summary(duration: float, phases: Dict[str, float], overlap: Optional[str], ok: bool = True) -> str:
    """One line for status pages: how the last switch went, phase by phase."""
    how = "overlapped" if overlap == OVERLAPPED else (f"sequential ({overlap})" if overlap else "sequential")
    parts = ", ".join(f"{k} {v:.2f}s" for k, v in phases.items())
    return ("" if ok else "FAILED: ") + f"{how} in {duration:.2f}s" + (f": {parts}" if parts else "")


def plan_overlap(
    mode: str,
    budget_gib: Optional[float],
    others_gib: float,
    victims: Sequence[Side],
    target: Side,
    *,
    partial_steps: bool = True,
) -> OverlapPlan:
    """Overlap this switch or not. `mode` is policy.overlap; `others_gib` is
    what the group's awake models that stay hold; `partial_steps` says the
    backends can do the partial steps at all (the orchestrator can)."""
    if mode == "off":
        return OverlapPlan(False, "off: policy.overlap is off")
    if not partial_steps:
        return OverlapPlan(False, "engine: the backends have no partial steps")
    for side in (*victims, target):
        if side.refused:
            return OverlapPlan(False, f"engine: {side.name} refused a step before ({side.refused})")
    for v in victims:
        problem = eviction_problem(v.eviction)
        if problem:
            return OverlapPlan(False, f"eviction: {v.name}: {problem}")
    problem = eviction_problem(target.eviction)
    if problem or not target.wakes_in_parts:
        return OverlapPlan(False, f"eviction: {target.name}: {problem or 'not asleep with vLLM sleep and its process running'}")
    if budget_gib is None:
        return OverlapPlan(False, "budget: the group has no budget_gib")
    unknown = [s.name for s in (*victims, target) if s.weights_gib is None]
    if unknown:
        return OverlapPlan(False, f"budget: the weights size of {', '.join(unknown)} is unknown (set weights_gib, or a GPU probe measures it at the model's first wake)")
    moving = sum(float(v.weights_gib or 0.0) for v in victims) + float(target.weights_gib or 0.0)
    if others_gib + moving > budget_gib + _EPS:
        parts = " + ".join(f"{s.name} {s.weights_gib:g}" for s in (*victims, target))
        held = f" + {others_gib:g} held by others" if others_gib else ""
        return OverlapPlan(False, f"budget: weights {parts} GiB{held} exceed budget_gib {budget_gib:g}")
    return OverlapPlan(True, OVERLAPPED)
