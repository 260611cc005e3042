"""Seeded requests whose prompt is prefilled in chunks (vLLM's CPU build crashes on them unpatched):
their tokens are plain decoding's for their seed, chunked or whole, with SJD++ or without, with or
without the CPU-only generator fix."""

from __future__ import annotations

import pytest

PROMPT = [(5 * i) % 46 + 2 for i in range(100)]  # 100 tokens: four chunks of at most 32
SJDPP = {"method": "sjdpp", "num_speculative_tokens": 6}


@pytest.fixture(scope="module")
def engines(make_engine, tiny_llama_path):
    whole = make_engine(tiny_llama_path, speculative_config=SJDPP)
    return whole, make_engine(tiny_llama_path, speculative_config=SJDPP, max_num_batched_tokens=32, max_num_seqs=4)


def run(llm, extra_args) -> list[list[int]]:
    from vllm import SamplingParams

    params = [
        SamplingParams(temperature=1.0, top_k=8, max_tokens=24, seed=s, ignore_eos=True,
                       detokenize=False, extra_args=extra_args)
        for s in range(8)
    ]
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * 8, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def expected(engines):
    """Plain decoding (sjdpp_disable) with the prompt prefilled whole."""
    outputs = run(engines[0], {"sjdpp_disable": True})
    assert len(set(map(tuple, outputs))) == 8  # the seeds matter: not a degenerate output
    return outputs


@pytest.mark.parametrize("engine", [0, 1], ids=["whole", "chunked"])
@pytest.mark.parametrize("extra_args", [None, {"sjdpp_disable": True}], ids=["sjdpp", "plain"])
def test_seeded_output_does_not_depend_on_chunking(engines, expected, engine, extra_args):
    assert run(engines[engine], extra_args) == expected


def test_chunked_seeds_take_the_cuda_path(engines, expected, monkeypatch):
    """The same with the CPU-only generator fix switched off, as on CUDA: keyed requests hold no
    generator (engine.race_sampler.drop_generators), so vLLM has nothing to rewind after a partial
    prefill (on CPU its rewind would crash the engine) and no generator state enters the tokens."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for name in ("_sample", "_bookkeeping_sync"):
        monkeypatch.setattr(GPUModelRunner, name, getattr(GPUModelRunner, name).__wrapped__)
    chunked = engines[1]
    runner = chunked.llm_engine.model_executor.driver_worker.worker.model_runner
    assert run(chunked, None) == expected
    assert run(chunked, {"sjdpp_disable": True}) == expected
    assert not runner.input_batch.generators
