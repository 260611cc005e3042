"""The SJD++ step's memory (engine/step_memory.py): what the step holds at real vocabularies,
measured, against the reserve kept out of the KV cache, and the cap on a pass's drafts.

The measure: every tensor the step's code allocates, counted by a dispatch mode from its creation
until its last reference goes (its storage's bytes), the maximum over the step.  The pipeline is
the step's own code at Emu3's vocabulary (184622, with its guidance scale and top-k) and
Janus-Pro's (16384): the guided head's output of both branches in bfloat16 through
`guided_logits`, a copy for logprobs, vLLM's top-k / top-p (top-p sorts), the probabilities, the
two q-row buffers and the Gumbel-coupled step.  The race noise is made outside the count and
added at its size (4 bytes per element: on CUDA the Triton kernel allocates its output only; on
CPU eager int64 temporaries would be counted that a GPU never holds)."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vllm_sjdpp.engine.step_memory import max_drafts, pass_drafts, step_memory_bytes

EMU3_VOCAB, JANUS_CODES = 184622, 16384


class LiveBytes(TorchDispatchMode):
    """The most bytes of tensors alive at once among those created inside the mode."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, list[int]] = {}  # storage address: [tensors referring to it, bytes]

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                key = t.untyped_storage().data_ptr()
                if key not in self.refs:
                    self.refs[key] = [0, t.untyped_storage().nbytes()]
                    self.live += self.refs[key][1]
                    self.peak = max(self.peak, self.live)
                self.refs[key][0] += 1
                weakref.finalize(t, self._release, key)
        return out


def step_peak_bytes(vocab: int, requests: int, drafts: int, top_p: float = 0.9, dtype=torch.bfloat16) -> int:
    """The step's peak for `requests` requests verifying `drafts` drafts in all (shared evenly)."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    from vllm_sjdpp.families.rule import UnconditionalRule
    from vllm_sjdpp.guidance.cfg import GuidanceBatch, ServedGuidance
    from vllm_sjdpp.guidance.llama import guided_logits
    from vllm_sjdpp.kernels import FreshTokens, StepBatch, StepNoise, sjdpp_step

    counts = np.full(requests, drafts // requests) + (np.arange(requests) < drafts % requests)
    rows, hidden = requests + drafts, 8
    guidance = GuidanceBatch(ServedGuidance(UnconditionalRule(frozenset(), 0), 3.0, vocab), rows, "cpu")
    keys = {i: (i, 10) for i in range(requests)}
    noise = StepNoise.sample_per_request((counts + 1).tolist(), counts.tolist(), vocab, {}, "cpu", keys=keys)
    fresh = FreshTokens.build(["random"] * requests, [range(vocab)] * requests, np.zeros((requests, 1), np.int64))
    drafts_ids = np.random.default_rng(0).integers(0, vocab, drafts)
    meter = LiveBytes()
    with meter, torch.no_grad():
        states = torch.cat([torch.randn(rows, 2 * hidden), GuidanceBatch.index_columns(rows, torch.float32, "cpu")], -1)
        head = lambda h: torch.randn(h.shape[0], vocab, dtype=dtype)  # noqa: E731  the head's output
        logits = guided_logits(states, hidden, head, guidance)
        raw = logits.clone()  # noqa: F841  kept for logprobs
        processed = apply_top_k_top_p(logits.float(), torch.full((rows,), 2048), torch.full((rows,), top_p))
        probs = processed.softmax(-1, dtype=torch.float32)
        proposals = torch.rand(drafts, vocab)
        next_proposals = torch.empty(drafts, vocab)
        batch = StepBatch(
            cu_num_draft_tokens=np.cumsum(counts), target_probs=probs, draft_token_ids=drafts_ids,
            draft_probs=proposals, draft_is_onehot=np.zeros(drafts, bool), greedy=np.zeros(requests, bool),
            reuse=np.ones(requests, np.int64), threshold=np.full(requests, 0.5, np.float32),
            next_window_len=counts, draft_prob_rows=np.arange(drafts), gumbel=np.ones(requests, bool),
        )
        sjdpp_step(batch, noise, fresh, next_probs_out=next_proposals)
    return meter.peak + int(np.prod(noise.shape)) * 4


@pytest.mark.parametrize("vocab, requests, gib, dtype", [
    (EMU3_VOCAB, 2, 0.25, torch.bfloat16), (JANUS_CODES, 16, 0.25, torch.bfloat16),
    (EMU3_VOCAB, 2, 0.25, torch.float32),  # a model served in float32 (a CPU without native bf16)
])
def test_the_reserve_holds_the_step_at_real_vocabularies(vocab, requests, gib, dtype):
    """The largest pass the budget allows (its drafts capped by `step_memory_gib`, here small to
    keep the test's memory low; the bytes per row element do not depend on the rows): measured
    peak <= reserve <= the budget.  The broken variant, the reserve before this (5 float32 rows
    per position), is short of the measured peak: it left out the sort and guidance's temporaries."""
    drafts = pass_drafts(requests, 8192, 32, "auto", max_drafts(gib, requests, vocab, dtype))
    assert 0 < drafts < requests * 32  # the cap binds
    peak = step_peak_bytes(vocab, requests, drafts, dtype=dtype)
    reserve = step_memory_bytes(requests, 8192, drafts, vocab, dtype)
    assert peak <= reserve <= gib * 2**30, (peak / reserve, reserve / 2**30)
    old_reserve = 4 * vocab * (5 * (requests + drafts) + 2 * drafts + requests)
    assert old_reserve < peak


def test_emu3_at_vllms_default_batch_is_capped_to_the_budget():
    """256 sequences, windows of 32, --max-num-batched-tokens 8192: 56 GiB uncapped; the default
    2 GiB allows 60 drafts a pass (every window at 8 sequences)."""
    uncapped = step_memory_bytes(256, 8192, pass_drafts(256, 8192, 32, "auto", 10**9), EMU3_VOCAB)
    cap = max_drafts(2.0, 256, EMU3_VOCAB)
    assert uncapped > 50 * 2**30 and cap == 60
    assert step_memory_bytes(256, 8192, pass_drafts(256, 8192, 32, "auto", cap), EMU3_VOCAB) <= 2 * 2**30
    assert pass_drafts(8, 8192, 32, "auto", max_drafts(2.0, 8, EMU3_VOCAB)) == 8 * 32
