"""Janus image generation in vLLM (guided, plain and SJD++) against transformers' own Janus
(`JanusForConditionalGeneration.generate(generation_mode="image")`), on tiny random folders built
locally: the small one (16 image tokens in a 4x4 grid over 64 codes) and one with Janus-Pro's real
ids and shapes (576 image tokens in a 24x24 grid over 16384 codes, a text vocabulary of 102400,
`<begin_of_image>` at 100016; tests/tiny_janus.py).  Statistical tests that need thousands of
images run on the small folder only.

Engines: `janus` (guidance, no speculation) and `janus_sjdpp` (guidance and SJD++, the family's
defaults: fresh codes copied from the row above, rows of one grid row).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stats import ALPHA, BROKEN_ALPHA, position_pair_pvalues
from tiny_janus import SMALL, JanusShape
from vllm_sjdpp.engine.runtime import runtime_of

TEXTS = ["a red dog under the sun", "the big green tree", "a small blue house under the rain", "a cat"]
# Full windows: these tests verify drafts, which "auto" would cut on a busy CPU.
SJDPP = {"method": "sjdpp", "num_speculative_tokens": 6, "draft_token_budget": None}


def engine_args(janus_shape) -> dict:
    """make_engine's overrides for a folder of this shape."""
    # Janus-Pro's 16384 codes: an SJD++ step holds [rows, 16384] float32 tensors, so fewer
    # requests in flight keep its reserve inside the tests' 1 GiB of KV space.
    return dict(
        max_model_len=64 + janus_shape.tokens, max_logprobs=janus_shape.codes, **({} if janus_shape is SMALL else {"max_num_seqs": 64}),
    )


@pytest.fixture(scope="module")
def family(janus_folder):
    from vllm_sjdpp import families

    return families.load(janus_folder)


@pytest.fixture(scope="module")
def prompts(family):
    return [family.prompt_ids(t) for t in TEXTS]


@pytest.fixture(scope="module")
def janus(make_engine, janus_folder, janus_shape):
    return make_engine(janus_folder, **engine_args(janus_shape))


@pytest.fixture(scope="module")
def janus_sjdpp(make_engine, janus_folder, janus_shape, janus):
    return make_engine(janus_folder, speculative_config=SJDPP, **engine_args(janus_shape))


@pytest.fixture(scope="module")
def hf(janus_folder):
    from transformers import JanusForConditionalGeneration

    return JanusForConditionalGeneration.from_pretrained(janus_folder).eval()


def params(tokens: int, **kw):
    from vllm import SamplingParams

    return SamplingParams(ignore_eos=True, detokenize=False, max_tokens=tokens, **kw)


def run(llm, prompts, sampling) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
    return [list(c.token_ids) for o in outs for c in o.outputs]


def uncond(family, prompt):
    return family_rule(family).apply(prompt)


def family_rule(family):
    import json

    generation = json.loads((family.folder / "generation_config.json").read_text())
    return type(family).unconditional_rule(family.config, generation)


@torch.no_grad()
def hf_branch_logprobs(hf, prompt, codes) -> np.ndarray:
    """transformers' Janus modules on one branch: log-softmax of the generation head at the last
    prompt position and at each image token but the last, [len(codes), codes in the codebook]."""
    text = hf.model.language_model.embed_tokens(torch.tensor([prompt]))
    image = hf.prepare_embeddings_for_image_generation(torch.tensor([codes[:-1]]))
    hidden = hf.model.language_model(inputs_embeds=torch.cat([text, image], 1)).last_hidden_state
    return torch.log_softmax(hf.model.generation_head(hidden[0, len(prompt) - 1 :]).float(), -1).numpy()


def vllm_branch_logprobs(llm, janus_shape, prompts, scale, tokens) -> list[tuple[list[int], np.ndarray]]:
    """Greedy codes and the logprobs of all codes at each of the first `tokens` positions, at one scale."""
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        params(tokens, temperature=0, logprobs=janus_shape.codes, extra_args={"guidance_scale": scale}), use_tqdm=False,
    )
    result = []
    for o in outs:
        dense = np.full((tokens, janus_shape.codes), np.nan)
        for i, d in enumerate(o.outputs[0].logprobs):
            for t, lp in d.items():
                dense[i, t] = lp.logprob
        result.append((list(o.outputs[0].token_ids), dense))
    return result


def hf_image_generate(hf, prompts, scale, **kw) -> list[list[int]]:
    return [
        hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                    generation_mode="image", guidance_scale=scale, **kw)[0].tolist()
        for p in prompts
    ]


# The family's facts -----------------------------------------------------------------------------


