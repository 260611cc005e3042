"""Offline image quality for the digit generator: class accuracy and a Frechet distance.

A small classifier (an MLP, trained here on the real digits' training split) judges generated
images after they are brought back to 8x8; its hidden layer is the feature space of the Frechet
distance (as FID uses an Inception layer).  Real images pass through the same 32x32 -> VQ codes
-> 32x32 -> 8x8 round trip, so the distance measures the generator, not the image tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import linalg

from . import data
from .vq import bundled


@dataclass
class DigitJudge:
    classifier: object  # sklearn MLPClassifier
    held_out_accuracy: float

    def _inputs(self, images32: list[np.ndarray]) -> np.ndarray:
        return np.stack([data.downscale(im).reshape(-1) for im in images32]) / 16.0

    def features(self, images32: list[np.ndarray]) -> np.ndarray:
        x = self._inputs(images32)
        w, b = self.classifier.coefs_[0], self.classifier.intercepts_[0]
        return np.maximum(x @ w + b, 0.0)

    def accuracy(self, images32: list[np.ndarray], labels: list[int]) -> float:
        return float(np.mean(self.classifier.predict(self._inputs(images32)) == np.asarray(labels)))

    def frechet_distance(self, images_a: list[np.ndarray], images_b: list[np.ndarray]) -> float:
        return frechet_distance(self.features(images_a), self.features(images_b))


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    # Units that never fire make the covariances singular; a tiny ridge keeps sqrtm well posed.
    ridge = eps * np.eye(a.shape[1])
    cov_a, cov_b = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    root = linalg.sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(root):
        root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def round_trip(image8: np.ndarray) -> np.ndarray:
    """A real 8x8 digit as the generator would draw it: 32x32 grey levels decoded from its codes."""
    codebook = bundled()
    return codebook.decode(codebook.encode(data.upscale(image8)))


@lru_cache(maxsize=1)
def judge(seed: int = 0) -> DigitJudge:
    from sklearn.neural_network import MLPClassifier

    images8, labels = data.load_digits_8x8()
    train_idx, held_idx = data.split(len(labels))
    x = np.stack([data.downscale(round_trip(im)).reshape(-1) for im in images8]) / 16.0
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=seed)
    clf.fit(x[train_idx], labels[train_idx])
    return DigitJudge(clf, float(clf.score(x[held_idx], labels[held_idx])))


def real_images(per_class: int | None = None, held_out: bool = True) -> tuple[list[np.ndarray], list[int]]:
    images8, labels = data.load_digits_8x8()
    train_idx, held_idx = data.split(len(labels))
    idx = held_idx if held_out else train_idx
    if per_class is not None:
        idx = np.concatenate([idx[labels[idx] == d][:per_class] for d in range(10)])
    return [round_trip(images8[i]) for i in idx], [int(labels[i]) for i in idx]
