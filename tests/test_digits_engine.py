"""The bundled digit model in vLLM with SJD++: defaults from its folder, text prompts, exactness."""

from __future__ import annotations

import warnings

import pytest

from tiny_llama import set_engine_env
from vllm_sjdpp.digits.tokens import GENERATED_LENGTH, IMAGE_TOKENS, ROW_WIDTH, ids_to_image
from vllm_sjdpp.digits.train import DEFAULT_OUT

set_engine_env()
ENGINE = dict(enforce_eager=True, max_model_len=GENERATED_LENGTH + 64, seed=0, disable_log_stats=False)


@pytest.fixture(scope="module")
def engines():
    from vllm import LLM

    plain = LLM(str(DEFAULT_OUT), **ENGINE)
    sjdpp = LLM(str(DEFAULT_OUT), speculative_config="sjdpp", **ENGINE)
    return plain, sjdpp


def test_sjdpp_defaults_come_from_the_model_folder(engines):
    _, sjdpp = engines
    config = sjdpp.llm_engine.model_executor.driver_worker.worker.model_runner.drafter.config
    assert (config.fresh_token_range, config.row_width, config.init) == (tuple(IMAGE_TOKENS), ROW_WIDTH, "above")


def test_text_prompt_greedy_image_is_identical(engines):
    from vllm import SamplingParams

    plain, sjdpp = engines
    greedy = SamplingParams(temperature=0, max_tokens=GENERATED_LENGTH)
    expected = plain.generate(["a handwritten 3"], greedy, use_tqdm=False)[0].outputs[0].token_ids
    got = sjdpp.generate(["a handwritten 3"], greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert list(got) == list(expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # greedy decoding of this model need not end in <eoi>
        assert ids_to_image(got).shape == (32, 32)


def test_sampled_images_use_the_models_defaults_and_compress(engines):
    _, sjdpp = engines
    defaults = sjdpp.get_default_sampling_params()
    assert defaults.temperature == 1.0 and defaults.top_k > 1
    defaults.max_tokens = GENERATED_LENGTH
    before = next(m.value for m in sjdpp.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")
    outs = sjdpp.generate([f"a handwritten {d}" for d in range(4)], defaults, use_tqdm=False)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    accepted = next(m.value for m in sjdpp.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens") - before
    passes = tokens - accepted  # each pass commits its accepted drafts plus one token
    print(f"digit model, T=1: {tokens / passes:.2f} tokens per forward pass")
    assert tokens / passes > 1.5
