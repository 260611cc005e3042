"""Janus image generation in vLLM (guided, plain and SJD++) against transformers' own Janus
(`JanusForConditionalGeneration.generate(generation_mode="image")`), on a tiny random folder
built locally: 16 image tokens (a 4x4 grid) over 64 codes, a Llama with grouped queries.

Engines: `janus` (guidance, no speculation) and `janus_sjdpp` (guidance and SJD++, the family's
defaults: fresh codes copied from the row above, rows of 4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stats import ALPHA, BROKEN_ALPHA, position_pair_pvalues
from tiny_janus import CODES, GRID, IMAGE_SIZE
from tiny_llama import set_engine_env

set_engine_env()

TEXTS = ["a red dog under the sun", "the big green tree", "a small blue house under the rain", "a cat"]
ENGINE = dict(
    skip_tokenizer_init=True, enforce_eager=True, max_model_len=128, dtype="float32", seed=0, max_logprobs=CODES,
    disable_log_stats=False,
)
# Full windows: these tests verify drafts, which "auto" would cut on a busy CPU.
SJDPP = {"method": "sjdpp", "num_speculative_tokens": 6, "draft_token_budget": None}
TOKENS = GRID * GRID


@pytest.fixture(scope="module")
def family(tiny_janus_path):
    from vllm_sjdpp import families

    return families.load(tiny_janus_path)


@pytest.fixture(scope="module")
def prompts(family):
    return [family.prompt_ids(t) for t in TEXTS]


@pytest.fixture(scope="module")
def janus(tiny_janus_path):
    from vllm import LLM

    return LLM(tiny_janus_path, **ENGINE)


@pytest.fixture(scope="module")
def janus_sjdpp(tiny_janus_path, janus):
    from vllm import LLM

    return LLM(tiny_janus_path, speculative_config=SJDPP, **ENGINE)


@pytest.fixture(scope="module")
def hf(tiny_janus_path):
    from transformers import JanusForConditionalGeneration

    return JanusForConditionalGeneration.from_pretrained(tiny_janus_path).eval()


def params(**kw):
    from vllm import SamplingParams

    return SamplingParams(ignore_eos=True, detokenize=False, max_tokens=TOKENS, **kw)


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
    prompt position and at each image token but the last, [len(codes), CODES]."""
    text = hf.model.language_model.embed_tokens(torch.tensor([prompt]))
    image = hf.prepare_embeddings_for_image_generation(torch.tensor([codes[:-1]]))
    hidden = hf.model.language_model(inputs_embeds=torch.cat([text, image], 1)).last_hidden_state
    return torch.log_softmax(hf.model.generation_head(hidden[0, len(prompt) - 1 :]).float(), -1).numpy()


def vllm_branch_logprobs(llm, prompts, scale) -> list[tuple[list[int], np.ndarray]]:
    """Greedy codes and the logprobs of all CODES at each generated position, at one scale."""
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        params(temperature=0, logprobs=CODES, extra_args={"guidance_scale": scale}), use_tqdm=False,
    )
    result = []
    for o in outs:
        dense = np.full((TOKENS, CODES), np.nan)
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


def test_family_reads_the_folder(tiny_janus_path, family, prompts):
    from transformers import AutoConfig

    from vllm_sjdpp import families
    from vllm_sjdpp.families.janus import JanusFamily

    config = AutoConfig.from_pretrained(tiny_janus_path)
    assert families.family_of(config) is JanusFamily
    assert JanusFamily.sjdpp_defaults(config) == {"fresh_token_range": [0, CODES], "row_width": GRID, "init": "above"}
    assert JanusFamily.image_vocab_size(config) == CODES
    assert family.tokens_per_image == TOKENS and family.image_size == (IMAGE_SIZE, IMAGE_SIZE)
    rule = family_rule(family)
    bos, boi = prompts[0][0], prompts[0][-1]
    assert rule.keep_token_ids == {bos, boi} and uncond(family, prompts[0])[1:-1] == [rule.pad_token_id] * (len(prompts[0]) - 2)
    assert len({tuple(p) for p in prompts}) == len(TEXTS)
    with pytest.raises(ValueError, match="empty"):
        family.prompt_ids("  ")


def test_image_decodes_with_the_folders_vq_model(family, hf):
    codes = list(range(0, 2 * TOKENS, 2))
    image = family.to_image(codes)
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
    with torch.no_grad():
        pixels = hf.decode_image_tokens(torch.tensor([codes]))[0].numpy()  # [H, W, 3], normalised
    processor = family.processor.image_processor  # undo its normalisation
    expected = np.clip((pixels * processor.image_std + processor.image_mean) * 255, 0, 255)
    assert np.abs(np.asarray(image).astype(float) - expected).max() <= 1.0
    assert np.asarray(image).std() > 0  # not a blank image
    with pytest.raises(ValueError, match="16 tokens"):
        family.to_image(codes[:-1])
    with pytest.raises(ValueError, match="codes in"):
        family.to_image([CODES] * TOKENS)


# Logits, greedy and sampling against transformers ---------------------------------------------------


@pytest.mark.parametrize("engine", ["janus", "janus_sjdpp"])
def test_branch_logits_equal_transformers(request, family, prompts, hf, engine):
    """Scale 1 is the cond branch alone and scale 0 the uncond branch alone: at every generated
    position (the first one is the prompt's last position), all 64 logprobs equal transformers'."""
    llm = request.getfixturevalue(engine)
    for scale, branch_prompts in ((1.0, prompts), (0.0, [uncond(family, p) for p in prompts])):
        for (codes, got), prompt in zip(vllm_branch_logprobs(llm, prompts, scale), branch_prompts):
            np.testing.assert_allclose(got, hf_branch_logprobs(hf, prompt, codes), atol=2e-4)
            assert codes == list(np.argmax(got, 1))


