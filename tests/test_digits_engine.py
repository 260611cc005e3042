"""The bundled digit model in vLLM with SJD++: defaults from its folder (guidance included), text
prompts, exactness, and what guidance does to the images."""

from __future__ import annotations

import json
import warnings

import pytest

from vllm_sjdpp.digits.tokens import GENERATED_LENGTH, IMAGE_TOKENS, ROW_WIDTH, ids_to_image
from vllm_sjdpp.digits.train import DEFAULT_OUT
from vllm_sjdpp.engine.runtime import runtime_of

# Text prompts (the folder's tokenizer); dtype as vLLM picks it (its float32 weights downcast).
ENGINE = dict(skip_tokenizer_init=False, dtype="auto", max_model_len=GENERATED_LENGTH + 64)


@pytest.fixture(scope="module")
def engines(make_engine):
    plain = make_engine(DEFAULT_OUT, **ENGINE)
    sjdpp = make_engine(DEFAULT_OUT, speculative_config="sjdpp", **ENGINE)
    return plain, sjdpp


def test_sjdpp_defaults_come_from_the_model_folder(engines):
    _, sjdpp = engines
    config = runtime_of(sjdpp).config
    assert (config.fresh_token_range, config.row_width, config.init) == (tuple(IMAGE_TOKENS), ROW_WIDTH, "above")


def test_guidance_defaults_come_from_the_model_folder(engines):
    _, sjdpp = engines
    model = runtime_of(sjdpp).runner.get_model()
    expected = json.loads((DEFAULT_OUT / "generation_config.json").read_text())["guidance_scale"]
    assert model.guidance.served.scale_default == expected > 1


def test_guidance_makes_the_prompted_digit(engines):
    """40 images (4 per digit) with SJD++ at the default scale and at scale 1 (no guidance): the
    classifier recognises the prompted digit far more often with guidance (0.65 against 0.40
    with these seeds; 40 images give a binomial spread of about 0.075)."""
    from vllm_sjdpp.digits.quality import judge
    from vllm_sjdpp.digits.vq import Codebook

    _, sjdpp = engines
    labels = [d for d in range(10) for _ in range(4)]

    def accuracy(extra_args):
        params = []
        for i in range(len(labels)):
            p = sjdpp.get_default_sampling_params()
            p.max_tokens, p.seed, p.extra_args = GENERATED_LENGTH, i, extra_args
            params.append(p)
        outs = sjdpp.generate([f"a handwritten {d}" for d in labels], params, use_tqdm=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            images = [ids_to_image(o.outputs[0].token_ids, codebook=Codebook.load(DEFAULT_OUT)) for o in outs]
        return judge().accuracy(images, labels)

    guided, unguided = accuracy(None), accuracy({"guidance_scale": 1.0})
    print(f"class accuracy, 40 images: {guided:.2f} guided (default scale), {unguided:.2f} at scale 1")
    assert guided >= unguided + 0.15


def test_text_prompt_greedy_image_is_identical(engines):
    from vllm import SamplingParams

    plain, sjdpp = engines
    greedy = SamplingParams(temperature=0, max_tokens=GENERATED_LENGTH)
    expected = plain.generate(["a handwritten 3"], greedy, use_tqdm=False)[0].outputs[0].token_ids
    got = sjdpp.generate(["a handwritten 3"], greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert list(got) == list(expected)


def test_sampled_images_use_the_models_defaults_and_compress(engines):
    _, sjdpp = engines
    defaults = sjdpp.get_default_sampling_params()
    assert defaults.temperature == 1.0 and defaults.top_k > 1
    defaults.max_tokens = GENERATED_LENGTH
    params = []
    for seed in range(4):
        p = defaults.clone()
        p.seed = seed
        params.append(p)
    # Full windows: under "auto" how much they draft depends on what this machine's passes cost
    # (on 2 busy cores, at 4 images, little).
    runtime = runtime_of(sjdpp)
    before = next(m.value for m in sjdpp.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")
    runtime.set_draft_token_budget(None)
    try:
        outs = sjdpp.generate([f"a handwritten {d}" for d in range(4)], params, use_tqdm=False)
    finally:
        runtime.set_draft_token_budget("auto")
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    accepted = next(m.value for m in sjdpp.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens") - before
    passes = tokens - accepted  # each pass commits its accepted drafts plus one token
    print(f"digit model, T=1: {tokens / passes:.2f} tokens per forward pass")
    assert tokens / passes > 1.5