def test_family_reads_the_folder(janus_folder, janus_shape, family, prompts):
    from transformers import AutoConfig

    from vllm_sjdpp import families
    from vllm_sjdpp.families.janus import JanusFamily

    config = AutoConfig.from_pretrained(janus_folder)
    assert families.family_of(config) is JanusFamily
    assert JanusFamily.sjdpp_defaults(config) == {"fresh_token_range": [0, janus_shape.codes], "row_width": janus_shape.grid, "init": "above"}
    assert JanusFamily.image_vocab_size(config) == janus_shape.codes
    assert family.tokens_per_image == janus_shape.tokens and family.image_size == (janus_shape.image_size, janus_shape.image_size)
    rule = family_rule(family)
    bos, boi = prompts[0][0], prompts[0][-1]
    assert (bos, boi, rule.pad_token_id) == (janus_shape.special_ids["bos"], janus_shape.special_ids["boi"], janus_shape.special_ids["pad"])
    assert rule.keep_token_ids == {bos, boi} and uncond(family, prompts[0])[1:-1] == [rule.pad_token_id] * (len(prompts[0]) - 2)
    assert len({tuple(p) for p in prompts}) == len(TEXTS)
    with pytest.raises(ValueError, match="empty"):
        family.prompt_ids("  ")


def test_image_decodes_with_the_folders_vq_model(janus_shape, family, hf):
    codes = list(range(0, 2 * janus_shape.tokens, 2))
    image = family.to_image(codes)
    assert image.size == (janus_shape.image_size, janus_shape.image_size) and image.mode == "RGB"
    with torch.no_grad():
        pixels = hf.decode_image_tokens(torch.tensor([codes]))[0].numpy()  # [H, W, 3], normalised
    processor = family.processor.image_processor  # undo its normalisation
    expected = np.clip((pixels * processor.image_std + processor.image_mean) * 255, 0, 255)
    assert np.abs(np.asarray(image).astype(float) - expected).max() <= 1.0
    assert np.asarray(image).std() > 0  # not a blank image
    with pytest.raises(ValueError, match=f"{janus_shape.tokens} tokens"):
        family.to_image(codes[:-1])
    with pytest.raises(ValueError, match="codes in"):
        family.to_image([janus_shape.codes] * janus_shape.tokens)


# Logits, greedy and sampling against transformers ---------------------------------------------------


def logit_checks(janus_shape, prompts) -> tuple[list, int]:
    """The prompts and positions whose every logprob is compared: all of them on the small
    folder; on Janus-Pro's 16384 codes one prompt's first row and a half (the "above" prior's
    sources reach back into the image there), which keeps vLLM's logprob lists affordable."""
    return (prompts, janus_shape.tokens) if janus_shape is SMALL else (prompts[:1], janus_shape.grid * 3 // 2)


@pytest.mark.parametrize("engine", ["janus", "janus_sjdpp"])
def test_branch_logits_equal_transformers(request, janus_shape, family, prompts, hf, engine):
    """Scale 1 is the cond branch alone and scale 0 the uncond branch alone: at every generated
    position (the first one is the prompt's last position), all logprobs equal transformers'."""
    llm = request.getfixturevalue(engine)
    prompts, tokens = logit_checks(janus_shape, prompts)
    for scale, branch_prompts in ((1.0, prompts), (0.0, [uncond(family, p) for p in prompts])):
        for (codes, got), prompt in zip(vllm_branch_logprobs(llm, janus_shape, prompts, scale, tokens), branch_prompts):
            np.testing.assert_allclose(got, hf_branch_logprobs(hf, prompt, codes), atol=2e-4)
            assert codes == list(np.argmax(got, 1))


def test_image_codes_embedded_as_text_break_the_logits(janus, janus_shape, family, prompts, hf, monkeypatch):
    """Broken variant: every position embedded as text (the id space read without positions)."""
    from vllm_sjdpp.guidance.cfg import GuidanceBatch

    monkeypatch.setattr(GuidanceBatch, "prompt_mask", staticmethod(lambda override, n: torch.ones(n, dtype=torch.bool)))
    prompts, tokens = logit_checks(janus_shape, prompts)
    (codes, got), = vllm_branch_logprobs(janus, janus_shape, prompts[:1], 1.0, tokens)
    assert np.abs(got - hf_branch_logprobs(hf, prompts[0], codes)).max() > 1e-2


@pytest.mark.parametrize("scale", [1.5, 4.0])
def test_guided_greedy_equals_transformers(janus, janus_sjdpp, janus_shape, hf, prompts, scale):
    """Whole images, plain and SJD++; on Janus-Pro's shapes two prompts (576 tokens each)."""
    prompts = prompts if janus_shape is SMALL else prompts[:2]
    expected = hf_image_generate(hf, prompts, scale, do_sample=False)
    assert expected != hf_image_generate(hf, prompts, 1.01, do_sample=False)  # guidance matters here
    greedy = params(janus_shape.tokens, temperature=0, extra_args={"guidance_scale": scale})
    assert run(janus, prompts, greedy) == expected
    assert run(janus_sjdpp, prompts, greedy) == expected


# Sampled: per-position and adjacent-pair chi-square over 16 positions, Bonferroni over 31.
SAMPLES = 2000


def same(a, b) -> bool:
    pvalues = position_pair_pvalues(a, b, SMALL.codes)
    return min(pvalues) > ALPHA / len(pvalues)


def differ(a, b) -> bool:
    return min(position_pair_pvalues(a, b, SMALL.codes)) < BROKEN_ALPHA


def accepted_drafts(llm) -> float:
    """Disabled log stats still count: metrics are read from the newest engine in the process."""
    return next(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")


@torch.no_grad()
def hf_samples(hf, prompt, scale, seed=0) -> np.ndarray:
    torch.manual_seed(seed)
    out = hf.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), generation_mode="image",
        do_sample=True, temperature=1.0, top_k=0, guidance_scale=scale, num_return_sequences=SAMPLES,
    )
    return out.numpy()


