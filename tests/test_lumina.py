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


def test_sampled_streams_hold_their_grid_under_sjdpp(family, lumina_sjdpp):
    """Seeded sampling at scales 1, 3 and 9 with 16-token windows, 18 requests in one batch:
    every stream is its request's grid, new lines and <eoss> in place."""
    import numpy as np

    from vllm_sjdpp.families.lumina import LuminaFamily

    from vllm import SamplingParams

    prompts = [(family.prompt_ids(text, size), family.tokens_for(size)) for text, size in PROMPTS]
    cases = [(prompt, length, scale, seed) for prompt, length in prompts for scale in (1.0, 3.0, 9.0) for seed in range(2)]
    params = [
        SamplingParams(max_tokens=length, ignore_eos=True, detokenize=False, temperature=1.0, seed=seed,
                       extra_args={"guidance_scale": scale})
        for _, length, scale, seed in cases
    ]
    outs = lumina_sjdpp.generate([{"prompt_token_ids": c[0]} for c in cases], params, use_tqdm=False)
    for (prompt, length, _, _), out in zip(cases, outs):
        stream = list(out.outputs[0].token_ids)
        grid = LuminaFamily.request_grid(family.config, prompt)
        assert len(stream) == length == grid.length
        assert grid.holds(np.arange(length), np.array(stream)).all()


@pytest.mark.parametrize("prompt, match", [
    ([0, 10097, 8710], "image header"),  # no header
    ([0, 10097, 8710, 8197, 8806], "two size tokens"),  # the width missing
    ([0, 10097, 8710, 8197, 8804 + 16, 8804 + 16], "maximum context length"),  # 512 px: 1057 tokens past 512
])
def test_bad_prompts_are_refused(lumina, prompt, match):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=match):
        lumina.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=3), use_tqdm=False)


# Sampled: 1000 streams of 5 tokens (a row of 4 codes and its new line), per-position and
# adjacent-pair chi-square, Bonferroni, against 1000 of transformers' own at Lumina-mGPT's image
# top-k (2000, the engine's default from the family).  Power, measured with these seeds on the
# 2-core EPYC: the broken variant (250 streams) gives p < 1e-250 where BROKEN_ALPHA asks 1e-6,
# and 100 of its streams p < 1e-200; the exact sampler's smallest p is 0.76 (0.24 before the
# reference drew by inverse CDF, `stats.inverse_cdf_multinomial`; 9e-256 for the broken variant).
SAMPLES, LENGTH, SAMPLE_SIZE = 1000, 5, (64, 64)


@pytest.fixture(scope="module")
def lumina_many(make_engine, tiny_lumina_path, lumina_sjdpp):
    spec = {"method": "sjdpp", "num_speculative_tokens": 3, "draft_token_budget": None}
    return make_engine(tiny_lumina_path, speculative_config=spec, max_model_len=512, max_num_seqs=64,
                       max_num_batched_tokens=320)


