"""Shrinking windows as the batch grows: a cap on the draft tokens of one forward pass.

A pass over B requests with windows of k computes B * (k + 1) positions.  Where the hardware is
already busy at B positions (a CPU, or a GPU at high concurrency) the extra positions cost about
what they are worth or more, so the drafts of a step are held to a budget, shared out by water
filling: every request gets min(wanted, c) drafts with c the largest cap that fits the budget,
so that requests near their end, which want fewer, leave their share to the others.

Exactness does not depend on the window length, only on how each draft is verified, and the
lengths here depend on the batch alone, never on sampled values.
"""

from __future__ import annotations


def share_draft_budget(wanted: list[int], budget: int | None) -> list[int]:
    """Window lengths no longer than `wanted`, summing to at most `budget` (None: no cap).

    The cap c is the largest with sum(min(w, c)) <= budget; what the cap leaves of the budget
    goes one draft each to the first requests that want more than c.
    """
    if budget is None or sum(wanted) <= budget:
        return list(wanted)
    remaining, ascending = budget, sorted(wanted)
    for i, w in enumerate(ascending):
        unserved = len(ascending) - i
        if w * unserved > remaining:  # not everyone left can have w
            cap = remaining // unserved
            break
        remaining -= w
    lengths = [min(w, cap) for w in wanted]
    spare = budget - sum(lengths)
    for i, w in enumerate(wanted):
        if spare and w > cap:
            lengths[i] += 1
            spare -= 1
    return lengths
