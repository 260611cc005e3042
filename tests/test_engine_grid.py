"""Stream grids in the engine: a guided model allows only the legal tokens at each generated
position (all k + 1 rows of an SJD++ window, each at its own), against transformers'
`generate(prefix_allowed_tokens_fn=...)` with guidance; and the digit model's images are
well-formed at every guidance scale.

The gridded tiny guided Llama (tests/tiny_llama.py TINY_GRID_CONFIG): 3 rows of 3 codes from
[2, 44), each closed by 44, then 45 46; its fresh drafts copy the left neighbour.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import guided_engine
from guided_engine import ENGINE, VOCAB, params, run, tokens, uncond
from stats import ALPHA, BROKEN_ALPHA, position_pair_pvalues
from tiny_llama import TINY_GRID
from vllm_sjdpp.kernels.grid import CODE

SJDPP = {"method": "sjdpp", "num_speculative_tokens": 6, "draft_token_budget": None}
PROMPTS = [[0, 5, 6, 7, 8], [0, 9, 10], [0, 20, 21, 22, 23, 24, 25], [0, 30]]


def grid():
    from vllm_sjdpp.kernels import StreamGrid

    return StreamGrid(*TINY_GRID["code_range"], TINY_GRID["codes_per_row"], TINY_GRID["rows"],
                      TINY_GRID["end_of_row"], tuple(TINY_GRID["closing"]))


LENGTH = grid().length


def allowed(prompt_len: int):
    """transformers' prefix_allowed_tokens_fn for the grid, from the same StreamGrid."""
    g = grid()

    def fn(batch_id, ids):
        must = int(g.slot_tokens(np.array(len(ids) - prompt_len)))
        return [must] if must >= 0 else list(range(g.code_start, g.code_stop) if must == CODE else range(VOCAB))

    return fn


@pytest.fixture(scope="module")
def engines(make_engine, tiny_grid_path):
    return make_engine(tiny_grid_path, **ENGINE), make_engine(tiny_grid_path, speculative_config=SJDPP, **ENGINE)


@pytest.fixture(scope="module")
def hf_model(tiny_grid_path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_grid_path).eval()
    model.generation_config.eos_token_id = None
    return model


def hf_greedy(hf_model, prompt, scale, constrained=True) -> list[int]:
    return guided_engine.hf_greedy(hf_model, prompt, scale, n=LENGTH, allowed=allowed(len(prompt)) if constrained else None)


def well_formed(stream) -> bool:
    return len(stream) == LENGTH and bool(grid().holds(np.arange(len(stream)), stream).all())


@pytest.mark.parametrize("scale", [1.5, 3.0])
def test_greedy_equals_transformers_with_the_grid(engines, hf_model, scale):
    expected = [hf_greedy(hf_model, p, scale) for p in PROMPTS]
    assert all(well_formed(e) for e in expected)
    assert not all(well_formed(hf_greedy(hf_model, p, scale, constrained=False)) for p in PROMPTS)
    greedy = params(temperature=0, max_tokens=LENGTH, extra_args={"guidance_scale": scale})
    for llm in engines:
        assert tokens(run(llm, PROMPTS, greedy)) == expected


def test_without_the_mask_streams_break(engines, hf_model, monkeypatch):
    """Broken variant: the model's logits left unconstrained; the engine then gives transformers'
    unconstrained tokens, which break the grid."""
    from vllm_sjdpp.guidance.cfg import GuidanceBatch

    monkeypatch.setattr(GuidanceBatch, "constrain", lambda self, logits, index: logits)
    greedy = params(temperature=0, max_tokens=LENGTH, extra_args={"guidance_scale": 3.0})
    got = tokens(run(engines[1], PROMPTS, greedy))
    assert got == [hf_greedy(hf_model, p, 3.0, constrained=False) for p in PROMPTS]
    assert not all(well_formed(s) for s in got)


def illegal_windows(engine, monkeypatch, grid_off: bool) -> tuple[int, int]:
    """(windows made, windows holding a token the grid forbids at its slot) over 64 sampled
    streams, read where the runtime keeps each request's next window."""
    from vllm_sjdpp.engine.runtime import runtime_of

    runtime = runtime_of(engine)
    record = runtime.record_windows
    windows = []

    def recording(plan, out):
        record(plan, out)
        prompt = runtime.runner.input_batch.num_prompt_tokens[: len(plan.states)]
        windows.extend((s.window.start - int(p), s.window.tokens) for s, p in zip(plan.states, prompt) if s.window)

    with monkeypatch.context() as mp:
        mp.setattr(runtime, "record_windows", recording)
        if grid_off:
            mp.setattr(runtime, "grid", None)
        sampling = [params(temperature=1.0, seed=i, max_tokens=LENGTH) for i in range(64)]
        run(engine, [PROMPTS[i % len(PROMPTS)] for i in range(64)], sampling)
    g = grid()
    return len(windows), sum(not g.holds(first + np.arange(len(d)), d).all() for first, d in windows)


def test_sjdpp_windows_follow_the_grid(engines, monkeypatch):
    """Every draft of every window the SJD++ engine keeps is legal at its slot: redrafts come from
    masked rows, fresh drafts (init "left") from the grid.  Broken variant: fresh drafts without
    the grid put codes at end-of-row slots and copy end-of-row tokens into code slots."""
    made, bad = illegal_windows(engines[1], monkeypatch, grid_off=False)
    assert made > 64 and bad == 0
    made, bad = illegal_windows(engines[1], monkeypatch, grid_off=True)
    assert bad > made // 10