def hf_samples(model, prompt, scale, samples=SAMPLES):
    from stats import reference_samples

    header = prompt[len(prompt) - 1 - prompt[::-1].index(IMAGE_START):]
    allowed = lumina_allowed_tokens(SAMPLE_SIZE[0] // 16, SAMPLE_SIZE[1] // 16, len(prompt))
    return reference_samples(model, prompt, header, samples, chunk=250, temperature=1.0, top_k=2000,
                             max_new_tokens=LENGTH, guidance_scale=scale, prefix_allowed_tokens_fn=allowed)


def test_sampling_matches_transformers(family, unmasked, lumina_many):
    import numpy as np

    from stats import ALPHA, BROKEN_ALPHA, position_pair_pvalues

    def accepted() -> float:
        return next(m.value for m in lumina_many.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")

    prompt = family.prompt_ids("a red cat", SAMPLE_SIZE)
    before = accepted()
    got = np.array(generate(lumina_many, [(prompt, LENGTH)] * SAMPLES, {"guidance_scale": 3.0}, temperature=1.0))
    assert accepted() > before  # drafts accepted at code slots
    vocab = END_OF_ROW + 1
    pvalues = position_pair_pvalues(got, hf_samples(unmasked, prompt, 3.0), vocab)
    assert min(pvalues) > ALPHA / len(pvalues)
    # Broken variant (250 streams): the conditional model alone.
    cond_only = hf_samples(unmasked, prompt, 1.0, samples=SAMPLES // 4)
    assert min(position_pair_pvalues(got, cond_only, vocab)) < BROKEN_ALPHA


def test_images_decode_through_the_users_vqgan(tiny_lumina_path, family, lumina_sjdpp, tmp_path, monkeypatch):
    """The user's VQGAN named by $SJDPP_CHAMELEON_VQGAN: a stream becomes an image of the asked
    size whose pixels are the VQGAN's decoding of the codes its tokens name (taming-transformers'
    decoder, here the reference); without the files, images are refused naming them."""
    import numpy as np
    from taming.modules.diffusionmodules.model import Decoder

    from tiny_lumina import VQGAN_DDCONFIG, build_tiny_vqgan
    from vllm_sjdpp.families.lumina import VQGAN_ENV, LuminaFamily

    with pytest.raises(ValueError, match="vqgan.yaml and vqgan.ckpt"):
        LuminaFamily(tiny_lumina_path).check_decoder()
    monkeypatch.setenv(VQGAN_ENV, str(build_tiny_vqgan(tmp_path / "vqgan")))
    with_vqgan = LuminaFamily(tiny_lumina_path)
    text, size = PROMPTS[1]
    (stream,) = generate(lumina_sjdpp, [(family.prompt_ids(text, size), family.tokens_for(size))], {"guidance_scale": 3.0}, temperature=1.0, seed=3)
    image = with_vqgan.to_image(stream, size)
    assert image.size == size and image.mode == "RGB"
    # The reference: codes from the tokens' names, taming's decoder over the checkpoint's weights.
    names = {i: n for n, i in family.config.vocabulary_map.items()}
    rows, per_row = size[1] // 16, size[0] // 16
    body = np.array(stream[: rows * (per_row + 1)]).reshape(rows, per_row + 1)[:, :per_row]
    codes = torch.tensor([[int("".join(str(ord(c) - ord("A")) for c in names[t][6:-1])) for t in row] for row in body])
    state = torch.load(tmp_path / "vqgan" / "vqgan.ckpt", weights_only=True)["state_dict"]
    decoder = Decoder(**VQGAN_DDCONFIG).eval()
    decoder.load_state_dict({k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")})
    with torch.no_grad():
        quant = state["quantize.embedding.weight"][codes][None].permute(0, 3, 1, 2)
        quant = torch.nn.functional.conv2d(quant, state["post_quant_conv.weight"], state["post_quant_conv.bias"])
        pixels = ((decoder(quant)[0].clamp(-1, 1) + 1) / 2 * 255).floor().permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(image).astype(int) - pixels.astype(int)).max() <= 1
    partial = with_vqgan.to_partial_image(stream[: 2 * (per_row + 1)], size)
    assert partial.size == size


@pytest.mark.parametrize("fields, param, match", [
    ({}, "model", "vqgan.yaml and vqgan.ckpt"),  # no decoder files
    ({"size": "100x64"}, "size", "multiples of 32"),
])
def test_the_images_endpoint_refuses_what_it_cannot_make(tiny_lumina_path, tmp_path, monkeypatch, fields, param, match):
    """The images route on the tiny folder (a fake engine: nothing reaches it): without the
    user's VQGAN every image request is a 400 naming the files; with it, a bad size names `size`."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tiny_lumina import build_tiny_vqgan
    from vllm_sjdpp.families.lumina import VQGAN_ENV, LuminaFamily
    from vllm_sjdpp.serving.images_api import ROUTE, ImagesEndpoint, ImageService

    if param != "model":
        monkeypatch.setenv(VQGAN_ENV, str(build_tiny_vqgan(tmp_path / "vqgan")))
    app = FastAPI()
    ImagesEndpoint().attach_router(app)
    app.state.sjdpp_images = ImageService(object(), LuminaFamily(tiny_lumina_path), ["lumina"], {})
    with TestClient(app) as http:
        response = http.post(ROUTE, json={"prompt": "a red cat", **fields})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and match in error["message"]


def test_both_architecture_names_are_served_and_swin_norm_is_refused(family):
    """Lumina-mGPT's architecture name and transformers' Chameleon name are one family, both
    registered; Chameleon-34B's `swin_norm` is refused naming the key (the config hook runs the
    family's check when vLLM builds the model config)."""
    import copy

    from vllm_sjdpp.families import family_of
    from vllm_sjdpp.families.lumina import ARCHITECTURES, LuminaFamily
    from vllm_sjdpp.patches.models import guided_architectures

    config = copy.deepcopy(family.config)
    for name in ARCHITECTURES:
        config.architectures = [name]
        assert family_of(config) is LuminaFamily and name in guided_architectures()
    config.swin_norm = True
    with pytest.raises(ValueError, match="'swin_norm'"):
        LuminaFamily.check(config, {})
