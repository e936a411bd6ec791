"""The "unfamiliar image" detector: how far an image lies from everything the model was trained on.

Three distances, because each misses what the others see (measured on the demo model, docs/drift.md):

- **Mahalanobis on the embedding** (Lee et al., 2018): from the model's embedding, standardised on the training
  images, to the nearest class mean, under one covariance shared by the classes. Far-away images (a photo of a
  street) stand out; a new kind of the same sort of image (a shape the model never saw) does not.
- **Nearest neighbours** (Sun et al., 2022): one minus the cosine similarity of the embedding to its k-th nearest
  training embedding. It notices the new kinds that the first one misses.
- **Mahalanobis on the image statistics** that describe content (brightness, contrast, sharpness, colourfulness,
  saturation, entropy; not the upload's size, which says nothing about what the photo shows) to their mean on the
  training images. A page of text or a screenshot differs from photos in a few of these six numbers, by far; in
  the embedding's distance those few would be lost among its dimensions, so they get a distance of their own.

Each distance is divided by its own 98% quantile on held-out images and the scaled distances are combined (their
Euclidean norm; the larger of them in models stored before the statistics got their own distance). The score is
that, divided by its ``quantile`` (default 99%) on the held-out images. So the score reads the same for every
model: above 1.0 an image is *unfamiliar*, and about 1% of images like the training set are. Fitted on the
variant that is served; stored with the model (``ood.json``, one entry per variant); a score costs well under a
tenth of a millisecond per image. Which features and how they combine was chosen on several independent sources of
foreign images, each judged by a choice made without it (``python -m training.ood_rates``, docs/drift.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from imgcls.imagestats import STAT_FIELDS

METHOD = "mahalanobis+knn"
CONTENT_STATS = ("brightness", "contrast", "sharpness", "colorfulness", "saturation", "entropy")
#: What the model's answer itself says: its top probability and the entropy of its probabilities.
ANSWER_STATS = ("max_prob", "prob_entropy")
#: Every feature a detector may read besides the embedding (:func:`features_of` gives them).
FEATURE_STATS = (*STAT_FIELDS, *ANSWER_STATS)
#: Added to the covariance's diagonal (in standardised units): keeps it invertible with few images per dimension.
SHRINKAGE = 1e-3
#: Each distance is scaled by this quantile of its held-out values before they are combined.
PART_QUANTILE = 0.98
K = 10
#: At most this many training embeddings are kept for the neighbour search (a seeded sample of larger sets).
BANK_SIZE = 2000
MAX, NORM = "max", "norm"


@dataclass(frozen=True)
class Candidate:
    """A design of the detector: statistics joined to the embedding's distance (``joint``) or given their own
    (``apart``), the neighbour distance or not, and how the scaled distances combine."""

    name: str
    joint: tuple[str, ...] = ()
    apart: tuple[str, ...] = ()
    knn: bool = True
    combine: str = NORM

    @property
    def inputs(self) -> tuple[str, ...]:
        """The statistics it reads, in the column order :meth:`OodDetector.score` takes them as an array."""
        return tuple(dict.fromkeys((*self.joint, *self.apart)))


#: The designs python -m training.ood_rates chooses among; training fits DEFAULT, the one chosen.
CANDIDATES = (
    Candidate("embedding alone", combine=MAX),
    Candidate("embedding and content in one distance", joint=CONTENT_STATS, combine=MAX),
    Candidate("content apart, the larger distance", apart=CONTENT_STATS, combine=MAX),
    Candidate("content apart, the norm of the distances", apart=CONTENT_STATS),
    Candidate("content and answer apart, the norm", apart=(*CONTENT_STATS, *ANSWER_STATS)),
    Candidate("all statistics apart, the norm", apart=STAT_FIELDS),
    Candidate("content apart, the norm, no neighbours", apart=CONTENT_STATS, knn=False),
)
DEFAULT = CANDIDATES[3]


def features_of(stats: Mapping[str, float], probs: np.ndarray) -> dict[str, float]:
    """The statistics of an image with what its answer says (:data:`ANSWER_STATS`): what a detector reads."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    return {**stats, "max_prob": float(p.max()), "prob_entropy": float(-(p * np.log(p)).sum())}


