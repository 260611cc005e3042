"""vLLM's sampler, with seeded requests drawn by the position-keyed race.

Plain decoding of a seeded request samples its token at position t as
    argmax_v p_t(v) / E(seed, t, v)        (E: kernels/noise.py, Exp(1), counter-based)
the noise tape from which SJD++'s Gumbel-coupled verification commits.  So a seed names one
image whether SJD++ drafts for it, is disabled for it (`sjdpp_disable`), or is not configured at
all.  vLLM's processing (allowed tokens, penalties, temperature, top-k, top-p) runs as it is;
only the draw of the keyed rows is replaced, through vLLM's own `sample_with_exponential_noise`
(probabilities divided by the noise, argmax: the float operations of our row pass, so both give
the same token for the same probabilities), or on CPU, where every row is keyed, by the race over
the tokens a row can draw (`kernels.keyed_race`: the same winners).  A step without keyed rows
keeps vLLM's draw untouched (its fused Gumbel-max on CPU, FlashInfer on CUDA).

`install` puts it on a runner: every SJD++ runner, and the runners of the guided architectures
this plugin registers; plain text models served without SJD++ keep vLLM's sampler.  On a guided
runner it also leaves out the rows of guidance companions, whose tokens are replaced by their
requests' (`GuidanceBatch.mirror_samples`), where the sampler gets one row per request (plain
decoding, windowless SJD++ steps, the fallback, vLLM's bonus rows): at Emu3's vocabulary a row's
top-k is most of its sampling cost, and in the paired layout half the rows are companions'.  An
SJD++ window's rows go through the step, companions' included.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p, sample_with_exponential_noise

from ..kernels.host import upload
from ..kernels.keyed_race import KeyedRows
from ..kernels.noise import request_key, row_keys


class KeyedRaceTopKTopP(nn.Module):
    """Stands in for `Sampler.topk_topp_sampler`: top-k / top-p, then the draw.

    `keyed_rows(num_rows)` gives, for the seeded rows to race, {row: (key, position)};
    `unsampled_rows(num_rows)` the rows whose draw is thrown away (drawn as 0, at no cost)."""

    def __init__(self, inner: nn.Module, keyed_rows, unsampled_rows=lambda num_rows: ()):
        super().__init__()
        self.inner = inner
        self.keyed_rows = keyed_rows
        self.unsampled_rows = unsampled_rows

    def forward(self, logits, generators, k, p):
        num_rows = logits.shape[0]
        unsampled = self.unsampled_rows(num_rows)
        if not unsampled or self.inner.logprobs_mode in ("processed_logits", "processed_logprobs"):
            return self._draw(logits, generators, k, p, self.keyed_rows(num_rows))
        drawn = np.setdiff1d(np.arange(num_rows), np.asarray(unsampled, dtype=np.int64))
        if not drawn.size:
            return torch.zeros(num_rows, dtype=torch.long, device=logits.device), None
        index = {int(row): i for i, row in enumerate(drawn)}
        (rows,) = upload(drawn, device=logits.device)
        sampled, _ = self._draw(
            logits[rows], {index[r]: g for r, g in generators.items() if r in index},
            None if k is None else k[rows], None if p is None else p[rows],
            {index[r]: v for r, v in self.keyed_rows(num_rows).items() if r in index},
        )
        out = torch.zeros(num_rows, dtype=sampled.dtype, device=sampled.device)
        out[rows] = sampled
        return out, None

    def _draw(self, logits, generators, k, p, keyed):
        if not keyed:
            return self.inner(logits, generators, k, p)
        logits = apply_top_k_top_p(logits, k, p)
        mode = self.inner.logprobs_mode
        processed = (
            logits if mode == "processed_logits"
            else logits.log_softmax(dim=-1, dtype=torch.float32) if mode == "processed_logprobs"
            else None
        )
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        rows = sorted(keyed)
        keys = np.array([request_key(keyed[i][0]) for i in rows], dtype=np.uint64)
        positions = np.array([keyed[i][1] for i in rows], dtype=np.int64)
        keyed_rows = KeyedRows(*row_keys(keys, positions), probs.shape[1], probs.device)
        if len(keyed) == probs.shape[0]:  # every row keyed: on CPU, raced where a token can win
            winners = keyed_rows.race(probs)
            if winners is not None:
                return torch.from_numpy(winners), processed
        noise = torch.empty_like(probs)
        if len(keyed) < probs.shape[0]:
            noise.exponential_()
            for i, generator in generators.items():
                if i not in keyed:
                    noise[i].exponential_(generator=generator)
        (rows_t,) = upload(np.array(rows, dtype=np.int64), device=probs.device)
        noise[rows_t] = keyed_rows.exponentials()
        return sample_with_exponential_noise(probs, noise), processed


def noise_key_of(runner, req_id: str) -> int | None:
    """The key a seeded request's rows race with: its seed, unless SJD++ verifies it by the ratio
    test (its state has no noise key; then its generator draws, as in vLLM).  None: unseeded."""
    params = runner.requests[req_id].sampling_params
    if params.seed is None:
        return None
    runtime = getattr(runner, "sjdpp", None)
    return params.seed if runtime is None else runtime.states.get(req_id, params).noise_key


def drop_generators(runner) -> None:
    """Keyed requests never draw from a generator: drop theirs from the batch (and the request,
    so that a resumed request does not bring it back).  vLLM then has nothing to rewind after a
    partial prefill: its fixed rewind (CUDA) and its missing offset (CPU: a crash) are both off
    these requests' path, and their tokens depend on no generator state."""
    batch = runner.input_batch
    for i in [i for i in batch.generators if noise_key_of(runner, batch.req_ids[i]) is not None]:
        runner.requests[batch.req_ids[i]].generator = None
        del batch.generators[i]


def install(runner) -> None:
    """Replace `runner.sampler`'s draw (the rejection sampler keeps a reference to the same
    sampler object)."""

    def keyed_rows(num_rows: int) -> dict[int, tuple[int, int]]:
        batch = runner.input_batch
        if num_rows != batch.num_reqs:  # vLLM's warm-up on a dummy batch: no requests to key
            return {}
        keys = ((i, noise_key_of(runner, r)) for i, r in enumerate(batch.req_ids[:num_rows]))
        return {i: (key, int(batch.num_tokens_no_spec[i])) for i, key in keys if key is not None}

    def companion_rows(num_rows: int) -> list[int]:
        guidance = getattr(runner.get_model(), "guidance", None)
        if guidance is None or not guidance.mirrors or num_rows != runner.input_batch.num_reqs:
            return []
        return [companion for _, companion in guidance.mirrors]

    runner.sampler.topk_topp_sampler = KeyedRaceTopKTopP(runner.sampler.topk_topp_sampler, keyed_rows, companion_rows)
    runner.sjdpp_race_sampler = True
