"""Interactive before batch: the two rules every policy applies on top of its own.

A request's priority comes from its API key (llmuxd/priority.py); the switcher
counts waiters and leases by priority and hands the counts to the policies in
their contexts. The rules:

- **batch yields** — a target whose waiters are all batch does not evict a
  model with interactive requests in flight or queued, nor go ahead of
  interactive requests waiting for another model. It is re-asked every
  `BATCH_RECHECK_S` (an interactive burst ending frees the GPU without any
  event the policy sees) and stops yielding once its oldest request has waited
  `max_wait`: the same staleness bound as any request, so batch is never
  starved (and `request_timeout` still bounds every wait). Among stale
  requests the oldest goes first, batch or not: were stale interactive ones
  always first, two interactive models that never idle would take turns
  forever.
- **interactive preempts batch** — an interactive target facing a model that
  serves only batch work does not wait for that work to finish, nor for a
  serving window or queue threshold that exists to amortize switches between
  equals; the batch requests in flight are drained, not cut off.

Pure functions of the contexts, like the policies (DESIGN.md §2).
"""

from __future__ import annotations

from llmuxd.policies.base import AwakeModel, Decision, PolicyContext, WaitingModel

#: how often a yielding batch target is re-asked (the scheduler tick's default)
BATCH_RECHECK_S = 0.5


def batch_yields(ctx: PolicyContext, max_wait: float) -> bool:
    """A batch-only target must wait: interactive work holds or wants the GPU, and it is not stale."""
    if ctx.target_queue_depth == 0 or ctx.target_interactive_depth > 0:
        return False
    if ctx.oldest_wait >= max_wait:
        return False
    return ctx.active_interactive > 0 or ctx.others_interactive_depth > 0


def batch_recheck(ctx: PolicyContext, max_wait: float) -> Decision:
    """The deferral of a yielding batch target: ask again soon, and no later than when it goes stale."""
    return Decision.defer(min(BATCH_RECHECK_S, max_wait - ctx.oldest_wait))


def interactive_preempts(ctx: PolicyContext) -> bool:
    """An interactive target and an active model whose only work is batch.

    An idle active model is not covered: between equals the policy's own rules
    apply, so a deployment without batch keys behaves exactly as before."""
    batch_work = ctx.active_batch_in_flight + ctx.active_batch_queue_depth
    return ctx.active is not None and ctx.target_interactive_depth > 0 and ctx.active_interactive == 0 and batch_work > 0


def yields_to_interactive(a: AwakeModel, min_quantum: float) -> bool:
    """An awake model a tick may take for interactive waiters: it has had its quantum and
    serves no interactive request (idle, or batch only: that batch work is drained)."""
    return a.interactive == 0 and a.active_duration >= min_quantum


def interactive_rank(w: WaitingModel) -> tuple:
    """Sort key among models with interactive waiters: deeper interactive queue, older, name."""
    return (-w.interactive_depth, -w.oldest_wait, w.name)