def test_sjdpp_sampling_matches_transformers(janus_sjdpp, janus_shape, hf, prompts):
    if janus_shape is not SMALL:
        pytest.skip("2000 images per distribution: the small folder carries the statistics")
    scale, tokens = 3.0, janus_shape.tokens
    before = accepted_drafts(janus_sjdpp)
    sampling = params(tokens, temperature=1.0, extra_args={"guidance_scale": scale})
    sjdpp = np.array(run(janus_sjdpp, [prompts[0]] * SAMPLES, sampling))
    assert sjdpp.shape == (SAMPLES, tokens)
    passes = SAMPLES * tokens - (accepted_drafts(janus_sjdpp) - before)
    # SJD++ at work: drafts accepted (a random model's Jacobi trajectories are erratic: 0.94 of
    # the plain passes measured) and rejected.
    assert 0.5 * SAMPLES * tokens < passes < 0.97 * SAMPLES * tokens
    assert same(sjdpp, hf_samples(hf, prompts[0], scale))
    # Broken variant the same test must reject: the cond-only distribution.
    unguided = np.array(run(janus_sjdpp, [prompts[0]] * SAMPLES, params(tokens, temperature=1.0, extra_args={"guidance_scale": 1.0})))
    assert differ(unguided, hf_samples(hf, prompts[0], scale))


def test_seeded_sjdpp_windows_hold_only_codes(janus_sjdpp, janus_shape, prompts):
    """50 seeded SJD++ images at the folder's guidance scale: every window that reached the model
    runner held image codes only (counted at the guard, where an id past the codebook would be
    cut), and drafts were accepted: fewer forward passes than tokens."""
    guard = runtime_of(janus_sjdpp).guard
    windows, drafts, cut = guard.windows, guard.drafts, guard.cut
    before = accepted_drafts(janus_sjdpp)
    images = 50
    # Windows of 4 on Janus-Pro's shapes: every window row costs a pass over 16384 codes.
    options = {} if janus_shape is SMALL else {"sjdpp_num_speculative_tokens": 4}
    sampling = [params(janus_shape.tokens, temperature=1.0, seed=seed, extra_args=options) for seed in range(images)]
    codes = np.array(run(janus_sjdpp, [prompts[seed % len(prompts)] for seed in range(images)], sampling))
    assert codes.shape == (images, janus_shape.tokens) and 0 <= codes.min() and codes.max() < janus_shape.codes
    assert guard.windows - windows > images and guard.drafts - drafts > images * janus_shape.tokens // 2
    assert guard.cut == cut
    assert accepted_drafts(janus_sjdpp) > before


# Bad input --------------------------------------------------------------------------------------


