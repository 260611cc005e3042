"""Lumina-mGPT folders (`families.lumina`, `guidance.chameleon`) on the tiny real-shaped folder
(tests/tiny_lumina.py) against transformers' own `ChameleonForConditionalGeneration.generate`,
its image-logit mask lifted (transformers masks image logits for text chat; Lumina-mGPT's
checkpoints are trained without it), with transformers' unbatched guidance
(`negative_prompt_ids`: the image header, Lumina-mGPT's unconditional context, run as a sequence
of its own from position 0) and a `prefix_allowed_tokens_fn` written here as Lumina-mGPT's
`MultiModalLogitsProcessor` masks (codes 4..8195, a new line after each row, <eoss> after the
last), independently of the plugin's grid.  Guidance on log-probabilities (transformers) and on
raw logits (Lumina-mGPT) differ by a constant per row: the same argmax and the same samples.

Engines: `lumina` (guidance, no speculation) and `lumina_sjdpp` (guidance and SJD++, k = 16, the
folder's defaults: fresh drafts from the codes, init "above" with each request's row).
"""

from __future__ import annotations

import pytest
import torch

from tiny_lumina import CODE_START, CODES, CONTEXT, END_OF_ROW, IMAGE_END, IMAGE_START, VOCAB_SIZE

ENGINE = dict(max_model_len=512, max_num_seqs=4, max_num_batched_tokens=128)
SJDPP = {"method": "sjdpp", "num_speculative_tokens": 16}
# (text, (width, height) px): 4x4, 6x4 and 4x6 codes.
PROMPTS = [("a red cat", (64, 64)), ("two boats at dawn", (96, 64)), ("a tree", (64, 96))]


@pytest.fixture(scope="module")
def family(tiny_lumina_path):
    from vllm_sjdpp.families.lumina import LuminaFamily

    return LuminaFamily(tiny_lumina_path)


@pytest.fixture(scope="module")
def hf_model(tiny_lumina_path):
    from transformers import ChameleonForConditionalGeneration

    model = ChameleonForConditionalGeneration.from_pretrained(tiny_lumina_path).eval()
    model.generation_config.eos_token_id = None  # vLLM runs the image's tokens with ignore_eos
    return model


@pytest.fixture
def unmasked(hf_model):
    """transformers' Chameleon with its image-logit mask lifted (it masks the `image_tokens` of
    its vocabulary mapping)."""
    mapping = hf_model.model.vocabulary_mapping
    masked = mapping.image_tokens
    mapping.__dict__["image_tokens"] = []
    yield hf_model
    mapping.__dict__["image_tokens"] = masked


@pytest.fixture(scope="module")
def lumina(make_engine, tiny_lumina_path):
    return make_engine(tiny_lumina_path, **ENGINE)


@pytest.fixture(scope="module")
def lumina_sjdpp(make_engine, tiny_lumina_path, lumina):
    return make_engine(tiny_lumina_path, speculative_config=SJDPP, **ENGINE)


def lumina_allowed_tokens(width: int, height: int, prompt_length: int):
    """Lumina-mGPT's `MultiModalLogitsProcessor`, for an image of width x height codes whose
    header ends the prompt: with k tokens generated, a new line where (k + 1) % (W + 1) == 0,
    <eoss> at k == H (W + 1), else a code."""
    codes = torch.arange(CODE_START, CODE_START + CODES)

    def allowed(batch_id, input_ids):
        k = input_ids.shape[0] - prompt_length
        if k == height * (width + 1):
            return (IMAGE_END,)
        if (k + 1) % (width + 1) == 0:
            return (END_OF_ROW,)
        return codes

    return allowed


def hf_greedy(model, prompt, size, scale) -> list[int]:
    width, height = size[0] // 16, size[1] // 16
    header = prompt[len(prompt) - 1 - prompt[::-1].index(IMAGE_START):]
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=height * (width + 1) + 1, do_sample=False, guidance_scale=scale,
        negative_prompt_ids=torch.tensor([header]), prefix_allowed_tokens_fn=lumina_allowed_tokens(width, height, len(prompt)),
    )
    return out[0, len(prompt):].tolist()


def generate(llm, prompts, extra_args=None, **sampling) -> list[list[int]]:
    from vllm import SamplingParams

    params = [
        SamplingParams(max_tokens=n, ignore_eos=True, detokenize=False, extra_args=extra_args, **sampling)
        for _, n in prompts
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_the_folder_has_lumina_mgpt_shapes_and_defaults(family, lumina):
    from vllm_sjdpp.families.lumina import LuminaFamily

    config = family.config
    assert config.vocab_size == VOCAB_SIZE and config.max_position_embeddings == CONTEXT
    assert config.architectures == ["ChameleonXLLMXForConditionalGeneration"]
    ids = LuminaFamily.ids(config)
    assert (ids["image_start"], ids["image_end"], ids["end_of_row"], ids["end_of_turn"]) == (8197, 8196, 8803, 8710)
    assert (ids["code_start"], ids["code_stop"], ids["size_zero"]) == (4, 8196, 8804)
    grid = LuminaFamily.stream_grid(config)
    assert (grid.rows, grid.codes_per_row, grid.length) == (48, 48, 2353) and family.image_size == (768, 768)
    prompt = family.prompt_ids("a red cat", (96, 64))
    assert prompt[0] == 0 and prompt[-4:] == [8710, 8197, 8804 + 2, 8804 + 3]
    assert LuminaFamily.request_grid(config, prompt).length == family.tokens_for((96, 64)) == 4 * 7 + 1
    # Sampling defaults from the family, where generation_config.json is silent.
    assert lumina.llm_engine.model_config.get_diff_sampling_param().get("top_k") == 2000


@pytest.mark.parametrize("scale", [3.0, 5.0])
def test_greedy_equals_transformers_chameleon_with_lumina_guidance(family, unmasked, lumina, lumina_sjdpp, scale):
    prompts = [(family.prompt_ids(text, size), family.tokens_for(size)) for text, size in PROMPTS]
    expected = [hf_greedy(unmasked, p, size, scale) for (p, _), (_, size) in zip(prompts, PROMPTS)]
    extra = {"guidance_scale": scale}
    assert generate(lumina, prompts, extra, temperature=0) == expected
    assert generate(lumina_sjdpp, prompts, extra, temperature=0) == expected
    # Broken variants: the conditional model alone, and transformers' image-logit mask left on.
    assert all(g != e for g, e in zip(generate(lumina, prompts, {"guidance_scale": 1.0}, temperature=0), expected))


def test_the_mask_left_on_is_caught(family, hf_model, lumina):
    prompts = [(family.prompt_ids(text, size), family.tokens_for(size)) for text, size in PROMPTS]
    masked = [hf_greedy(hf_model, p, size, 3.0) for (p, _), (_, size) in zip(prompts, PROMPTS)]
    assert all(g != m for g, m in zip(generate(lumina, prompts, {"guidance_scale": 3.0}, temperature=0), masked))
