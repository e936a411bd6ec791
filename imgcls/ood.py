"""The "unfamiliar image" detector: how far an image lies from everything the model was trained on.

Features: the model's embedding plus the image statistics that describe content (brightness, contrast,
sharpness, colourfulness, saturation, entropy; not the upload's size, which says nothing about what the photo
shows), each standardised on the training images. Score: the Mahalanobis distance to the nearest class
mean, with one covariance shared by the classes (Lee et al., 2018), fitted on the training images of the
variant that is served. Threshold: a quantile (default 99%) of the scores of held-out images, so about 1% of
images like the training set are flagged. The fitted numbers are stored with the model (``ood.json``, one
entry per variant) and the service scores each image in well under a tenth of a millisecond.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

METHOD = "mahalanobis-shared-covariance"
CONTENT_STATS = ("brightness", "contrast", "sharpness", "colorfulness", "saturation", "entropy")
#: Added to the covariance's diagonal (in standardised units): keeps it invertible with few images per dimension.
SHRINKAGE = 1e-3


@dataclass(frozen=True)
class OodDetector:
    """Fitted numbers of the detector for one model variant."""

    stats: tuple[str, ...]
    center: np.ndarray  # [D] feature means on the training images
    scale: np.ndarray  # [D] feature standard deviations
    class_means: np.ndarray  # [C, D] in standardised units
    precision: np.ndarray  # [D, D] inverse of the shared covariance
    threshold: float
    quantile: float

    def features(self, embedding: np.ndarray, stats: Sequence[dict[str, float]] | np.ndarray) -> np.ndarray:
        """[N, D] raw features: the embedding, then the statistics this detector uses."""
        if not isinstance(stats, np.ndarray):
            stats = np.array([[row[k] for k in self.stats] for row in stats], dtype=np.float64)
        return np.concatenate([np.asarray(embedding, dtype=np.float64).reshape(len(stats), -1), stats], axis=1)

    def score(self, features: np.ndarray) -> np.ndarray:
        """[N] distances: the Mahalanobis distance of each row to the nearest class mean."""
        z = (np.asarray(features, dtype=np.float64) - self.center) / self.scale
        diff = z[:, None, :] - self.class_means[None, :, :]  # [N, C, D]
        d2 = np.einsum("ncd,de,nce->nc", diff, self.precision, diff)
        return np.sqrt(np.maximum(d2.min(axis=1), 0.0))

    def to_dict(self) -> dict:
        return {
            "method": METHOD,
            "stats": list(self.stats),
            "center": self.center.tolist(),
            "scale": self.scale.tolist(),
            "class_means": self.class_means.tolist(),
            "precision": self.precision.tolist(),
            "threshold": self.threshold,
            "quantile": self.quantile,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> OodDetector:
        """The detector stored in ``raw``; ValueError when it is not one this code can use."""
        if raw.get("method") != METHOD:
            raise ValueError(f"unknown detector method {raw.get('method')!r} (this code uses {METHOD})")
        detector = cls(
            stats=tuple(raw["stats"]),
            center=np.asarray(raw["center"], dtype=np.float64),
            scale=np.asarray(raw["scale"], dtype=np.float64),
            class_means=np.asarray(raw["class_means"], dtype=np.float64),
            precision=np.asarray(raw["precision"], dtype=np.float64),
            threshold=float(raw["threshold"]),
            quantile=float(raw["quantile"]),
        )
        d = len(detector.center)
        shapes_ok = (
            detector.scale.shape == (d,)
            and detector.class_means.ndim == 2
            and detector.class_means.shape[1] == d
            and detector.precision.shape == (d, d)
        )
        if not shapes_ok or not np.isfinite(detector.threshold) or not np.all(detector.scale > 0):
            raise ValueError("detector arrays have inconsistent shapes or values")
        return detector


def fit(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    heldout_features: np.ndarray,
    stats: Sequence[str] = CONTENT_STATS,
    quantile: float = 0.99,
) -> OodDetector:
    """Fit the class means and shared covariance on training features; set the threshold on held-out ones."""
    x = np.asarray(train_features, dtype=np.float64)
    center, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)  # a constant feature (unused embedding dimension) stays neutral
    z = (x - center) / scale
    classes = np.unique(train_labels)
    means = np.stack([z[train_labels == c].mean(axis=0) for c in classes])
    residual = z - means[np.searchsorted(classes, train_labels)]
    covariance = residual.T @ residual / max(1, len(z) - len(classes)) + SHRINKAGE * np.eye(z.shape[1])
    detector = OodDetector(
        tuple(stats), center, scale, means, np.linalg.inv(covariance), threshold=np.inf, quantile=quantile
    )
    threshold = float(np.quantile(detector.score(heldout_features), quantile))
    return OodDetector(tuple(stats), center, scale, means, detector.precision, threshold, quantile)
