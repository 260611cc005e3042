"""Gumbel-coupled verification: with position-keyed noise, SJD++ commits plain decoding's tokens.

Plain decoding here races p_t against E(key, t, .) (`toy_ar.sample_plain_race`, NumPy noise);
SJD++ verifies with the step's torch noise.  Token identity for every key is the claim; the law
of plain race decoding is checked separately against the exact sequence distribution.  Each test
has a broken variant the same check rejects.
"""

from __future__ import annotations

import pytest
import torch

from stats import ALPHA, BROKEN_ALPHA, same_distribution
from toy_ar import TableARModel, sample_plain, sample_plain_race, sample_sjdpp
from vllm_sjdpp import SJDPPConfig

VOCAB, LENGTH = 24, 48
KEYS = list(range(200))


@pytest.fixture(scope="module")
def model():
    # Peaked rows, so that windows are accepted and the test sees multi-token passes.
    return TableARModel.random(VOCAB, sharpness=3.0, seed=11)


@pytest.fixture(scope="module")
def plain(model):
    return sample_plain_race(model, KEYS, LENGTH)


def noise_by_step(keys, active, start, steps):
    """Broken: noise indexed by the request's step count instead of the row's position."""
    return {i: (keys[r], int(n)) for i, (r, n) in enumerate(zip(active.tolist(), steps.tolist()))}


def noise_shared(keys, active, start, steps):
    """Broken: one key for every request in the batch."""
    return {i: (keys[0], s) for i, s in enumerate(start.tolist())}


@pytest.mark.parametrize("k", [4, 16, 32])
@pytest.mark.parametrize("init", ["random", "left"])
def test_tokens_equal_plain_decoding_for_every_key(model, plain, k, init):
    config = SJDPPConfig(num_speculative_tokens=k, init=init)
    seqs, passes = sample_sjdpp(model, len(KEYS), LENGTH, config, keys=KEYS)
    assert torch.equal(seqs, plain)
    print(f"k={k} init={init}: {passes.float().mean():.1f} passes for {LENGTH} tokens")
    assert float(passes.float().mean()) < LENGTH - 2  # drafts were accepted, not only bonus tokens


@pytest.mark.parametrize("noise_keys", [noise_by_step, noise_shared])
def test_broken_noise_changes_tokens(model, plain, noise_keys):
    config = SJDPPConfig(num_speculative_tokens=16, init="left")
    seqs, _ = sample_sjdpp(model, len(KEYS), LENGTH, config, keys=KEYS, noise_keys=noise_keys)
    differs = (seqs != plain).any(1).float().mean()
    assert differs > 0.5, differs


def test_plain_race_decoding_follows_the_model():
    """The law: over 40000 keys, plain race decoding's sequences against multinomial sampling;
    and 40000 copies of one key (noise shared across requests) are rejected."""
    toy = TableARModel.random(5, sharpness=2.5, seed=3)
    reference = sample_plain(toy, 40_000, 4, seed=4)
    keyed = sample_plain_race(toy, list(range(10**6, 10**6 + 40_000)), 4)
    assert same_distribution(reference, keyed) > ALPHA
    shared = sample_plain_race(toy, [7] * 40_000, 4)
    assert same_distribution(reference, shared) < BROKEN_ALPHA


def test_greedy_rows_stay_greedy(model):
    config = SJDPPConfig(num_speculative_tokens=8, init="left")
    seqs, _ = sample_sjdpp(model, 4, LENGTH, config, greedy=True, keys=KEYS[:4])
    assert torch.equal(seqs, sample_plain(model, 4, LENGTH, greedy=True))
