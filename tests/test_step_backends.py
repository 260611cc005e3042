"""Every row pass (eager PyTorch, Inductor-fused PyTorch, Triton) gives the same step.

On a CUDA machine the cases run on the GPU; without one, conftest.py runs the kernel in
Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vllm_sjdpp.kernels import FreshTokens, StepBatch, StepNoise, sjdpp_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# What lives on the device; the step reads the rest (counts, drafts, settings) on the host.
DEVICE_FIELDS = {"target_probs", "draft_probs"}  # and the noise's tensors (`StepNoise.to`)


def _to_device(obj):
    """A step input with its device tensors moved to DEVICE."""
    if isinstance(obj, StepNoise):
        return obj.to(DEVICE)
    moved = {
        f.name: getattr(obj, f.name).to(DEVICE)
        for f in dataclasses.fields(obj)
        if f.name in DEVICE_FIELDS and isinstance(getattr(obj, f.name), torch.Tensor)
    }
    return dataclasses.replace(obj, **moved)


CASES = {
    # name: (drafts per request, vocabulary, greedy pattern)
    "k1-random": ([1, 1, 1], 37, "random"),
    "k64-random": ([64], 300, "random"),
    "k64-two-blocks": ([64, 5], 5000, "random"),  # 5000 = one 4096 block and a partial one
    "empty-windows": ([0, 3, 0], 37, "random"),
    "all-empty": ([0, 0], 37, "random"),
    "all-greedy": ([4, 0, 7], 130, "greedy"),
    "mixed": ([3, 0, 16, 1, 8], 1000, "mixed"),
}


def _case(num_drafts, vocab, pattern, dtype, seed, gumbel="none"):
    """A random step; `gumbel`: which requests are Gumbel-coupled ("none", "all", "mixed"), their
    noise keyed by position."""
    g = torch.Generator().manual_seed(seed)
    b = len(num_drafts)
    nd = torch.tensor(num_drafts)
    t = int(nd.sum())
    # Peaked rows so that drafts are often accepted and every branch is exercised; a batch keyed
    # throughout gets vLLM's top-k (zeros), so that CPU backends race where a token can win.
    logits = torch.randn(t + b, vocab, generator=g) * 2
    if gumbel == "all":
        logits = logits.masked_fill(logits < logits.topk(min(3, vocab // 16), -1).values[:, -1:], -torch.inf)
    p = torch.softmax(logits, -1)
    q = torch.softmax(torch.randn(t, vocab, generator=g) * 2, -1)
    req = torch.repeat_interleave(torch.arange(b), nd)
    rows = torch.arange(t) + req
    mixed = torch.rand(t, generator=g)
    drafts = torch.where(
        mixed < 0.5,
        p[rows].argmax(-1) if t else torch.zeros(0, dtype=torch.long),
        torch.multinomial(q, 1, generator=g).squeeze(1) if t else torch.zeros(0, dtype=torch.long),
    )
    greedy = {
        "random": torch.zeros(b, dtype=torch.bool),
        "greedy": torch.ones(b, dtype=torch.bool),
        "mixed": torch.arange(b) % 2 == 1,
    }[pattern]
    next_len = torch.randint(0, 20, (b,), generator=g)
    batch = StepBatch(
        cu_num_draft_tokens=torch.cumsum(nd, 0),
        target_probs=p.to(dtype),
        draft_token_ids=drafts,
        draft_probs=q.to(dtype),
        draft_is_onehot=torch.rand(t, generator=g) < 0.3,
        greedy=greedy,
        reuse=torch.arange(b) % 3,
        threshold=torch.full((b,), 0.02),
        next_window_len=next_len,
        gumbel={"none": torch.zeros(b, dtype=torch.bool), "all": torch.ones(b, dtype=torch.bool),
                "mixed": torch.arange(b) % 2 == 0}[gumbel],
    )
    noise = StepNoise.sample(t + b, vocab, int(next_len.sum()), generator=g)
    keys = {i: (seed * 1000 + i, 50 + i) for i in range(b) if bool(batch.gumbel[i])}
    if keys:  # the Gumbel requests' rows race position-keyed noise
        keyed = StepNoise.sample_per_request((nd + 1).tolist(), next_len.tolist(), vocab, {}, keys=keys)
        is_keyed = batch.gumbel[torch.repeat_interleave(torch.arange(b), nd + 1)]
        noise = keyed if gumbel == "all" else dataclasses.replace(  # "all": keyed as the engine keys a batch
            noise, exponentials=torch.where(is_keyed[:, None], keyed.race_noise(), noise.exponentials)
        )
    history = torch.randint(0, vocab, (b, 6), generator=g)
    fresh = FreshTokens.build(
        [("random", "left", "above")[i % 3] for i in range(b)],
        [range(vocab // 2, vocab)] * b,
        history,
        row_width=[5] * b,
    )
    return _to_device(batch), _to_device(noise), _to_device(fresh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("backend", ["inductor", "torch"])
@pytest.mark.parametrize("gumbel", ["none", "mixed", "all"])
def test_backends_equal_triton(backend, name, dtype, seed, gumbel):
    batch, noise, fresh = _case(*CASES[name], dtype, seed, gumbel)
    ref = sjdpp_step(batch, noise, fresh, backend="triton")
    if gumbel == "all" and dtype == torch.float32 and DEVICE == "cpu":  # the race where a token can win runs
        assert noise.keyed.race(batch.target_probs) is not None
    out = sjdpp_step(batch, noise, fresh, backend=backend)
    assert torch.equal(out.num_accepted, ref.num_accepted)
    assert torch.equal(out.output_token_ids, ref.output_token_ids)
    assert torch.equal(out.next_cu_num_draft_tokens, ref.next_cu_num_draft_tokens)
    assert torch.equal(out.next_draft_token_ids, ref.next_draft_token_ids)
    assert torch.equal(out.next_draft_is_onehot, ref.next_draft_is_onehot)
    assert torch.equal(out.next_draft_prob_rows, ref.next_draft_prob_rows)
    torch.testing.assert_close(
        out.next_draft_probs.float(), ref.next_draft_probs.float(), atol=1e-6, rtol=0
    )


def test_cases_exercise_every_branch():
    """Guards the equivalence test: the cases must reach rejections, full acceptance, reuse."""
    seen_partial = seen_full = seen_kept = seen_redrawn = False
    for name, (nd, vocab, pattern) in CASES.items():
        batch, noise, fresh = _case(nd, vocab, pattern, torch.float32, 0)
        out = sjdpp_step(batch, noise, fresh, backend="torch")
        k = torch.tensor(nd, device=DEVICE)
        seen_partial |= bool(((out.num_accepted > 0) & (out.num_accepted < k)).any())
        seen_full |= bool(((out.num_accepted == k) & (k > 0)).any())
        n = batch.next_window_len
        req = torch.repeat_interleave(torch.arange(len(nd), device=DEVICE), n)
        slot = torch.arange(int(n.sum()), device=DEVICE) - (torch.cumsum(n, 0) - n)[req]
        redrafted = slot < torch.minimum(k - out.num_accepted, n)[req]
        random = ~batch.greedy[req]
        # A one-hot slot among the redrafted ones of a random request is a confidently kept draft.
        seen_kept |= bool((redrafted & random & out.next_draft_is_onehot).any())
        seen_redrawn |= bool((redrafted & random & ~out.next_draft_is_onehot).any())
    assert seen_partial and seen_full and seen_kept and seen_redrawn


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_proposals_read_through_draft_prob_rows(backend):
    """q rows kept at other rows of a larger buffer give the same step as a packed [T, V]."""
    batch, noise, fresh = _case(*CASES["mixed"], torch.float32, 0)
    t, vocab = batch.draft_probs.shape
    where = torch.randperm(3 * t, generator=torch.Generator().manual_seed(0))[:t].to(DEVICE)
    buffer = torch.rand(3 * t, vocab, device=DEVICE)
    buffer[where] = batch.draft_probs
    indirect = dataclasses.replace(batch, draft_probs=buffer, draft_prob_rows=where)
    ref = sjdpp_step(batch, noise, fresh, backend=backend)
    out = sjdpp_step(indirect, noise, fresh, backend=backend)
    assert torch.equal(out.output_token_ids, ref.output_token_ids)
    assert torch.equal(out.next_draft_token_ids, ref.next_draft_token_ids)
    # and the buffer's garbage rows really are not the ones read:
    scrambled = dataclasses.replace(indirect, draft_prob_rows=torch.roll(where, 1))
    assert not torch.equal(sjdpp_step(scrambled, noise, fresh, backend=backend).next_draft_token_ids, ref.next_draft_token_ids)


@pytest.mark.parametrize("gumbel, crossings", [("all", {"fetch": 1, "send": 1}), ("none", {"fetch": 2, "send": 3})])
def test_the_step_crosses_the_host_device_boundary_as_budgeted(gumbel, crossings):
    """kernels/host.py: a Gumbel-coupled step reads the device once (winners, argmaxes) and
    writes it once (its outputs); a ratio-test step adds the row pass after the plan.  Counted at
    the boundary, so a new read cannot creep in; and an input left on a device is refused."""
    from vllm_sjdpp.kernels import host

    batch, noise, fresh = _case([4, 0, 7], 300, "mixed", torch.float32, 0, gumbel)
    before = dict(host.TRANSFERS)
    sjdpp_step(batch, noise, fresh)
    assert {k: host.TRANSFERS[k] - before.get(k, 0) for k in ("fetch", "send")} == crossings
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="host array"):
            sjdpp_step(dataclasses.replace(batch, greedy=batch.greedy.cuda()), noise, fresh)


GRAPHS_COMPILED_BY_STEPS = """
import sys, torch
from torch._dynamo.utils import counters
sys.path.insert(0, sys.argv[1])
import test_step_backends as t
from vllm_sjdpp.kernels.step import compile_cpu_step
if sys.argv[2] == "warm":
    compile_cpu_step(4096)
