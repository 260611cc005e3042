"""Emu3 folders (`families.emu3`, `guidance.emu3`) on the tiny real-shaped Emu3 (tests/tiny_emu3.py)
against transformers' own `Emu3ForConditionalGeneration.generate` with its unbatched guidance
(`negative_prompt_ids` of another length) and the `prefix_allowed_tokens_fn` of transformers'
Emu3 docs, written here independently of the plugin's grid.

Engines: `emu3` (guidance, no speculation) and `emu3_sjdpp` (guidance and SJD++, k = 16, the
folder's defaults: fresh drafts from the visual tokens, init "above" with each request's row).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny_emu3 import CODEBOOK, CONTEXT, VOCAB_SIZE

ENGINE = dict(max_model_len=512, max_num_seqs=4, max_num_batched_tokens=128)
SJDPP = {"method": "sjdpp", "num_speculative_tokens": 16}
# (text, (width, height) px): 5x5, 4x6, 6x4 and 3x3 codes.
PROMPTS = [("a red cat", (40, 40)), ("two boats at dawn", (32, 48)), ("a tree", (48, 32)), ("a quiet lake in fog", (24, 24))]
SHORT_NEGATIVE = "blur"


@pytest.fixture(scope="module")
def family(tiny_emu3_path):
    from vllm_sjdpp.families.emu3 import Emu3Family

    return Emu3Family(tiny_emu3_path)


@pytest.fixture(scope="module")
def hf_model(tiny_emu3_path):
    from transformers import Emu3ForConditionalGeneration

    model = Emu3ForConditionalGeneration.from_pretrained(tiny_emu3_path).eval()
    model.generation_config.eos_token_id = None  # the stream's EOS is forced by the grid; vLLM runs with ignore_eos
    return model


@pytest.fixture(scope="module")
def emu3(make_engine, tiny_emu3_path):
    return make_engine(tiny_emu3_path, **ENGINE)


@pytest.fixture(scope="module")
def emu3_sjdpp(make_engine, tiny_emu3_path, emu3):
    return make_engine(tiny_emu3_path, speculative_config=SJDPP, **ENGINE)


def docs_allowed_tokens(hf_model, width: int, height: int):
    """transformers' Emu3 docs' `prefix_allowed_tokens_fn`: offsets counted from the image wrapper
    token; end of line after every row, then end of frame, end of image, EOS, then padding."""
    vocab = hf_model.config.vocabulary_map
    eol, eof, eoi, eos = (vocab[t] for t in ("<|extra_200|>", "<|extra_201|>", "<|image end|>", "<|extra_204|>"))
    wrapper, pad = vocab["<|image token|>"], vocab["<|endoftext|>"]
    visual = torch.tensor(hf_model.vocabulary_mapping.image_tokens)  # a tensor: indexing by a list of 32768 is slower

    def allowed(batch_id, input_ids):
        position = torch.nonzero(input_ids == wrapper, as_tuple=True)[0][0]
        offset = input_ids.shape[0] - position
        if offset % (width + 1) == 0:
            return (eol,)
        if offset == (width + 1) * height + 1:
            return (eof,)
        if offset == (width + 1) * height + 2:
            return (eoi,)
        if offset == (width + 1) * height + 3:
            return (eos,)
        if offset > (width + 1) * height + 3:
            return (pad,)
        return visual

    return allowed


def hf_greedy(hf_model, prompt, negative, size, scale) -> list[int]:
    width, height = size[0] // 8, size[1] // 8
    out = hf_model.generate(
        torch.tensor([prompt]), max_new_tokens=height * (width + 1) + 3, do_sample=False, guidance_scale=scale,
        negative_prompt_ids=torch.tensor([negative]), prefix_allowed_tokens_fn=docs_allowed_tokens(hf_model, width, height),
    )
    return out[0, len(prompt):].tolist()


def generate(llm, prompts, extra_args, **sampling) -> list[list[int]]:
    from vllm import SamplingParams

    params = [
        SamplingParams(max_tokens=n, ignore_eos=True, detokenize=False, extra_args=extra, **sampling)
        for n, extra in zip([t for _, t in prompts], extra_args)
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_the_folder_has_emu3_gen_shapes_and_defaults(tiny_emu3_path, family, emu3):
    from vllm_sjdpp.families.emu3 import Emu3Family
    from vllm_sjdpp.guidance.cfg import default_scale
    from vllm_sjdpp.patches.arg_utils import model_defaults

    config = family.config
    assert config.text_config.vocab_size == VOCAB_SIZE and config.vq_config.codebook_size == CODEBOOK
    assert config.text_config.max_position_embeddings == CONTEXT
    ids = Emu3Family.ids(config)
    assert (ids["end_of_row"], ids["end_of_frame"], ids["bos"], ids["eos"]) == (151846, 151847, 151849, 151850)
    assert (ids["image_token"], ids["image_start"], ids["image_end"]) == (151851, 151852, 151853)
    assert (ids["code_start"], ids["code_stop"]) == (151854, VOCAB_SIZE)
    grid = Emu3Family.stream_grid(config)
    assert (grid.rows, grid.codes_per_row, grid.length) == (90, 90, 8193) and family.image_size == (720, 720)
    model_config = emu3.llm_engine.vllm_config.model_config
    assert default_scale(model_config) == 3.0 and model_config.get_diff_sampling_param()["top_k"] == 2048
    assert model_defaults(model_config) == {"fresh_token_range": [151854, VOCAB_SIZE], "row_width": 91, "init": "above"}
    # The prompt is the processor's, and its grid is read back from its header.
    prompt = family.prompt_ids("a red cat", (32, 48))
    assert prompt[0] == ids["bos"] and prompt[-1] == ids["image_token"]
    assert (Emu3Family.request_grid(config, prompt).rows, Emu3Family.request_grid(config, prompt).codes_per_row) == (6, 4)


def request_set(family, negative_text):
    """(prompt, tokens) per PROMPTS, and each one's negative prompt through the processor at its size."""
    prompts, negatives = [], []
    for text, size in PROMPTS:
        prompt = family.prompt_ids(text, size)
        prompts.append((prompt, (size[1] // 8) * (size[0] // 8 + 1) + 3))
        negatives.append(family.prompt_ids(negative_text, size))
    return prompts, negatives


@pytest.mark.parametrize("scale", [1.5, 3.0])
def test_greedy_equals_transformers(family, hf_model, emu3, emu3_sjdpp, scale):
    """Emu3's documented negative prompt (longer than every prompt) and a short one, plain and
    SJD++: token-identical to transformers."""
    from vllm_sjdpp.families.emu3 import NEGATIVE_PROMPT

    for negative_text in (NEGATIVE_PROMPT, SHORT_NEGATIVE):
        prompts, negatives = request_set(family, negative_text)
        assert {len(n) > len(p) for (p, _), n in zip(prompts, negatives)} == {negative_text == NEGATIVE_PROMPT}
        expected = [hf_greedy(hf_model, p, n, size, scale) for (p, _), n, (_, size) in zip(prompts, negatives, PROMPTS)]
        extra = [{"guidance_scale": scale, "negative_prompt_token_ids": n} for n in negatives]
        assert generate(emu3, prompts, extra, temperature=0) == expected
        assert generate(emu3_sjdpp, prompts, extra, temperature=0) == expected


def test_the_default_context_is_the_empty_prompt(family, hf_model, emu3_sjdpp):
    prompts, empty = request_set(family, "")
    expected = [hf_greedy(hf_model, p, n, size, 3.0) for (p, _), n, (_, size) in zip(prompts, empty, PROMPTS)]
    assert generate(emu3_sjdpp, prompts, [None] * len(prompts), temperature=0) == expected  # the folder's scale, 3


def test_a_negative_prompt_padded_to_the_prompts_length_is_caught(family, hf_model, emu3_sjdpp):
    """Broken variant (what Emu3 users reported degrading images): the short negative prompt
    padded to the prompt's length, which then runs in the prompt's own sequence."""
    prompts, negatives = request_set(family, SHORT_NEGATIVE)
    pad = hf_model.config.vocabulary_map["<|endoftext|>"]
    padded = [n[:1] + [pad] * (len(p) - len(n)) + n[1:] for (p, _), n in zip(prompts, negatives)]
    expected = [hf_greedy(hf_model, p, n, size, 3.0) for (p, _), n, (_, size) in zip(prompts, negatives, PROMPTS)]
    got = generate(emu3_sjdpp, prompts, [{"negative_prompt_token_ids": n} for n in padded], temperature=0)
    assert all(g != e for g, e in zip(got, expected))


def test_sampled_streams_hold_their_grid_under_sjdpp(family, emu3_sjdpp):
    """Seeded sampling at scales 1, 3 and 9 with 16-token windows: every stream is its request's
    grid, row ends and closing tokens in place."""
    from vllm_sjdpp.families.emu3 import Emu3Family

    prompts, _ = request_set(family, "")
    for scale in (1.0, 3.0, 9.0):
        extra = [{"guidance_scale": scale}] * len(prompts)
        for seed in range(3):
            streams = generate(emu3_sjdpp, prompts, extra, temperature=1.0, seed=seed)
            for (prompt, length), stream in zip(prompts, streams):
                grid = Emu3Family.request_grid(family.config, prompt)
                assert len(stream) == length == grid.length
                assert grid.holds(np.arange(length), np.array(stream)).all()


def test_images_decode_as_transformers_decodes(family, hf_model, emu3_sjdpp):
    prompts, _ = request_set(family, "")
    streams = generate(emu3_sjdpp, prompts, [None] * len(prompts), temperature=1.0, seed=1)
    processor = family.processor
    for stream, (_, size) in zip(streams, PROMPTS):
        with torch.no_grad():
            pixels = hf_model.model.decode_image_tokens(
                image_tokens=torch.tensor([stream]), height=size[1] // 8, width=size[0] // 8
            )
        expected = processor.postprocess(pixels, return_tensors="PIL.Image.Image")["pixel_values"][0]
        image = family.to_image(stream, size)
        assert image.size == size
        assert np.array_equal(np.asarray(image), np.asarray(expected))


@pytest.mark.parametrize("prompt, match", [
    ([151849, 97, 98], "image header"),  # no header: not an image prompt
    ([151849, 97, 151852, 53, 151851], "size as H\\*W"),  # a header without a size
    ([151849, 97, 151852, 57, 57, 42, 57, 57, 151851], "maximum context length"),  # 99*99 codes
])
def test_bad_prompts_are_refused(emu3, prompt, match):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=match):
        emu3.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=3), use_tqdm=False)


