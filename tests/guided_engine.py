"""Helpers of the guidance engine tests: the tiny guided Llama's prompts, logprobs as arrays,
transformers' guided greedy decoding as the reference."""

from __future__ import annotations

import numpy as np
import torch

from tiny_llama import GUIDED_KEEP, GUIDED_PAD

VOCAB = 48
# make_engine's overrides for engines on the tiny guided Llama: logprobs of the whole vocabulary.
ENGINE = dict(max_logprobs=VOCAB)
# The same weights served as an ordinary Llama: the branches' reference.
PLAIN_LLAMA = dict(ENGINE, hf_overrides={"architectures": ["LlamaForCausalLM"]})


def uncond(prompt: list[int]) -> list[int]:
    return [t if t in GUIDED_KEEP else GUIDED_PAD for t in prompt]


def params(**kw):
    from vllm import SamplingParams

    return SamplingParams(ignore_eos=True, detokenize=False, **kw)


def run(llm, prompts, sampling):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)


def tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


def dense(logprob_dicts) -> np.ndarray:
    """vLLM's per-position {token: Logprob} (all VOCAB of them) -> [positions, VOCAB]."""
    out = np.full((len(logprob_dicts), VOCAB), np.nan)
    for i, d in enumerate(logprob_dicts):
        for t, lp in d.items():
            out[i, t] = lp.logprob
    return out


def branch_logprobs(llm, prompts, scales=None, max_tokens=12) -> list[tuple[list[int], np.ndarray, np.ndarray]]:
    """Greedy tokens, prompt logprobs and sampled-token logprobs (all VOCAB) per prompt, at one
    guidance scale per prompt (None: the engine's default)."""
    sampling = [
        params(temperature=0, max_tokens=max_tokens, logprobs=VOCAB, prompt_logprobs=VOCAB,
               extra_args=None if s is None else {"guidance_scale": s})
        for s in (scales or [None] * len(prompts))
    ]
    return [
        (list(o.outputs[0].token_ids), dense(o.prompt_logprobs[1:]), dense(o.outputs[0].logprobs))
        for o in run(llm, prompts, sampling)
    ]


def assert_branch(got, expected) -> None:
    for (t, p, g), (t_ref, p_ref, g_ref) in zip(got, expected):
        assert t == t_ref
        np.testing.assert_allclose(p, p_ref, atol=2e-4)
        np.testing.assert_allclose(g, g_ref, atol=2e-4)


def hf_greedy(hf_model, prompt, scale, negative=None, n=12, allowed=None) -> list[int]:
    """transformers' guided greedy decoding; `allowed`: its prefix_allowed_tokens_fn."""
    ids = torch.tensor([prompt])
    out = hf_model.generate(
        ids, max_new_tokens=n, do_sample=False, guidance_scale=scale,
        negative_prompt_ids=torch.tensor([negative or uncond(prompt)]), prefix_allowed_tokens_fn=allowed,
    )
    return out[0, len(prompt):].tolist()
