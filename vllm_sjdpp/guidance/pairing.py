"""Paired requests: guidance with an unconditional context in a sequence of its own.

A stacked sequence runs both branches at the same positions (`cfg`), so its unconditional prompt
must have the prompt's length.  A request whose negative prompt has another length (Emu3's
documented one, any user's), and in the paired layout every guided request, runs as two
sequences instead: the request P, and a companion U
whose prompt is the negative prompt.  The scheduler (`patches.scheduler.PairedScheduler`) adds
U with P, keeps them in step and ends them together; the model runner combines, at every row P
samples, P's conditional logits with U's logits at the same place in the generated stream:

    l = l_U + s * (l_P - l_U)

exactly what transformers' unbatched guidance computes (the negative prompt with its own cache,
at its own length).  U samples nothing of its own: it takes P's tokens, and the scheduler hands
it P's drafts, so both sequences always hold the same generated tokens.

A step is joint when both members are in the batch and both reach the end of what they hold
(the row that samples).  The scheduler never lets a member alone past that point on purpose;
when the token budget or a preemption splits a pair anyway, the member that ran alone is
discarded by the runner (its sampled tokens dropped, as vLLM drops a partial prefill's) and the
scheduler rolls it back.  Both sequences keep their own paged KV, so a negative prompt shared by
many requests is cached once, whatever their prompts.

With both branches in a sequence (the "stacked" layout of `cfg`), each member still runs both,
one of them unread: a paired image costs twice what guidance costs.  With one branch per
sequence (the "paired" layout, Emu3's and Lumina-mGPT's default), each member runs its own
tokens once, and every guided request pairs: a pair costs what guidance costs.
"""

from __future__ import annotations

import copy
from typing import Any

# In the companion's SamplingParams.extra_args, COMPANION_OF_KEY: the request id of the request
# it guides.
from ..config import COMPANION_OF_KEY

COMPANION_SUFFIX = "::uncond"


def companion_id(req_id: str) -> str:
    return req_id + COMPANION_SUFFIX


def companion_of(extra_args: dict | None) -> str | None:
    """The request a companion guides; None for any other request."""
    return (extra_args or {}).get(COMPANION_OF_KEY)


def needs_companion(prompt: list[int] | None, negative: list[int] | None, scale: float, one_branch: bool) -> bool:
    """Whether an unconditional prompt runs as a sequence of its own: with both branches in a
    sequence, when it has another length than the prompt; with one branch per sequence, whenever
    the request is guided (scale 1 is the conditional model alone)."""
    if negative is None or prompt is None:
        return False
    return scale != 1 if one_branch else len(negative) != len(prompt)


# What a companion does not take from its request: options that act on what a sequence samples
# or reports (a companion's logits reach its request before any of them, and its samples are
# replaced by the request's), state kept per request (grammars, logits processors reading
# extra_args, KV transfers in extra_args), and log probabilities.
COMPANION_DROPS = {
    "structured_outputs": None, "logit_bias": None, "allowed_token_ids": None, "bad_words": None,
    "_bad_words_token_ids": None, "logprobs": None, "prompt_logprobs": None, "logprob_token_ids": None,
    "prompt_logprob_token_ids": None, "watermarking": None, "repetition_detection": None,
    "thinking_token_budget": None, "trace_decode_token_ids": None,
}


def companion_params(params: Any, req_id: str) -> Any:
    """The companion's SamplingParams: the request's stop conditions and length (so it ends when
    the request does) and sampling (so the batch samples as it would without it), none of
    COMPANION_DROPS, and extra_args of its own: marked as the companion of `req_id`, decoded
    plainly (its drafts are the request's)."""
    companion = copy.copy(params)
    for name, value in COMPANION_DROPS.items():
        if hasattr(companion, name):
            setattr(companion, name, value)
    companion.extra_args = {COMPANION_OF_KEY: req_id, "sjdpp_disable": True}
    return companion


def stream_window(num_computed: int, num_scheduled: int, num_tokens: int) -> int:
    """How many of a sequence's scheduled tokens sit at or past its last committed token: the rows
    that sample (1 + the drafts); 0 for a partial prefill.  `num_computed` is the count before
    the step, `num_tokens` the prompt and the committed output."""
    return max(num_computed + num_scheduled - (num_tokens - 1), 0)