# Sampled: 1000 streams of 5 tokens (3 x 3 codes: a row, its end of line, a code), per-position
# and adjacent-pair chi-square, Bonferroni, against 1000 of transformers' own.  Power, measured
# with these seeds: each broken variant gives p < 1e-170 at 100 streams on the 2-core Xeon and
# the 2-core EPYC where BROKEN_ALPHA asks 1e-6, so 100 streams each (the test took 125 s there
# against 170 s with 250); the exact sampler's smallest p is 0.15 (EPYC; 0.02 before the
# reference drew by inverse CDF, `stats.inverse_cdf_multinomial`; 0.035 at 2000 streams, which
# took 266 s against 124 s).
SAMPLES, BROKEN_SAMPLES, LENGTH, SAMPLE_SIZE = 1000, 100, 5, (24, 24)


@pytest.fixture(scope="module")
def emu3_many(make_engine, tiny_emu3_path, emu3_sjdpp):
    """SJD++ with room for many images at once (k = 3 keeps the step's vocabulary rows in memory)."""
    spec = {"method": "sjdpp", "num_speculative_tokens": 3, "draft_token_budget": None}
    return make_engine(tiny_emu3_path, speculative_config=spec, max_model_len=512, max_num_seqs=32,
                       max_num_batched_tokens=160)


