"""The "unfamiliar image" detector: how far an image lies from everything the model was trained on.

Two distances, because each misses what the other sees (measured on the demo model, docs/drift.md):

- **Mahalanobis** (Lee et al., 2018): from the image's features (the model's embedding plus the statistics
  that describe content: brightness, contrast, sharpness, colourfulness, saturation, entropy; not the upload's
  size, which says nothing about what the photo shows), each standardised on the training images, to the
  nearest class mean, under one covariance shared by the classes. Far-away images (a photo of a street, a
  page of text) stand out; a new kind of the same sort of image (a shape the model never saw) does not.
- **Nearest neighbours** (Sun et al., 2022): one minus the cosine similarity of the embedding to its k-th
  nearest training embedding. It notices the new kinds that the first one misses.

Each distance is divided by its own 98% quantile on held-out images and the larger of the two is taken; the
score is that, divided by its ``quantile`` (default 99%) on the held-out images. So the score reads the same for
every model: above 1.0 an image is *unfamiliar*, and about 1% of images like the training set are. Fitted on
the variant that is served; stored with the model (``ood.json``, one entry per variant); a score costs well
under a tenth of a millisecond per image.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

METHOD = "mahalanobis+knn"
CONTENT_STATS = ("brightness", "contrast", "sharpness", "colorfulness", "saturation", "entropy")
#: Added to the covariance's diagonal (in standardised units): keeps it invertible with few images per dimension.
SHRINKAGE = 1e-3
#: Each distance is scaled by this quantile of its held-out values before the two are combined.
PART_QUANTILE = 0.98
K = 10
#: At most this many training embeddings are kept for the neighbour search (a seeded sample of larger sets).
BANK_SIZE = 2000


def _unit(embedding: np.ndarray) -> np.ndarray:
    x = np.asarray(embedding, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class OodDetector:
    """Fitted numbers of the detector for one model variant."""

    stats: tuple[str, ...]
    center: np.ndarray  # [D] feature means on the training images (embedding, then stats)
    scale: np.ndarray  # [D] feature standard deviations
    class_means: np.ndarray  # [C, D] in standardised units
    precision: np.ndarray  # [D, D] inverse of the shared covariance
    mahalanobis_scale: float  # PART_QUANTILE of held-out Mahalanobis distances
    bank: np.ndarray  # [M, E] unit-length training embeddings
    k: int
    knn_scale: float  # PART_QUANTILE of held-out neighbour distances
    threshold: float  # the combined distance that scores 1.0
    quantile: float

    def _stats_matrix(self, stats: Sequence[Mapping[str, float]] | np.ndarray, n: int) -> np.ndarray:
        if isinstance(stats, np.ndarray):
            return stats.reshape(n, len(self.stats)).astype(np.float64)
        return np.array([[row[k] for k in self.stats] for row in stats], dtype=np.float64).reshape(n, len(self.stats))

    @functools.cached_property
    def _fast(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What :meth:`parts` multiplies by. The Mahalanobis distance as a Euclidean one: with precision = W @ W.T,
        the distance of z (the standardised features) to a class mean is the length of (z - mean) @ W, and the
        standardising folds into W; so a score is two small matrix products (tests/test_ood.py checks it against
        the formula written plainly)."""
        eigenvalues, vectors = np.linalg.eigh(self.precision)
        whiten = vectors * np.sqrt(np.maximum(eigenvalues, 0.0))
        means = (self.center / self.scale + self.class_means) @ whiten
        return whiten / self.scale[:, None], means, np.ascontiguousarray(self.bank.T)

    def parts(self, embedding: np.ndarray, stats: Sequence[Mapping[str, float]] | np.ndarray) -> np.ndarray:
        """[N, 2] raw distances: Mahalanobis to the nearest class mean, and to the k-th nearest neighbour."""
        embedding = np.asarray(embedding, dtype=np.float64).reshape(len(embedding), -1)
        features = np.concatenate([embedding, self._stats_matrix(stats, len(embedding))], axis=1)
        whiten, whitened_means, bank_t = self._fast
        diff = (features @ whiten)[:, None, :] - whitened_means  # [N, C, D]
        d2 = np.einsum("ncd,ncd->nc", diff, diff).min(axis=1)
        # Cosine similarity to the bank: the k-th largest dot product, over the embedding's length.
        m = len(self.bank)
        kth = np.partition(embedding @ bank_t, m - self.k, axis=1)[:, m - self.k]
        length = np.sqrt(np.einsum("nd,nd->n", embedding, embedding))
        return np.stack([np.sqrt(np.maximum(d2, 0.0)), 1.0 - kth / np.maximum(length, 1e-12)], axis=1)

    def score(self, embedding: np.ndarray, stats: Sequence[Mapping[str, float]] | np.ndarray) -> np.ndarray:
        """[N] unfamiliarity: above 1.0 the image is unlike the training images (see the module)."""
        raw = self.parts(embedding, stats)
        return np.maximum(raw[:, 0] / self.mahalanobis_scale, raw[:, 1] / self.knn_scale) / self.threshold

    def to_dict(self) -> dict:
        return {
            "method": METHOD,
            "stats": list(self.stats),
            "center": self.center.tolist(),
            "scale": self.scale.tolist(),
            "class_means": self.class_means.tolist(),
            "precision": self.precision.tolist(),
            "mahalanobis_scale": self.mahalanobis_scale,
            "bank": np.round(self.bank, 5).tolist(),
            "k": self.k,
            "knn_scale": self.knn_scale,
            "threshold": self.threshold,
            "quantile": self.quantile,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> OodDetector:
        """The detector stored in ``raw``; ValueError when it is not one this code can use."""
        if raw.get("method") != METHOD:
            raise ValueError(f"unknown detector method {raw.get('method')!r} (this code uses {METHOD})")
        arrays = {k: np.asarray(raw[k], dtype=np.float64) for k in ("center", "scale", "class_means", "precision")}
        bank = np.asarray(raw["bank"], dtype=np.float64)
        detector = cls(
            stats=tuple(raw["stats"]),
            bank=bank,
            k=int(raw["k"]),
            mahalanobis_scale=float(raw["mahalanobis_scale"]),
            knn_scale=float(raw["knn_scale"]),
            threshold=float(raw["threshold"]),
            quantile=float(raw["quantile"]),
            **arrays,
        )
        d = len(detector.center)
        shapes_ok = (
            detector.scale.shape == (d,)
            and detector.class_means.ndim == 2
            and detector.class_means.shape[1] == d
            and detector.precision.shape == (d, d)
            and bank.ndim == 2
            and bank.shape[1] == d - len(detector.stats)
            and 1 <= detector.k <= len(bank)
        )
        numbers = (detector.threshold, detector.mahalanobis_scale, detector.knn_scale)
        if not shapes_ok or not np.all(np.isfinite(numbers)) or min(numbers[1:]) <= 0 or not np.all(detector.scale > 0):
            raise ValueError("detector arrays have inconsistent shapes or values")
        return detector


def fit(
    train_embedding: np.ndarray,
    train_stats: np.ndarray,
    train_labels: np.ndarray,
    heldout_embedding: np.ndarray,
    heldout_stats: np.ndarray,
    stats: Sequence[str] = CONTENT_STATS,
    quantile: float = 0.99,
    seed: int = 0,
) -> OodDetector:
    """Fit on the training images' embeddings and content statistics; scale and set the threshold on held-out ones."""
    x = np.concatenate([np.asarray(train_embedding, np.float64), np.asarray(train_stats, np.float64)], axis=1)
    center, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)  # a constant feature (unused embedding dimension) stays neutral
    z = (x - center) / scale
    classes = np.unique(train_labels)
    means = np.stack([z[train_labels == c].mean(axis=0) for c in classes])
    residual = z - means[np.searchsorted(classes, train_labels)]
    covariance = residual.T @ residual / max(1, len(z) - len(classes)) + SHRINKAGE * np.eye(z.shape[1])
    bank = _unit(train_embedding)
    if len(bank) > BANK_SIZE:
        bank = bank[np.sort(np.random.default_rng(seed).permutation(len(bank))[:BANK_SIZE])]
    k = min(K, len(bank))
    unscaled = OodDetector(
        tuple(stats), center, scale, means, np.linalg.inv(covariance), 1.0, bank, k, 1.0, 1.0, quantile
    )
    parts = unscaled.parts(heldout_embedding, np.asarray(heldout_stats))
    m_scale, k_scale = (max(float(np.quantile(parts[:, i], PART_QUANTILE)), 1e-9) for i in (0, 1))
    combined = np.maximum(parts[:, 0] / m_scale, parts[:, 1] / k_scale)
    threshold = max(float(np.quantile(combined, quantile)), 1e-9)
    return OodDetector(
        tuple(stats), center, scale, means, unscaled.precision, m_scale, bank, k, k_scale, threshold, quantile
    )
