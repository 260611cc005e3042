"""Classifier-free guidance inside vLLM, plain and under SJD++, against independent references.

The tiny guided Llama has grouped queries (2 query heads, 1 KV head), so the stacking of the
branches' heads is tested where it matters.  Engines in this module:
- `plain_llama`: the same weights served as an ordinary Llama (the branches' reference);
- `guided`: guidance, no speculation (the AR baseline);
- `guided_sjdpp`: guidance and SJD++ (created last: metrics are read from the newest engine).
transformers' `generate(guidance_scale=..., negative_prompt_ids=...)` is the outside reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guided_engine import ENGINE, PLAIN_LLAMA, VOCAB, assert_branch, branch_logprobs, hf_greedy, params, run, tokens, uncond
from stats import ALPHA, BROKEN_ALPHA, position_pair_pvalues

SJDPP = {"method": "sjdpp", "num_speculative_tokens": 6}
PROMPTS = [[0, 5, 6, 7, 8], [0, 9, 10], [0, 20, 21, 22, 23, 24, 25], [0, 30]]


@pytest.fixture(scope="module")
def plain_llama(make_engine, tiny_guided_path):
    return make_engine(tiny_guided_path, **PLAIN_LLAMA)


@pytest.fixture(scope="module")
def guided(make_engine, tiny_guided_path):
    return make_engine(tiny_guided_path, **ENGINE)


@pytest.fixture(scope="module")
def guided_sjdpp(make_engine, tiny_guided_path, plain_llama, guided):
    return make_engine(tiny_guided_path, speculative_config=SJDPP, **ENGINE)


def test_engine_sees_twice_the_heads_and_half_the_kv_tokens(guided, plain_llama):
    """What attention backends and the KV cache read from the model config: both branches' heads.
    The same KV memory then holds half the tokens (vLLM's "KV cache size" log line)."""
    config, reference = guided.llm_engine.vllm_config, plain_llama.llm_engine.vllm_config
    parallel = config.parallel_config
    assert config.model_config.get_num_kv_heads(parallel) == 2 * reference.model_config.get_num_kv_heads(parallel)
    assert config.model_config.get_num_attention_heads(parallel) == 4
    assert config.model_config.get_head_size() == reference.model_config.get_head_size()
    assert 2 * config.cache_config.num_gpu_blocks == reference.cache_config.num_gpu_blocks


@pytest.mark.parametrize("engine", ["guided", "guided_sjdpp"])
def test_branches_equal_two_plain_engines(request, plain_llama, engine):
    """Scale 1 is the cond branch alone, scale 0 the uncond branch alone: each must equal an
    ordinary engine run on the cond prompt or on the uncond prompt, logits included."""
    llm = request.getfixturevalue(engine)
    assert_branch(branch_logprobs(llm, PROMPTS, [1.0] * 4), branch_logprobs(plain_llama, PROMPTS))
    assert_branch(
        branch_logprobs(llm, PROMPTS, [0.0] * 4), branch_logprobs(plain_llama, [uncond(p) for p in PROMPTS])
    )


def test_interleaved_heads_break_grouped_queries(guided, plain_llama, monkeypatch):
    """Broken variant: [c0 u0 c1 u1 ...] heads instead of [cond | uncond] blocks send uncond
    queries to cond keys under GQA; the branch test above must then fail."""
    from vllm_sjdpp.guidance.llama import GuidedLlamaAttention

    def interleave(x, n):  # [2T, n*d] (cond rows, uncond rows) -> [T, 2n*d], heads alternating
        c, u = x.chunk(2)
        return torch.stack([c.view(c.shape[0], n, -1), u.view(u.shape[0], n, -1)], 2).reshape(c.shape[0], -1)

    def forward(self, positions, hidden_states):
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        heads, kv_heads = self.num_heads // 2, self.num_kv_heads // 2
        out = self.attn(interleave(q, heads), interleave(k, kv_heads), interleave(v, kv_heads))
        out = out.view(out.shape[0], heads, 2, -1)
        output, _ = self.o_proj(torch.cat([out[:, :, 0].flatten(1), out[:, :, 1].flatten(1)]))
        return output

    monkeypatch.setattr(GuidedLlamaAttention, "forward", forward)
    with pytest.raises(AssertionError):
        assert_branch(
            branch_logprobs(guided, PROMPTS, [0.0] * 4), branch_logprobs(plain_llama, [uncond(p) for p in PROMPTS])
        )


@pytest.mark.parametrize("scale", [1.5, 3.0])
def test_greedy_equals_transformers(guided, guided_sjdpp, hf_guided, scale):
    expected = [hf_greedy(hf_guided, p, scale) for p in PROMPTS]
    assert expected != [hf_greedy(hf_guided, p, 1.0) for p in PROMPTS]  # guidance changes the output
    greedy = params(temperature=0, max_tokens=12, extra_args={"guidance_scale": scale})
    assert tokens(run(guided, PROMPTS, greedy)) == expected
    assert tokens(run(guided_sjdpp, PROMPTS, greedy)) == expected


# Sampled: per-position and adjacent-pair chi-square, Bonferroni over the 9 comparisons.
SAMPLES, LENGTH = 3000, 5
SAMPLE_PROMPT = [0, 5, 6, 7]


def vllm_samples(llm, scale, top_k) -> np.ndarray:
    # Unseeded requests draw from the engine's generator, seeded by ENGINE["seed"].
    sampling = params(temperature=1.0, top_k=top_k, max_tokens=LENGTH, extra_args={"guidance_scale": scale})
    return np.array(tokens(run(llm, [SAMPLE_PROMPT] * SAMPLES, sampling)))


def hf_samples(hf_guided, scale, top_k, seed=0) -> np.ndarray:
    torch.manual_seed(seed)
    out = hf_guided.generate(
        torch.tensor([SAMPLE_PROMPT] * SAMPLES), do_sample=True, temperature=1.0, top_k=max(top_k, 0),
        max_new_tokens=LENGTH, guidance_scale=scale,
        negative_prompt_ids=torch.tensor([uncond(SAMPLE_PROMPT)] * SAMPLES),
    )
    return out[:, len(SAMPLE_PROMPT):].numpy()


@torch.no_grad()
def topk_before_guidance_samples(hf_guided, scale, top_k, seed=0) -> np.ndarray:
    """Broken variant: top-k applied to the cond logits before they are combined."""
    gen = torch.Generator().manual_seed(seed)
    cond = torch.tensor([SAMPLE_PROMPT] * SAMPLES)
    unc = torch.tensor([uncond(SAMPLE_PROMPT)] * SAMPLES)
    for _ in range(LENGTH):
        lc = hf_guided(cond).logits[:, -1].float()
        lu = hf_guided(unc).logits[:, -1].float()
        kth = lc.topk(top_k, -1).values[:, -1:]
        lc = lc.masked_fill(lc < kth, float("-inf"))
        nxt = torch.multinomial((lu + scale * (lc - lu)).softmax(-1), 1, generator=gen)
        cond, unc = torch.cat([cond, nxt], 1), torch.cat([unc, nxt], 1)
    return cond[:, len(SAMPLE_PROMPT):].numpy()


def same(a, b) -> bool:
    pvalues = position_pair_pvalues(a, b, VOCAB)
    return min(pvalues) > ALPHA / len(pvalues)


def differ(a, b) -> bool:
    return min(position_pair_pvalues(a, b, VOCAB)) < BROKEN_ALPHA


@pytest.mark.parametrize("scale, top_k", [(1.5, -1), (1.5, 3), (3.0, -1), (3.0, 3)])
def test_sampling_matches_plain_guided_and_transformers(guided, guided_sjdpp, hf_guided, scale, top_k):
    sjdpp = vllm_samples(guided_sjdpp, scale, top_k)
    assert same(sjdpp, vllm_samples(guided, scale, top_k))
    reference = hf_samples(hf_guided, scale, top_k)
    assert same(sjdpp, reference)
    # Broken variants the same test must reject:
    assert differ(sjdpp, hf_samples(hf_guided, 1.0, top_k))  # verifying against the cond-only p
    if top_k > 0:
        assert differ(sjdpp, topk_before_guidance_samples(hf_guided, scale, top_k))


def test_mixed_batch(guided_sjdpp, plain_llama, hf_guided):
    """Guided and unguided (scale 1) requests, n > 1, seeds, per-request windows and a plain
    (sjdpp_disable) request in one batch."""
    requests = [
        (PROMPTS[0], params(temperature=0, max_tokens=20, extra_args={"guidance_scale": 3.0})),
        (PROMPTS[1], params(temperature=0, max_tokens=20, extra_args={"guidance_scale": 1.0})),
        (PROMPTS[2], params(temperature=1.0, n=3, max_tokens=15, seed=5, extra_args={"guidance_scale": 2.0})),
        (PROMPTS[3], params(temperature=0, max_tokens=17, extra_args={"guidance_scale": 1.5, "sjdpp_num_speculative_tokens": 2})),
        (PROMPTS[0], params(temperature=0, max_tokens=9, extra_args={"guidance_scale": 3.0, "sjdpp_disable": True})),
        (PROMPTS[1], params(temperature=0.8, top_k=4, max_tokens=25, seed=11)),
    ]
    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    outs = guided_sjdpp.generate(prompts, [s for _, s in requests], use_tqdm=False)
    assert [len(c.token_ids) for o in outs for c in o.outputs] == [20, 20, 15, 15, 15, 17, 9, 25]
    assert list(outs[0].outputs[0].token_ids) == hf_greedy(hf_guided, PROMPTS[0], 3.0, n=20)
    assert list(outs[1].outputs[0].token_ids) == tokens(run(plain_llama, [PROMPTS[1]], params(temperature=0, max_tokens=20)))[0]
    assert list(outs[3].outputs[0].token_ids) == hf_greedy(hf_guided, PROMPTS[3], 1.5, n=17)
    assert list(outs[4].outputs[0].token_ids) == hf_greedy(hf_guided, PROMPTS[0], 3.0, n=9)
    again = guided_sjdpp.generate(prompts, [s for _, s in requests], use_tqdm=False)
    for i in (2, 5):  # seeded requests repeat
        assert [list(c.token_ids) for c in again[i].outputs] == [list(c.token_ids) for c in outs[i].outputs]


def test_prefix_caching_with_negative_prompts(guided_sjdpp, hf_guided):
    """A repeated prompt hits the cache and repeats; the same prompt with another negative
    prompt must not reuse the first one's unconditional KV (cache_salt)."""
    block = guided_sjdpp.llm_engine.vllm_config.cache_config.block_size
    prompt = [0] + [(5 * i) % 40 + 2 for i in range(block + 7)]  # one full block and more
    greedy = params(temperature=0, max_tokens=10, extra_args={"guidance_scale": 3.0})
    first, second = (run(guided_sjdpp, [prompt], greedy)[0] for _ in range(2))
    assert second.num_cached_tokens > 0
    assert list(first.outputs[0].token_ids) == list(second.outputs[0].token_ids) == hf_greedy(hf_guided, prompt, 3.0, n=10)
    negative = [0] + [3] * (len(prompt) - 1)
    other = params(temperature=0, max_tokens=10, extra_args={"guidance_scale": 3.0, "negative_prompt_token_ids": negative})
    got = list(run(guided_sjdpp, [prompt], other)[0].outputs[0].token_ids)
    assert got == hf_greedy(hf_guided, prompt, 3.0, negative=negative, n=10)
    assert got != list(first.outputs[0].token_ids)


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"guidance_scale": -2.0}, "guidance_scale"),
        ({"negative_prompt_token_ids": []}, "at least one token id"),
        ({"negative_prompt_token_ids": [0, 1, 2, 3, VOCAB]}, "negative_prompt_token_ids"),
    ],
)
def test_bad_guidance_options_are_refused(guided_sjdpp, extra, match):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=match):
        run(guided_sjdpp, [PROMPTS[0]], params(temperature=1.0, max_tokens=3, extra_args=extra))
    assert len(tokens(run(guided_sjdpp, [PROMPTS[0]], params(temperature=1.0, max_tokens=3)))[0]) == 3


def test_guidance_on_an_unguided_model_is_refused(plain_llama):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="not served with guidance"):
        run(plain_llama, [PROMPTS[0]], params(max_tokens=3, extra_args={"guidance_scale": 3.0}))


@pytest.mark.parametrize("scale", [2.0, 1.0], ids=["guided", "scale-1"])
def test_a_seed_names_one_output_on_every_server(guided, guided_sjdpp, scale):
    """200 seeds, guidance on and off: the guided model served without --speculative-config, with
    SJD++ drafting and with sjdpp_disable give the same tokens (engine.race_sampler and the
    step race one position-keyed noise)."""
    prompts = [PROMPTS[s % len(PROMPTS)] for s in range(200)]

    def seeded(llm, extra=None):
        sampling = [params(temperature=1.0, top_k=12, max_tokens=24, seed=s, extra_args={"guidance_scale": scale, **(extra or {})})
                    for s in range(200)]
        return tokens(run(llm, prompts, sampling))

    expected = seeded(guided)
    assert len(set(map(tuple, expected))) > 150
    assert seeded(guided_sjdpp) == expected
    assert seeded(guided_sjdpp, {"sjdpp_disable": True}) == expected
