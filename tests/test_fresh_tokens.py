"""Fresh tokens: the priors copy the right neighbours, and random ones stay in the vocabulary."""

import numpy as np
import torch

from vllm_sjdpp.kernels.fresh import FreshTokens, fill_fresh_tokens


def _fill(init, redrafts, committed, history, row_width=None, window=6, vocab=range(50, 60), u=None):
    b = len(init)
    n = np.full(b, window)
    tokens = np.full(b * window, -7)
    for i, r in enumerate(redrafts):
        tokens[i * window : i * window + len(r)] = r
    onehot = np.zeros(b * window, dtype=bool)
    committed = np.array(committed)
    fresh = FreshTokens.build(init, [vocab] * b, torch.tensor(history), row_width)
    uniforms = np.linspace(0, 0.999, b * window, dtype=np.float32) if u is None else u.numpy()
    fill_fresh_tokens(
        tokens, onehot, n, np.array([len(r) for r in redrafts]), committed, np.full(b, committed.shape[1]),
        fresh, uniforms,
    )
    return tokens.reshape(b, window).tolist(), onehot.reshape(b, window).tolist()


def test_left_repeats_last_known_token():
    tokens, onehot = _fill(["left", "left"], [[1, 2], []], [[8, 9], [8, 9]], [[4, 5], [4, 5]])
    assert tokens == [[1, 2, 2, 2, 2, 2], [9] * 6]
    assert onehot == [[False, False, True, True, True, True], [True] * 6]


def test_above_copies_one_row_up_through_window_committed_and_history():
    # Stream: history 20 21 22 | committed 30 31 | window 40 41 + 4 fresh; rows of 3 tokens.
    tokens, _ = _fill(["above"], [[40, 41]], [[30, 31]], [[20, 21, 22]], row_width=[3])
    # slot 2 (stream index 7) copies index 4 = 31, slot 3 copies slot 0 = 40, slot 4 copies slot 1,
    # slot 5 copies slot 2, which is itself a copy of 31.
    assert tokens == [[40, 41, 31, 40, 41, 31]]
    tokens, _ = _fill(["above"], [[]], [[30, 31]], [[20, 21, 22]], row_width=[5])
    assert tokens == [[20, 21, 22, 30, 31, 20]]


def test_above_without_a_row_above_falls_back_to_random():
    tokens, _ = _fill(["above"], [[]], [[30]], [[-1, -1]], row_width=[4])
    # Stream: history -1 -1 | committed 30 | slots 0-5; slots 0-2 have no known token one row up.
    # Random: vocab[floor(10 u)] with slot i's uniform u = 0, 0.1998, 0.3996 (_fill's linspace).
    assert tokens[0] == [50, 51, 53, 30, 50, 51]


def test_random_covers_the_fresh_vocabulary_uniformly():
    n = 6000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    tokens, onehot = _fill(["random"], [[]], [[1]], [[2]], window=n, vocab=[3, 5, 11], u=u)
    counts = torch.bincount(torch.tensor(tokens[0]), minlength=12)
    assert counts[[3, 5, 11]].sum() == n
    assert ((counts[[3, 5, 11]].float() / n - 1 / 3).abs() < 0.03).all()  # 5 sigma is 0.03
    assert all(onehot[0])
