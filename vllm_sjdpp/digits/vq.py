"""The image tokenizer: vector quantisation of 2x2 pixel patches with a k-means codebook.

Real text-to-image AR models generate VQ codes, not pixels.  Here a 32x32 image becomes a
16x16 grid of codes, each the nearest of CODES centroids to its 2x2 patch (squared distance),
and a code decodes to its centroid.  The codebook is fitted once, seeded, on augmented training
digits, and ships in the model folder beside the weights it was trained with.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

GREY_LEVELS = 17  # pixel values of scikit-learn's digits, 0..16
IMAGE_SIZE = 32
PATCH = 2
GRID = IMAGE_SIZE // PATCH
CODES = 256
MODEL_DIR = Path(__file__).parent / "model"
CODEBOOK_FILE = "vq_codebook.json"


def patches(image: np.ndarray) -> np.ndarray:
    """[IMAGE_SIZE, IMAGE_SIZE] -> [GRID * GRID, PATCH * PATCH], row-major over the grid."""
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"image must be {IMAGE_SIZE}x{IMAGE_SIZE}, got {image.shape}")
    return image.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, PATCH * PATCH)


class Codebook:
    def __init__(self, centroids: np.ndarray):
        centroids = np.asarray(centroids, dtype=np.float64)
        if centroids.shape != (CODES, PATCH * PATCH):
            raise ValueError(f"a codebook is [{CODES}, {PATCH * PATCH}], got {list(centroids.shape)}")
        self.centroids = centroids

    @classmethod
    def fit(cls, images: list[np.ndarray], seed: int, max_patches: int = 200_000) -> "Codebook":
        from sklearn.cluster import KMeans

        x = np.concatenate([patches(im) for im in images])
        rng = np.random.default_rng(seed)
        if len(x) > max_patches:
            x = x[rng.choice(len(x), max_patches, replace=False)]
        kmeans = KMeans(n_clusters=CODES, n_init=1, random_state=seed).fit(x)
        # Order codes by brightness so that neighbouring ids look alike in plots and logs.
        centroids = kmeans.cluster_centers_
        # Rounded as saved, so the codebook trained with is the one loaded.
        return cls(np.round(centroids[np.argsort(centroids.sum(1), kind="stable")], 5))

    def encode(self, image: np.ndarray) -> np.ndarray:
        """[IMAGE_SIZE, IMAGE_SIZE] grey levels -> [GRID, GRID] codes."""
        x = patches(np.asarray(image, dtype=np.float64))
        d = (x**2).sum(1, keepdims=True) - 2 * x @ self.centroids.T + (self.centroids**2).sum(1)
        return d.argmin(1).reshape(GRID, GRID)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """[GRID, GRID] codes -> [IMAGE_SIZE, IMAGE_SIZE] grey levels (floats)."""
        blocks = self.centroids[np.asarray(codes)].reshape(GRID, GRID, PATCH, PATCH)
        return blocks.transpose(0, 2, 1, 3).reshape(IMAGE_SIZE, IMAGE_SIZE)

    def save(self, folder: Path) -> None:
        (Path(folder) / CODEBOOK_FILE).write_text(json.dumps(self.centroids.tolist()))

    @classmethod
    def load(cls, folder: Path) -> "Codebook":
        path = Path(folder) / CODEBOOK_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: the model folder has no image codebook")
        return cls(np.array(json.loads(path.read_text())))


@lru_cache(maxsize=1)
def bundled() -> Codebook:
    """The codebook of the model that ships in the package."""
    return Codebook.load(MODEL_DIR)