def feature_matrix(stats: Sequence[Mapping[str, float]], probs: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """[N, len(names)]: the features ``names`` (:data:`FEATURE_STATS`) of each image, from its statistics and the
    model's probabilities for it."""
    rows = [features_of(row, p) for row, p in zip(stats, probs, strict=True)]
    return np.array([[r[k] for k in names] for r in rows], dtype=np.float64).reshape(len(rows), len(names))


def _unit(embedding: np.ndarray) -> np.ndarray:
    x = np.asarray(embedding, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Apart:
    """The statistics' own distance: Mahalanobis to their mean on the training images."""

    names: tuple[str, ...]
    center: np.ndarray  # [S]
    scale: np.ndarray  # [S] standard deviations
    whiten: np.ndarray  # [S, S]: the distance is the length of (x - center) / scale @ whiten
    part_scale: float  # PART_QUANTILE of the held-out distances

    @classmethod
    def fit(cls, names: Sequence[str], x: np.ndarray) -> Apart:
        center, scale = _moments(x)
        z = (x - center) / scale
        covariance = (z - z.mean(axis=0)).T @ (z - z.mean(axis=0)) / max(1, len(z) - 1)
        return cls(tuple(names), center, scale, _whitening(covariance + SHRINKAGE * np.eye(len(names))), 1.0)

    @functools.cached_property
    def _folded(self) -> tuple[np.ndarray, np.ndarray]:
        """The standardising folded into the whitening, as for the embedding's distance."""
        return self.whiten / self.scale[:, None], (self.center / self.scale) @ self.whiten

    def distance(self, x: np.ndarray) -> np.ndarray:
        whiten, offset = self._folded
        w = x @ whiten - offset
        return np.sqrt(np.einsum("nd,nd->n", w, w))

    def to_dict(self) -> dict:
        return {"names": list(self.names), "center": self.center.tolist(), "scale": self.scale.tolist(),
                "whiten": self.whiten.tolist(), "part_scale": self.part_scale}  # fmt: skip

    @classmethod
    def from_dict(cls, raw: dict) -> Apart:
        arrays = {k: np.asarray(raw[k], dtype=np.float64) for k in ("center", "scale", "whiten")}
        apart = cls(tuple(raw["names"]), part_scale=float(raw["part_scale"]), **arrays)
        n = len(apart.names)
        if apart.center.shape != (n,) or apart.scale.shape != (n,) or apart.whiten.shape != (n, n):
            raise ValueError("detector arrays have inconsistent shapes or values")
        return apart


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    center, scale = x.mean(axis=0), x.std(axis=0)
    return center, np.where(scale > 1e-9, scale, 1.0)  # a constant feature (unused dimension) stays neutral


def _whitening(covariance: np.ndarray) -> np.ndarray:
    """W with inverse(covariance) = W @ W.T: a Mahalanobis distance is then the length of a product by W."""
    eigenvalues, vectors = np.linalg.eigh(np.linalg.inv(covariance))
    return vectors * np.sqrt(np.maximum(eigenvalues, 0.0))


@dataclass(frozen=True)
class OodDetector:
    """Fitted numbers of the detector for one model variant."""

    stats: tuple[str, ...]  # statistics joined to the embedding in the first distance
    center: np.ndarray  # [D] feature means on the training images (embedding, then stats)
    scale: np.ndarray  # [D] feature standard deviations
    class_means: np.ndarray  # [C, D] in standardised units
    precision: np.ndarray  # [D, D] inverse of the shared covariance
    mahalanobis_scale: float  # PART_QUANTILE of held-out Mahalanobis distances
    bank: np.ndarray  # [M, E] unit-length training embeddings
    k: int  # 0: no neighbour distance
    knn_scale: float  # PART_QUANTILE of held-out neighbour distances
    threshold: float  # the combined distance that scores 1.0
    quantile: float
    apart: Apart | None = None
    combine: str = MAX

    @property
    def inputs(self) -> tuple[str, ...]:
        """The statistics it reads: the columns of an array passed to :meth:`score`, in this order."""
        return tuple(dict.fromkeys((*self.stats, *(self.apart.names if self.apart else ()))))

    def _matrix(self, stats: Sequence[Mapping[str, float]] | np.ndarray, n: int, probs: np.ndarray | None):
        if isinstance(stats, np.ndarray):
            return stats.reshape(n, len(self.inputs)).astype(np.float64)
        if probs is not None and set(ANSWER_STATS) & set(self.inputs):
            stats = [features_of(row, p) for row, p in zip(stats, probs, strict=True)]
        return np.array([[row[k] for k in self.inputs] for row in stats], dtype=np.float64).reshape(n, -1)

    @functools.cached_property
    def _fast(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], list[int]]:
        """What :meth:`parts` multiplies by. The Mahalanobis distance as a Euclidean one: with precision = W @ W.T,
        the distance of z (the standardised features) to a class mean is the length of (z - mean) @ W, and the
        standardising folds into W; so a score is a few small matrix products (tests/test_ood.py checks it
        against the formula written plainly)."""
        eigenvalues, vectors = np.linalg.eigh(self.precision)
        whiten = vectors * np.sqrt(np.maximum(eigenvalues, 0.0))
        means = (self.center / self.scale + self.class_means) @ whiten
        joint = [self.inputs.index(k) for k in self.stats]
        apart = [self.inputs.index(k) for k in self.apart.names] if self.apart else []
        return whiten / self.scale[:, None], means, np.ascontiguousarray(self.bank.T), joint, apart

    def parts(
        self, embedding: np.ndarray, stats: Sequence[Mapping[str, float]] | np.ndarray, probs: np.ndarray | None = None
    ) -> np.ndarray:
        """[N, 3] raw distances: Mahalanobis of the embedding to the nearest class mean, to the k-th nearest
        neighbour (0 without), and of the statistics apart (0 without)."""
        embedding = np.asarray(embedding, dtype=np.float64).reshape(len(embedding), -1)
        matrix = self._matrix(stats, len(embedding), probs)
        whiten, whitened_means, bank_t, joint, apart = self._fast
        features = np.concatenate([embedding, matrix[:, joint]], axis=1)
        diff = (features @ whiten)[:, None, :] - whitened_means  # [N, C, D]
        mahalanobis = np.sqrt(np.maximum(np.einsum("ncd,ncd->nc", diff, diff).min(axis=1), 0.0))
        zero = np.zeros_like(mahalanobis)
        neighbours = zero
        if self.k:  # cosine similarity to the bank: the k-th largest dot product, over the embedding's length
            m = len(self.bank)
            kth = np.partition(embedding @ bank_t, m - self.k, axis=1)[:, m - self.k]
            length = np.sqrt(np.einsum("nd,nd->n", embedding, embedding))
            neighbours = 1.0 - kth / np.maximum(length, 1e-12)
        apart_distance = self.apart.distance(matrix[:, apart]) if self.apart else zero
        return np.stack([mahalanobis, neighbours, apart_distance], axis=1)

    def _combined(self, raw: np.ndarray) -> np.ndarray:
        scaled = raw / np.array([self.mahalanobis_scale, self.knn_scale, self.apart.part_scale if self.apart else 1])
        return np.sqrt(np.einsum("nd,nd->n", scaled, scaled)) if self.combine == NORM else scaled.max(axis=1)

    def score(
        self,
        embedding: np.ndarray,
        stats: Sequence[Mapping[str, float]] | np.ndarray,
        probs: np.ndarray | None = None,
    ) -> np.ndarray:
        """[N] unfamiliarity: above 1.0 the image is unlike the training images (see the module). ``stats``: per
        image, mappings of the statistics, or an array of :attr:`inputs`; ``probs``, the model's probabilities,
        when the detector reads :data:`ANSWER_STATS` from mappings."""
        return self._combined(self.parts(embedding, stats, probs)) / self.threshold

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
            "apart": self.apart.to_dict() if self.apart else None,
            "combine": self.combine,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> OodDetector:
        """The detector stored in ``raw``; ValueError when it is not one this code can use. Detectors stored
        before ``apart`` and ``combine`` existed read as they scored then."""
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
            apart=Apart.from_dict(raw["apart"]) if raw.get("apart") else None,
            combine=raw.get("combine", MAX),
            **arrays,
        )
        d = len(detector.center)
        shapes_ok = (
            detector.scale.shape == (d,)
            and detector.class_means.ndim == 2
            and detector.class_means.shape[1] == d
            and detector.precision.shape == (d, d)
            and bank.ndim == 2
            and (bank.shape[1] == d - len(detector.stats) or detector.k == 0)
            and 0 <= detector.k <= len(bank)
            and detector.combine in (MAX, NORM)
        )
        numbers = (detector.threshold, detector.mahalanobis_scale, detector.knn_scale)
        if detector.apart:
            numbers += (detector.apart.part_scale,)
        if not shapes_ok or not np.all(np.isfinite(numbers)) or min(numbers[1:]) <= 0 or not np.all(detector.scale > 0):
            raise ValueError("detector arrays have inconsistent shapes or values")
        return detector


