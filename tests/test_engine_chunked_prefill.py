"""Seeded requests whose prompt is prefilled in chunks (vLLM's CPU build crashes on them unpatched)."""

from __future__ import annotations

import pytest

PROMPT = [(5 * i) % 46 + 2 for i in range(100)]  # 100 tokens: four chunks of at most 32
SJDPP = {"method": "sjdpp", "num_speculative_tokens": 6}


@pytest.fixture(scope="module")
def engines(make_engine, tiny_llama_path):
    whole = make_engine(tiny_llama_path, speculative_config=SJDPP)
    return whole, make_engine(tiny_llama_path, speculative_config=SJDPP, max_num_batched_tokens=32, max_num_seqs=4)


@pytest.mark.parametrize("extra_args", [None, {"sjdpp_disable": True}], ids=["sjdpp", "plain"])
def test_seeded_output_does_not_depend_on_chunking(engines, extra_args):
    from vllm import SamplingParams

    whole, chunked = engines

    def run(llm):
        params = [
            SamplingParams(temperature=1.0, top_k=8, max_tokens=24, seed=s, ignore_eos=True,
                           detokenize=False, extra_args=extra_args)
            for s in range(3)
        ]
        outs = llm.generate([{"prompt_token_ids": PROMPT}] * 3, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    expected = run(whole)
    assert run(chunked) == expected
    assert len(set(map(tuple, expected))) == 3  # the seeds matter: not a degenerate output