def test_options_that_index_text_ids_are_refused(janus, janus_sjdpp, janus_shape, prompts):
    """Options vLLM would apply to logits by text id, and prompt ids outside the vocabulary, are
    refused (HTTP 400 in the server), and the engines keep serving."""
    from vllm.exceptions import VLLMValidationError

    tokens = janus_shape.tokens
    for bad in (dict(prompt_logprobs=1), dict(repetition_penalty=1.2), dict(min_tokens=3),
                dict(allowed_token_ids=[1, 2]), dict(logit_bias={janus_shape.codes: 1.0})):
        with pytest.raises(VLLMValidationError, match=next(iter(bad))):
            run(janus, prompts[:1], params(tokens, temperature=1.0, **bad))
    for llm in (janus, janus_sjdpp):
        with pytest.raises(VLLMValidationError, match=rf"prompt token ids must be in \[0, {janus_shape.text_vocab}\)"):
            run(llm, [[0, 5, 10**6]], params(tokens, temperature=1.0))
    # Image codes may be biased (without speculation: vLLM refuses logit_bias with it).
    biased = run(janus, prompts[:1] * (50 if janus_shape is SMALL else 8), params(tokens, temperature=1.0, logit_bias={3: 100.0}))
    assert all(codes == [3] * tokens for codes in biased)
    assert len(run(janus_sjdpp, prompts[:1], params(tokens, temperature=1.0))[0]) == tokens


def test_a_row_wider_than_the_image_is_refused(janus_sjdpp, janus_shape, prompts):
    from vllm.exceptions import VLLMValidationError

    too_wide = params(janus_shape.tokens, temperature=1.0, extra_args={"sjdpp_row_width": janus_shape.tokens + 1})
    with pytest.raises(VLLMValidationError, match=rf"'sjdpp_row_width'.*<= {janus_shape.tokens} \(the image's tokens\)"):
        run(janus_sjdpp, prompts[:1], too_wide)


def _break_special_id(key: str):
    def break_it(c, g):
        g[key] = c.text_config.vocab_size

    return break_it


@pytest.mark.parametrize("break_it, message", [
    (lambda c, g: delattr(c, "vq_config"), "vq_config"),
    (lambda c, g: setattr(c.text_config, "model_type", "qwen2"), "must be a Llama"),
    (lambda c, g: setattr(c.vq_config, "num_embeddings", 10**6), "exceed the text vocabulary"),
    (lambda c, g: setattr(c.vision_config, "num_image_tokens", c.vision_config.num_image_tokens + 1),
     r"vision_config.num_image_tokens=\d+ is not a \d+x\d+ grid \(vq_config.num_patches\)"),
    (lambda c, g: setattr(c.vision_config, "image_size", c.vision_config.image_size * 2),
     r"vision_config.image_size=\d+, but the VQ decoder makes \d+ px images"),
    (lambda c, g: g.pop("pad_token_id"), "pad_token_id"),
    (lambda c, g: g.pop("bos_token_id"), "bos_token_id"),
    (_break_special_id("pad_token_id"), r"'pad_token_id': \[\d+\] outside the text vocabulary \(text_config.vocab_size"),
    (_break_special_id("bos_token_id"), r"'bos_token_id': \[\d+\] outside the text vocabulary"),
    (lambda c, g: g.update(generation_kwargs={"boi_token_id": -1}), r"'boi_token_id': \[-1\] outside"),
    (lambda c, g: g.update(pad_token_id="0"), "token ids must be integers"),
])
def test_janus_check_names_what_a_folder_lacks(family, break_it, message):
    import copy
    import json

    from vllm_sjdpp.families.janus import JanusFamily

    config = copy.deepcopy(family.config)
    generation = json.loads((family.folder / "generation_config.json").read_text())
    JanusFamily.check(config, generation)  # the folder itself passes
    break_it(config, generation)
    with pytest.raises(ValueError, match=message):
        JanusFamily.check(config, generation)


def test_boi_read_from_where_the_conversion_script_writes_it(family):
    """transformers' Janus conversion script sets boi_token_id at the top of
    generation_config.json; `generate` reads it from generation_kwargs.  Either is the rule's."""
    import json

    from vllm_sjdpp.families.janus import JanusFamily

    generation = json.loads((family.folder / "generation_config.json").read_text())
    boi = generation.pop("generation_kwargs")["boi_token_id"]
    generation["boi_token_id"] = boi
    assert boi in JanusFamily.unconditional_rule(family.config, generation).keep_token_ids


def test_a_folder_that_is_not_janus_is_refused_naming_what_is_missing(make_engine, janus_folder, janus_shape, tmp_path):
    import json
    import shutil

    broken = tmp_path / "no-boi"
    shutil.copytree(janus_folder, broken)
    generation = json.loads((broken / "generation_config.json").read_text())
    del generation["generation_kwargs"]
    (broken / "generation_config.json").write_text(json.dumps(generation))
    with pytest.raises(Exception, match="boi_token_id"):
        make_engine(broken, **engine_args(janus_shape))