def fit(
    train_embedding: np.ndarray,
    train_stats: np.ndarray,
    train_labels: np.ndarray,
    heldout_embedding: np.ndarray,
    heldout_stats: np.ndarray,
    candidate: Candidate = DEFAULT,
    quantile: float = 0.99,
    seed: int = 0,
) -> OodDetector:
    """Fit ``candidate`` on the training images' embeddings and statistics (columns: ``candidate.inputs``); scale
    its distances and set the threshold on held-out ones."""
    train_stats, heldout_stats = np.asarray(train_stats, np.float64), np.asarray(heldout_stats, np.float64)
    joint = [candidate.inputs.index(k) for k in candidate.joint]
    x = np.concatenate([np.asarray(train_embedding, np.float64), train_stats[:, joint]], axis=1)
    center, scale = _moments(x)
    z = (x - center) / scale
    classes = np.unique(train_labels)
    means = np.stack([z[train_labels == c].mean(axis=0) for c in classes])
    residual = z - means[np.searchsorted(classes, train_labels)]
    covariance = residual.T @ residual / max(1, len(z) - len(classes)) + SHRINKAGE * np.eye(z.shape[1])
    bank = _unit(train_embedding)
    if len(bank) > BANK_SIZE:
        bank = bank[np.sort(np.random.default_rng(seed).permutation(len(bank))[:BANK_SIZE])]
    if not candidate.knn:
        bank = bank[:0]
    apart = None
    if candidate.apart:
        apart = Apart.fit(candidate.apart, train_stats[:, [candidate.inputs.index(k) for k in candidate.apart]])
    k = min(K, len(bank))
    unscaled = OodDetector(candidate.joint, center, scale, means, np.linalg.inv(covariance), 1.0, bank, k, 1.0, 1.0,
                           quantile, apart, candidate.combine)  # fmt: skip
    raw = unscaled.parts(heldout_embedding, heldout_stats)
    m_scale, k_scale, a_scale = (max(float(np.quantile(raw[:, i], PART_QUANTILE)), 1e-9) for i in range(3))
    scaled = dataclasses.replace(
        unscaled, mahalanobis_scale=m_scale, knn_scale=k_scale if k else 1.0,
        apart=dataclasses.replace(apart, part_scale=a_scale) if apart else None,
    )  # fmt: skip
    threshold = max(float(np.quantile(scaled.score(heldout_embedding, heldout_stats), quantile)), 1e-9)
    return dataclasses.replace(scaled, threshold=threshold)
