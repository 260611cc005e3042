"""Guidance under chunked prefill and preemption: the branches still equal plain engines.

A guided SJD++ engine with 8 KV blocks (two requests' worth at full length) and 40 tokens per
step: prompts are prefilled in chunks, requests are preempted and resumed mid-window.
"""

from __future__ import annotations

import pytest

from guided_engine import ENGINE, PLAIN_LLAMA, assert_branch, branch_logprobs, hf_greedy, params, tokens, uncond

PROMPTS = [[0] + [(3 * i + j) % 40 + 2 for i in range(60)] for j in range(4)]  # 61 tokens: 2 chunks
MAX_TOKENS = 90


@pytest.fixture(scope="module")
def engines(make_engine, tiny_guided_path):
    from transformers import LlamaForCausalLM

    plain_llama = make_engine(tiny_guided_path, max_model_len=160, **PLAIN_LLAMA)
    # Created last: vLLM's metrics registry is per process, the newest engine's counters are read.
    tight = make_engine(
        tiny_guided_path, speculative_config={"method": "sjdpp", "num_speculative_tokens": 6}, max_model_len=160,
        num_gpu_blocks_override=8, block_size=32, max_num_batched_tokens=40, max_num_seqs=8, **ENGINE,
    )
    hf_model = LlamaForCausalLM.from_pretrained(tiny_guided_path).eval()
    hf_model.generation_config.eos_token_id = None
    return plain_llama, tight, hf_model


def _preemptions(llm) -> float:
    return next(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_branches_survive_chunked_prefill_and_preemption(engines):
    """The cond branch (scale 1) and the uncond branch (scale 0), four prompts each, in one batch."""
    plain_llama, tight, _ = engines
    before = _preemptions(tight)
    got = branch_logprobs(tight, PROMPTS * 2, [1.0] * 4 + [0.0] * 4, MAX_TOKENS)
    assert _preemptions(tight) > before, "the test must really preempt"
    assert_branch(got, branch_logprobs(plain_llama, PROMPTS + [uncond(p) for p in PROMPTS], max_tokens=MAX_TOKENS))


def test_guided_greedy_under_preemption_equals_transformers(engines):
    _, tight, hf_model = engines
    before = _preemptions(tight)
    greedy = params(temperature=0, max_tokens=MAX_TOKENS, extra_args={"guidance_scale": 3.0})
    outs = tight.generate([{"prompt_token_ids": p} for p in PROMPTS * 2], greedy, use_tqdm=False)
    assert _preemptions(tight) > before
    expected = [hf_greedy(hf_model, p, 3.0, n=MAX_TOKENS) for p in PROMPTS]
    assert tokens(outs) == expected * 2