# The first failing folder: text ids past the codebook in the prompt -------------------------------

# What a new user built (issue 20): text vocabulary 300, codebook 48, a 4x4 grid,
# <begin_of_image> at 250 and pad at 0.  Its first SJD++ request killed the engine: the "above"
# prior copied prompt ids (250 and others past 48) into the first row's drafts, which Janus
# embeds as image codes.
BOI_PAST_THE_CODES = JanusShape(
    text_vocab=300, codes=48, grid=4, image_size=32,
    special_ids={"pad": 0, "boi": 250, "bos": 1, "eos": 2, "unk": 3, "eoi": 4, "image": 5, "user": 260, "assistant": 270},
)


@pytest.fixture(scope="module")
def boi_past_the_codes(make_engine, tmp_path_factory):
    from tiny_janus import build_tiny_janus

    janus_folder = build_tiny_janus(tmp_path_factory.mktemp("boi-past-the-codes"), BOI_PAST_THE_CODES)
    from vllm_sjdpp import families

    prompts = [families.load(janus_folder).prompt_ids(t) for t in TEXTS]
    assert all(max(p) >= BOI_PAST_THE_CODES.codes for p in prompts)  # the prompts hold ids no code has
    return make_engine(janus_folder, speculative_config=SJDPP, **engine_args(BOI_PAST_THE_CODES)), prompts


def test_first_sjdpp_images_on_a_folder_whose_prompt_ids_pass_the_codes(boi_past_the_codes):
    """Sampled and greedy SJD++ images come out whole, no window is cut at the guard, and the
    engine keeps serving."""
    llm, prompts = boi_past_the_codes
    janus_shape = BOI_PAST_THE_CODES
    guard = runtime_of(llm).guard
    windows, cut = guard.windows, guard.cut
    for temperature in (1.0, 0.0, 1.0):
        sampling = [params(janus_shape.tokens, temperature=temperature, seed=i) for i in range(len(prompts))]
        codes = np.array(run(llm, prompts, sampling))
        assert codes.shape == (len(prompts), janus_shape.tokens) and codes.max() < janus_shape.codes
    assert guard.windows > windows and guard.cut == cut


def test_guard_cuts_windows_of_a_prior_that_copies_prompt_ids(boi_past_the_codes, monkeypatch):
    """Broken variant: the fresh-token history with the prompt in it (the bug as it was).  The
    guard cuts those windows before the model sees them: images still come out whole."""
    from vllm_sjdpp.engine.runtime import SJDPPRuntime

    def history_with_the_prompt(self, start, length):
        positions = np.asarray(start)[:, None] - length + np.arange(length)
        tokens = self.runner.input_batch.token_ids_cpu[np.arange(len(start))[:, None], np.maximum(positions, 0)]
        return np.where(positions >= 0, tokens, -1).astype(np.int64)

    monkeypatch.setattr(SJDPPRuntime, "history", history_with_the_prompt)
    llm, prompts = boi_past_the_codes
    janus_shape = BOI_PAST_THE_CODES
    guard = runtime_of(llm).guard
    cut = guard.cut
    codes = np.array(run(llm, prompts, [params(janus_shape.tokens, temperature=1.0, seed=i) for i in range(len(prompts))]))
    assert codes.shape == (len(prompts), janus_shape.tokens) and codes.max() < janus_shape.codes
    assert guard.cut > cut


def test_paired_layout_greedy_equals_transformers(make_engine, janus_folder, janus_shape, hf, prompts, monkeypatch):
    """One guidance branch per sequence (not Janus's default), under SJD++: each member of a pair
    embeds its prompt as text and its codes through the aligner, as the stacked layout does.
    Last in the module: the engine started here becomes the one metrics are read from.  On the
    small folder only: the layout reads no shape."""
    if janus_shape is not SMALL:
        pytest.skip("the layout is checked on the small folder")
    llm = make_engine(
        janus_folder, speculative_config=SJDPP, hf_overrides={"sjdpp_guidance_layout": "paired"}, **engine_args(janus_shape)
    )
    greedy = params(janus_shape.tokens, temperature=0, extra_args={"guidance_scale": 4.0})
    expected = hf_image_generate(hf, prompts, 4.0, do_sample=False)
    assert run(llm, prompts, greedy) == expected
    # Broken variant: the pairs' rows combined with their own logits (the conditional model alone).
    from vllm_sjdpp.guidance.cfg import GuidanceBatch

    monkeypatch.setattr(GuidanceBatch, "partner_rows", lambda self, rows: (rows[:0], rows[:0]))
    assert run(llm, prompts, greedy) != expected