def hf_samples(hf_model, prompt, negative, scale, samples=SAMPLES) -> np.ndarray:
    from stats import reference_samples

    allowed = docs_allowed_tokens(hf_model, SAMPLE_SIZE[0] // 8, SAMPLE_SIZE[1] // 8)
    return reference_samples(hf_model, prompt, negative, samples, chunk=100, temperature=1.0, top_k=0,
                             max_new_tokens=LENGTH, guidance_scale=scale, prefix_allowed_tokens_fn=allowed)


def test_sampling_matches_transformers(family, hf_model, emu3_many):
    from stats import ALPHA, BROKEN_ALPHA, position_pair_pvalues

    def accepted() -> float:
        return next(m.value for m in emu3_many.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")

    prompt = family.prompt_ids("a red cat", SAMPLE_SIZE)
    negative = family.prompt_ids(SHORT_NEGATIVE, SAMPLE_SIZE)
    before = accepted()
    extra = {"guidance_scale": 3.0, "negative_prompt_token_ids": negative}
    got = np.array(generate(emu3_many, [(prompt, LENGTH)] * SAMPLES, [extra] * SAMPLES, temperature=1.0))
    assert accepted() > before  # drafts accepted
    codes = lambda x: x - 151000  # noqa: E731  (ids past the visual range's start, for pair keys)
    vocab = VOCAB_SIZE - 151000
    pvalues = position_pair_pvalues(codes(got), codes(hf_samples(hf_model, prompt, negative, 3.0)), vocab)
    assert min(pvalues) > ALPHA / len(pvalues)
    # Broken variants (BROKEN_SAMPLES streams each): the conditional model alone, and the negative
    # prompt padded to the prompt's length.
    cond_only = hf_samples(hf_model, prompt, negative, 1.0, samples=BROKEN_SAMPLES)
    assert min(position_pair_pvalues(codes(got), codes(cond_only), vocab)) < BROKEN_ALPHA
    pad = hf_model.config.vocabulary_map["<|endoftext|>"]
    padded = {"guidance_scale": 3.0, "negative_prompt_token_ids": negative[:1] + [pad] * (len(prompt) - len(negative)) + negative[1:]}
    broken = np.array(generate(emu3_many, [(prompt, LENGTH)] * BROKEN_SAMPLES, [padded] * BROKEN_SAMPLES, temperature=1.0))
    assert min(position_pair_pvalues(codes(got), codes(broken), vocab)) < BROKEN_ALPHA