SAMPLES = 3000
SAMPLE_PROMPT = [0, 5, 6, 7]


def hf_samples(hf_model, scale, constrained=True, seed=0) -> np.ndarray:
    torch.manual_seed(seed)
    out = hf_model.generate(
        torch.tensor([SAMPLE_PROMPT] * SAMPLES), do_sample=True, temperature=1.0, top_k=0, max_new_tokens=LENGTH,
        guidance_scale=scale, negative_prompt_ids=torch.tensor([uncond(SAMPLE_PROMPT)] * SAMPLES),
        prefix_allowed_tokens_fn=allowed(len(SAMPLE_PROMPT)) if constrained else None,
    )
    return out[:, len(SAMPLE_PROMPT):].numpy()


def test_sampling_matches_transformers_with_the_grid(engines, hf_model):
    """3000 sampled streams with SJD++ (drafts accepted: fresh drafts follow the grid), chi-square
    per position and per adjacent pair, Bonferroni over the comparisons, against transformers'
    own sampling with the same constraint; broken variant: transformers without it."""
    plain, sjdpp = engines
    sampling = params(temperature=1.0, max_tokens=LENGTH, extra_args={"guidance_scale": 3.0})
    before = sjdpp.get_metrics()
    got = np.array(tokens(run(sjdpp, [SAMPLE_PROMPT] * SAMPLES, sampling)))
    assert all(well_formed(s) for s in got)
    accepted = _accepted(sjdpp) - _accepted_in(before)
    assert accepted > SAMPLES * 3  # at least the end-of-row and closing slots
    pvalues = position_pair_pvalues(got, hf_samples(hf_model, 3.0), VOCAB)
    assert min(pvalues) > ALPHA / len(pvalues)
    assert min(position_pair_pvalues(got, hf_samples(hf_model, 3.0, constrained=False), VOCAB)) < BROKEN_ALPHA


def _accepted_in(metrics) -> float:
    return sum(m.value for m in metrics if m.name == "vllm:spec_decode_num_accepted_tokens")


def _accepted(llm) -> float:
    return _accepted_in(llm.get_metrics())


@pytest.fixture(scope="module")
def chunked(make_engine, tiny_grid_path, engines):
    # Module-scoped like every engine (one torn down mid-module takes vLLM's process-wide
    # parallel groups with it), and made after the tests that read metrics: vLLM's registry
    # is per process, `get_metrics` reads the newest engine's.
    return make_engine(tiny_grid_path, speculative_config=SJDPP, max_num_batched_tokens=16, max_num_seqs=4,
                       enable_chunked_prefill=True, **ENGINE)


def test_chunked_prefill_and_logprobs_under_the_grid(chunked, hf_model):
    """A 40-token prompt prefilled in 16-token chunks gives transformers' constrained greedy
    tokens, and the logprobs returned give every forbidden token -inf."""
    llm = chunked
    prompt = [0] + [2 + (7 * i) % 40 for i in range(39)]
    out = run(llm, [prompt], params(temperature=0, max_tokens=LENGTH, logprobs=VOCAB,
                                    extra_args={"guidance_scale": 3.0}))[0].outputs[0]
    assert list(out.token_ids) == hf_greedy(hf_model, prompt, 3.0)
    g = grid()
    for index, position in enumerate(out.logprobs):
        finite = sorted(t for t, lp in position.items() if lp.logprob > float("-inf"))
        must = int(g.slot_tokens(np.array(index)))
        assert finite == ([must] if must >= 0 else list(range(g.code_start, g.code_stop))), index


@pytest.fixture(scope="module")
def digits_sjdpp(make_engine, chunked):
    from vllm_sjdpp.digits.tokens import GENERATED_LENGTH
    from vllm_sjdpp.digits.train import DEFAULT_OUT

    return make_engine(DEFAULT_OUT, skip_tokenizer_init=False, dtype="auto", max_model_len=GENERATED_LENGTH + 64,
                       speculative_config={"method": "sjdpp", "num_speculative_tokens": 32, "draft_token_budget": None})


def test_digit_images_are_well_formed_at_every_scale(digits_sjdpp):
    """The bundled digit model under SJD++ with k = 32, 16 images at each of scales 1, 6 and 12:
    every stream is 16 rows of 16 codes, each closed by <eol>, then <eoi> (`ids_to_codes`
    strict).  Broken variant: without the mask, scale 12 breaks streams."""
    from vllm_sjdpp.digits.tokens import GENERATED_LENGTH, ids_to_codes
    from vllm_sjdpp.guidance.cfg import GuidanceBatch

    llm = digits_sjdpp
    prompts = [f"a handwritten {d % 10}" for d in range(16)]

    def streams(scale):
        sampling = []
        for i in range(len(prompts)):
            p = llm.get_default_sampling_params()
            p.max_tokens, p.seed, p.extra_args = GENERATED_LENGTH, i, {"guidance_scale": scale}
            sampling.append(p)
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sampling, use_tqdm=False)]

    def malformed(outs) -> int:
        bad = 0
        for s in outs:
            try:
                ids_to_codes(s, strict=True)
            except ValueError:
                bad += 1
        return bad

    for scale in (1.0, 6.0, 12.0):
        assert malformed(streams(scale)) == 0, scale
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.setattr(GuidanceBatch, "constrain", lambda self, logits, index: logits)
        assert malformed(streams(12.0)) > 0