elif sys.argv[2] == "warm-with-grad":  # broken: compiled outside the engine's inference mode
    from vllm_sjdpp.kernels.noise import compile_keyed_exponentials
    from vllm_sjdpp.kernels.row_pass_torch import compile_inductor
    compile_inductor(4096)
    compile_keyed_exponentials(4096)
before = counters["stats"]["unique_graphs"]
steps = [(name, gumbel) for name in ("k1-random", "k64-two-blocks", "mixed", "all-greedy")
         for gumbel in ("none", "all", "mixed")]  # the ratio test, Gumbel coupling, both
with torch.inference_mode():  # as vLLM runs the step
    for name, gumbel in steps:
        t.sjdpp_step(*t._case(*t.CASES[name], torch.float32, 0, gumbel), backend="inductor")
        if sys.argv[2] != "warm" and counters["stats"]["unique_graphs"] > before:
            break  # a broken variant is told by its first compile: the rest would only compile more
print(counters["stats"]["unique_graphs"] - before)
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="the fused PyTorch row pass is the CPU's")
def test_a_server_compiles_the_row_pass_before_its_first_step():
    """`compile_cpu_step`, which an SJD++ engine on a CPU runs while it starts
    (`engine.runtime.compile_step`), compiles the fused row pass and noise at every shape a step meets: in a
    fresh process, steps of one row and of many, under the ratio test and Gumbel coupling, at
    other vocabularies, in inference mode as vLLM runs them, compile no Dynamo graph afterwards.
    Broken variants: without it (a fresh process's first steps), and compiled outside inference
    mode (Dynamo guards on the grad mode: as the engine did until 2026-12-06), they compile; each
    stops at its first step that does (with a cold Inductor cache the first took 49 s run through,
    21 s so)."""
    import subprocess
    import sys
    from pathlib import Path

    def graphs(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", GRAPHS_COMPILED_BY_STEPS, str(Path(__file__).parent), mode],
                             capture_output=True, text=True, timeout=600, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    assert graphs("cold") > 0
    assert graphs("warm-with-grad") > 0
    assert graphs("warm") == 0


def test_a_cpu_that_cannot_compile_runs_the_row_pass_eagerly(monkeypatch, caplog):
    """Where TorchInductor cannot compile (no C++ compiler), the engine still starts, says so
    once, and its steps run the eager functions; a model whose steps never reach Inductor's size
    compiles nothing."""
    import logging
    from types import SimpleNamespace

    pytest.importorskip("vllm")  # the engine's side; device_check.sh runs this file without vLLM
    from vllm_sjdpp.engine.runtime import compile_step
    from vllm_sjdpp.kernels import row_pass_torch

    def no_compiler(vocab, device):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(row_pass_torch, "_compiled", None)
    monkeypatch.setattr(row_pass_torch, "_compile_at_step_shapes", no_compiler)
    monkeypatch.delenv("SJDPP_STEP_BACKEND", raising=False)
    runner = SimpleNamespace(device=torch.device("cpu"),
                             vllm_config=SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=64)))
    compile_step(runner, vocab_size=48, window=32)  # 64 x 33 x 48 probabilities: below Inductor's size
    assert row_pass_torch._compiled is None
    logging.getLogger("vllm.sjdpp").addHandler(caplog.handler)
    try:
        compile_step(runner, vocab_size=16384, window=32)
    finally:
        logging.getLogger("vllm.sjdpp").removeHandler(caplog.handler)
    assert row_pass_torch._compiled is row_pass_torch._EAGER
    assert any("cannot compile" in r.getMessage() and "no C++ compiler" in r.getMessage() for r in caplog.records)
    batch, noise, fresh = _case(*CASES["mixed"], torch.float32, 0)
    out = sjdpp_step(batch, noise, fresh, backend="inductor")
    assert torch.equal(out.output_token_ids, sjdpp_step(batch, noise, fresh, backend="torch").output_token_ids)
