"""A KV cache too small for the batch: vLLM preempts and resumes requests mid-window."""

from __future__ import annotations

import pytest

PROMPTS = [[2 + i, 3 + i, 4 + i] for i in range(8)]
MAX_TOKENS = 90


@pytest.fixture(scope="module")
def engines(make_engine, tiny_llama_path):
    reference = make_engine(tiny_llama_path, max_model_len=128)
    # 6 blocks of 32 tokens hold about two of the eight requests at full length. Created last:
    # vLLM's metrics registry is per process, and the newest engine's counters are the ones read.
    small = make_engine(tiny_llama_path, max_model_len=128, speculative_config="sjdpp", num_gpu_blocks_override=6,
                        block_size=32)
    return small, reference


def test_preempted_requests_complete_and_stay_exact(engines):
    from vllm import SamplingParams

    small, reference = engines
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    outs = small.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy, use_tqdm=False)
    expected = reference.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == [list(o.outputs[0].token_ids) for o in expected]
    preemptions = next(m.value for m in small.get_metrics() if m.name == "vllm:num_preemptions")
    assert preemptions > 0, "the test must really preempt"
    sampled = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    outs = small.generate([{"prompt_token_ids": p} for p in PROMPTS], sampled, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs)


def test_preempted_seeded_requests_keep_their_seeds_tokens(engines):
    """Seeded requests preempted mid-window give plain decoding's tokens for their seeds."""
    from vllm import SamplingParams

    small, _ = engines

    def seeded(extra_args):
        params = [SamplingParams(temperature=1.0, top_k=8, max_tokens=MAX_TOKENS, seed=s, ignore_eos=True,
                                 detokenize=False, extra_args=extra_args) for s in range(len(PROMPTS))]
        outs = small.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    expected = seeded({"sjdpp_disable": True})
    before = next(m.value for m in small.get_metrics() if m.name == "vllm:num_preemptions")
    assert seeded(None) == expected
    assert next(m.value for m in small.get_metrics() if m.name == "vllm:num_preemptions") > before
