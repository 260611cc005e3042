"""Position-keyed race noise (kernels/noise.py): one tensor for (key, position, token) on every
backend, and Exp(1)-distributed.  The Triton kernel runs under the interpreter on CPU (conftest
sets TRITON_INTERPRET=1); on a CUDA machine (benchmarks/device_check.sh) it runs on the GPU, with
the GPU's float64 log, against the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from stats import ALPHA, BROKEN_ALPHA
from vllm_sjdpp.kernels import noise
from vllm_sjdpp.kernels.host import INDUCTOR_MIN_ELEMENTS
from vllm_sjdpp.kernels.noise_triton import keyed_exponentials_triton

# The Triton kernel on the GPU where there is one (benchmarks/device_check.sh), else interpreted.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Seeds as users send them (0, small, past 32 bits, negative) at prompt-like positions.
SEEDS = [0, 1, 2**40 + 3, -5, 123456789]
KEYS = np.array([noise.request_key(s) for s in SEEDS for _ in range(8)], dtype=np.uint64)
POSITIONS = np.array([p for _ in SEEDS for p in (0, 1, 2, 255, 576, 16383, 16384, 2**31 - 1)])


@pytest.mark.parametrize("vocab", [274, 16384])
def test_torch_and_triton_equal_the_numpy_reference(vocab):
    a, b = noise.row_keys(KEYS, POSITIONS)
    reference = noise.keyed_exponentials_numpy(a, b, vocab)
    assert np.array_equal(noise.keyed_exponentials_torch(a, b, vocab).numpy(), reference)
    assert np.array_equal(keyed_exponentials_triton(a, b, vocab, TRITON_DEVICE).cpu().numpy(), reference)
    # The row key alone decides a row: a row computed alone equals its row in a batch.
    assert np.array_equal(noise.keyed_exponentials_torch(a[5:6], b[5:6], vocab).numpy(), reference[5:6])


def test_fused_torch_path_equals_eager():
    rows = INDUCTOR_MIN_ELEMENTS // 1000 + 1  # past the threshold at V = 1000: TorchInductor's loop
    a, b = noise.row_keys(np.full(rows, noise.request_key(9), dtype=np.uint64), np.arange(rows))
    fused = noise.keyed_exponentials_torch(a, b, 1000)
    assert np.array_equal(fused.numpy(), noise.keyed_exponentials_numpy(a, b, 1000))
    # The CPU dispatcher (NumPy below the threshold, fused PyTorch above) gives the same values.
    assert np.array_equal(noise.keyed_exponentials(a, b, 1000).numpy(), fused.numpy())
    assert np.array_equal(noise.keyed_exponentials(a[:7], b[:7], 1000).numpy(), fused[:7].numpy())


def test_noise_is_exponential_and_independent_across_positions_and_keys():
    a, b = noise.row_keys(np.full(400, noise.request_key(3), dtype=np.uint64), np.arange(400))
    e = noise.keyed_exponentials_numpy(a, b, 1000).astype(np.float64)
    assert e.min() > 0
    assert stats.kstest(e.ravel(), "expon").pvalue > ALPHA
    assert stats.kstest(e.ravel() * 1.05, "expon").pvalue < BROKEN_ALPHA  # a 5% scale error is caught
    # Neighbouring positions and neighbouring keys: rank correlation within chance.
    other = noise.keyed_exponentials_numpy(*noise.row_keys(np.full(400, noise.request_key(4), dtype=np.uint64), np.arange(400)), 1000)
    for x, y in [(e[:-1], e[1:]), (e, other), (e[:, :-1], e[:, 1:])]:
        assert abs(stats.spearmanr(x.ravel(), y.ravel()).statistic) < 0.01
    # Each salt is its own stream.
    fresh = noise.row_keys(np.full(400, noise.request_key(3), dtype=np.uint64), np.arange(400), noise.SALT_FRESH)
    assert not np.array_equal(fresh[0], a)


def test_keyed_rows_land_in_their_requests_rows():
    """StepNoise with some requests keyed: their rows are E(key, first position + j), the others'
    come from their generator, untouched by the keyed ones."""
    from vllm_sjdpp.kernels import StepNoise

    g = torch.Generator().manual_seed(0)
    mixed = StepNoise.sample_per_request([3, 2, 4], [1, 1, 1], 50, {1: g}, keys={0: (7, 10), 2: (-1, 100)})
    a, b = noise.row_keys(np.array([noise.request_key(7)] * 3 + [noise.request_key(-1)] * 4, dtype=np.uint64),
                          np.array([10, 11, 12, 100, 101, 102, 103]))
    expected = noise.keyed_exponentials_numpy(a, b, 50)
    assert np.array_equal(mixed.exponentials[[0, 1, 2, 5, 6, 7, 8]].numpy(), expected)
    alone = StepNoise.sample_per_request([2], [1], 50, {0: torch.Generator().manual_seed(0)})
    assert torch.equal(mixed.exponentials[3:5], alone.exponentials)


def test_a_keyed_steps_fresh_slots_are_keyed_by_their_own_salt():
    """The race rows and the fresh slots are keyed in one `row_keys` call (a salt per row): each
    request's slot j is U(key, first position + j) under SALT_FRESH, its row j E(key, first
    position + j) under SALT_RACE, as separate calls give them; a request with no slots takes
    none.  An array of salts gives what one call per salt gives."""
    from vllm_sjdpp.kernels import StepNoise

    rows, slots, keys = [3, 1, 2], [2, 0, 3], {0: (7, 10), 1: (2**40, 5), 2: (-1, 100)}
    noise_ = StepNoise.sample_per_request(rows, slots, 50, {}, keys=keys)
    key_of = lambda i, n: np.full(n, noise.request_key(keys[i][0]), dtype=np.uint64)  # noqa: E731
    at = lambda i, n: keys[i][1] + np.arange(n)  # noqa: E731
    race = noise.row_keys(np.concatenate([key_of(i, n) for i, n in enumerate(rows)]),
                          np.concatenate([at(i, n) for i, n in enumerate(rows)]))
    fresh = noise.row_keys(np.concatenate([key_of(i, n) for i, n in enumerate(slots)]),
                           np.concatenate([at(i, n) for i, n in enumerate(slots)]), noise.SALT_FRESH)
    assert np.array_equal(noise_.race_noise().numpy(), noise.keyed_exponentials_numpy(*race, 50))
    assert np.array_equal(np.asarray(noise_.fresh_uniforms), noise.keyed_uniforms(*fresh))
    both = noise.row_keys(np.concatenate([key_of(0, 4), key_of(2, 4)]), np.arange(8),
                          np.repeat(np.array([noise.SALT_RACE, noise.SALT_FRESH], dtype=np.uint32), 4))
    one = [noise.row_keys(key_of(0, 4), np.arange(4)), noise.row_keys(key_of(2, 4), np.arange(4, 8), noise.SALT_FRESH)]
    assert all(np.array_equal(both[w], np.concatenate([one[0][w], one[1][w]])) for w in (0, 1))
    # Broken: fresh slots keyed with the race's salt draw other uniforms.
    assert not np.array_equal(np.asarray(noise_.fresh_uniforms),
                              noise.keyed_uniforms(*noise.row_keys(np.concatenate([key_of(i, n) for i, n in enumerate(slots)]),
                                                                   np.concatenate([at(i, n) for i, n in enumerate(slots)]))))
