"""The heavy twin (vllm_sjdpp/digits/twin.py): a function-preserving widening of the digit model.
A small twin here (256 wide, 6 layers) so the tests stay fast; the benchmark's is 1024 x 10."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_sjdpp.digits import twin as heavy_twin
from vllm_sjdpp.digits.tokens import GENERATED_LENGTH, prompt_ids
from vllm_sjdpp.digits.train import DEFAULT_OUT


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    return heavy_twin.widen(DEFAULT_OUT, tmp_path_factory.mktemp("twin"), hidden=256, layers=6, intermediate=704)


@torch.no_grad()
def test_twin_computes_the_originals_logits_in_fp32(twin):
    from transformers import LlamaForCausalLM

    original = LlamaForCausalLM.from_pretrained(DEFAULT_OUT, dtype=torch.float32).eval()
    wide = LlamaForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
    assert wide.num_parameters() > 5 * original.num_parameters()
    ids = torch.cat([torch.tensor([prompt_ids(7)] * 4), torch.randint(0, 256, (4, 60), generator=torch.Generator().manual_seed(0))], 1)
    ref, got = original(ids).logits, wide(ids).logits
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
    # Broken variant: norms left as they were (eps and weights not rescaled) change the function.
    plain_norms = LlamaForCausalLM.from_pretrained(twin, dtype=torch.float32, rms_norm_eps=1e-6).eval()
    for module in plain_norms.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.weight.mul_(2.0)  # sqrt(256 / 128): undoes the rescaling
    assert (plain_norms(ids).logits - ref).abs().max() > 1e-2


def test_twin_needs_the_same_passes_in_bf16(make_engine, twin):
    """SJD++ on both in bf16, 16 images each with the same seeds: passes per image agree within
    noise (the twin's sums run in another order, so trajectories part after a while)."""
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": prompt_ids(d % 10)} for d in range(16)]
    results = {}
    for name, path in (("original", DEFAULT_OUT), ("twin", twin)):
        # Full windows: under "auto" the windows would follow this busy machine's timings.
        llm = make_engine(path, speculative_config={"method": "sjdpp", "draft_token_budget": None}, dtype="bfloat16", skip_tokenizer_init=False,
                          max_model_len=GENERATED_LENGTH + 64, max_num_seqs=16)
        before = next(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")
        outs = llm.generate(prompts, [SamplingParams(max_tokens=GENERATED_LENGTH, seed=i, ignore_eos=True)
                                      for i in range(16)], use_tqdm=False)
        accepted = next(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens") - before
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        results[name] = (tokens - accepted) / len(prompts)
        del llm
    print("passes per image:", results)
    assert results["twin"] < 0.6 * GENERATED_LENGTH  # SJD++ at work on the twin
    assert np.isclose(results["twin"], results["original"], rtol=0.15), results
