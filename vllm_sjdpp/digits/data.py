"""scikit-learn's handwritten digits (shipped inside the wheel), as 32x32 grey-level images (0..16, floats)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .vq import GREY_LEVELS, IMAGE_SIZE

HELD_OUT_EVERY = 10  # every 10th image is held out


def load_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """([1797, 8, 8] grey levels 0..16, [1797] labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float64), digits.target.astype(np.int64)


def split(n: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(n)
    held_out = idx % HELD_OUT_EVERY == 0
    return idx[~held_out], idx[held_out]


def upscale(image8: np.ndarray) -> np.ndarray:
    scale = IMAGE_SIZE / image8.shape[0]
    return np.clip(ndimage.zoom(image8, scale, order=1), 0, GREY_LEVELS - 1)


def augment(image8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 32x32 variant: small rotation, shift and stroke thickness."""
    big = upscale(image8)
    big = ndimage.rotate(big, rng.uniform(-12, 12), reshape=False, order=1, mode="constant")
    big = ndimage.shift(big, rng.integers(-3, 4, size=2), order=0, mode="constant")
    thickness = rng.choice([-1, 0, 0, 1])
    if thickness > 0:
        big = ndimage.grey_dilation(big, size=(2, 2))
    elif thickness < 0:
        big = ndimage.grey_erosion(big, size=(2, 2))
    return np.clip(big, 0, GREY_LEVELS - 1)


def downscale(image32: np.ndarray) -> np.ndarray:
    """32x32 -> 8x8 by block means: the classifier's input space."""
    f = IMAGE_SIZE // 8
    return image32.reshape(8, f, 8, f).mean(axis=(1, 3))