def test_image_codes_embedded_as_text_break_the_logits(janus, family, prompts, hf, monkeypatch):
    """Broken variant: every position embedded as text (the id space read without positions)."""
    from vllm_sjdpp.guidance import GuidanceBatch

    monkeypatch.setattr(GuidanceBatch, "prompt_mask", lambda self, n: torch.ones(n, dtype=torch.bool))
    (codes, got), = vllm_branch_logprobs(janus, prompts[:1], 1.0)
    assert np.abs(got - hf_branch_logprobs(hf, prompts[0], codes)).max() > 1e-2


@pytest.mark.parametrize("scale", [1.5, 4.0])
def test_guided_greedy_equals_transformers(janus, janus_sjdpp, hf, prompts, scale):
    expected = hf_image_generate(hf, prompts, scale, do_sample=False)
    assert expected != hf_image_generate(hf, prompts, 1.01, do_sample=False)  # guidance matters here
    greedy = params(temperature=0, extra_args={"guidance_scale": scale})
    assert run(janus, prompts, greedy) == expected
    assert run(janus_sjdpp, prompts, greedy) == expected


# Sampled: per-position and adjacent-pair chi-square over 16 positions, Bonferroni over 31.
SAMPLES = 2000


def same(a, b) -> bool:
    pvalues = position_pair_pvalues(a, b, CODES)
    return min(pvalues) > ALPHA / len(pvalues)


def differ(a, b) -> bool:
    return min(position_pair_pvalues(a, b, CODES)) < BROKEN_ALPHA


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


def test_sjdpp_sampling_matches_transformers(janus_sjdpp, hf, prompts):
    scale = 3.0
    before = accepted_drafts(janus_sjdpp)
    sjdpp = np.array(run(janus_sjdpp, [prompts[0]] * SAMPLES, params(temperature=1.0, extra_args={"guidance_scale": scale})))
    assert sjdpp.shape == (SAMPLES, TOKENS)
    passes = SAMPLES * TOKENS - (accepted_drafts(janus_sjdpp) - before)
    # SJD++ at work: drafts accepted (a random model's Jacobi trajectories are erratic: 0.94 of
    # the plain passes measured) and rejected.
    assert 0.5 * SAMPLES * TOKENS < passes < 0.97 * SAMPLES * TOKENS
    assert same(sjdpp, hf_samples(hf, prompts[0], scale))
    # Broken variant the same test must reject: the cond-only distribution.
    unguided = np.array(run(janus_sjdpp, [prompts[0]] * SAMPLES, params(temperature=1.0, extra_args={"guidance_scale": 1.0})))
    assert differ(unguided, hf_samples(hf, prompts[0], scale))


# Bad input --------------------------------------------------------------------------------------


def test_options_that_index_text_ids_are_refused(janus, janus_sjdpp, prompts):
    """Options vLLM would apply to logits by text id, and prompt ids outside the vocabulary, are
    refused (HTTP 400 in the server), and the engines keep serving."""
    from vllm.exceptions import VLLMValidationError

    for bad in (dict(prompt_logprobs=1), dict(repetition_penalty=1.2), dict(min_tokens=3),
                dict(allowed_token_ids=[1, 2]), dict(logit_bias={CODES: 1.0})):
        with pytest.raises(VLLMValidationError, match=next(iter(bad))):
            run(janus, prompts[:1], params(temperature=1.0, **bad))
    for llm in (janus, janus_sjdpp):
        with pytest.raises(VLLMValidationError, match=r"prompt token ids must be in \[0, 100\)"):
            run(llm, [[0, 5, 10**6]], params(temperature=1.0))
    # Image codes may be biased (without speculation: vLLM refuses logit_bias with it).
    biased = run(janus, prompts[:1] * 50, params(temperature=1.0, logit_bias={3: 100.0}))
    assert all(codes == [3] * TOKENS for codes in biased)
    assert len(run(janus_sjdpp, prompts[:1], params(temperature=1.0))[0]) == TOKENS


@pytest.mark.parametrize("break_it, message", [
    (lambda c, g: delattr(c, "vq_config"), "vq_config"),
    (lambda c, g: setattr(c.text_config, "model_type", "qwen2"), "must be a Llama"),
    (lambda c, g: setattr(c.vq_config, "num_embeddings", 10**6), "exceed the text vocabulary"),
    (lambda c, g: setattr(c.vision_config, "num_image_tokens", 17), "not a 4x4 grid"),
    (lambda c, g: g.pop("pad_token_id"), "pad_token_id"),
    (lambda c, g: g.pop("bos_token_id"), "bos_token_id"),
])
def test_janus_check_names_what_a_folder_lacks(tiny_janus_path, family, break_it, message):
    import copy
    import json

    from vllm_sjdpp.families.janus import JanusFamily

    config = copy.deepcopy(family.config)
    generation = json.loads((family.folder / "generation_config.json").read_text())
    JanusFamily.check(config, generation)  # the tiny folder itself passes
    break_it(config, generation)
    with pytest.raises(ValueError, match=message):
        JanusFamily.check(config, generation)


def test_a_folder_that_is_not_janus_is_refused_naming_what_is_missing(tiny_janus_path, tmp_path):
    import json
    import shutil

    from vllm import LLM

    folder = tmp_path / "no-boi"
    shutil.copytree(tiny_janus_path, folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    del generation["generation_kwargs"]
    (folder / "generation_config.json").write_text(json.dumps(generation))
    with pytest.raises(Exception, match="boi_token_id"):
        LLM(str(folder), **ENGINE)
