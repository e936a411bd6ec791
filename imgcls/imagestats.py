"""Per-image statistics for drift detection: one function used by the training reference and the service.

They are computed on the model-input array (after decode, orientation and resize), subsampled to
about 64 px, which is exactly what the model sees; ``width``, ``height`` and ``aspect_ratio`` describe the
original upload. It runs once per request, so it is written for few numpy calls on contiguous rows, in float64.
tests/test_preprocess.py checks it against the formulas written plainly.
"""

from __future__ import annotations

import math

import numpy as np

#: Larger inputs are subsampled to about this side first, so statistics cost well under a millisecond.
STATS_SIDE = 64
#: Column order of the statistics everywhere (inference log, reference table, drift report).
STAT_FIELDS = (
    "brightness",
    "contrast",
    "sharpness",
    "colorfulness",
    "saturation",
    "entropy",
    "width",
    "height",
    "aspect_ratio",
)
#: RGB to the three planes the statistics read: luma (ITU-R 601), r - g and (r + g) / 2 - b.
_PLANES = np.array([[0.299, 0.587, 0.114], [1.0, -1.0, 0.0], [0.5, 0.5, -1.0]])


def image_stats(pixels: np.ndarray, size: tuple[int, int]) -> dict[str, float]:
    """Statistics of one uint8 HWC RGB array and the original (width, height) it came from."""
    step = max(1, min(pixels.shape[:2]) // STATS_SIDE)
    sub = pixels[::step, ::step]
    h, w = sub.shape[:2]
    n = h * w
    # One contiguous row per channel: reductions along short or strided axes cost numpy many times more.
    rgb = np.ascontiguousarray(sub.transpose(2, 0, 1)).reshape(3, n).astype(np.float64)
    planes = _PLANES @ rgb  # luma, r - g, (r + g) / 2 - b
    means = planes.sum(axis=1) / n
    dev = planes - means[:, None]
    stds = np.sqrt(np.einsum("ij,ij->i", dev, dev) / n)
    # Variance of a 4-neighbour Laplacian of the luma: falls sharply with blur.
    luma = planes[0].reshape(h, w)
    lap = luma[1:-1, 1:-1] * 4
    lap -= luma[:-2, 1:-1]
    lap -= luma[2:, 1:-1]
    lap -= luma[1:-1, :-2]
    lap -= luma[1:-1, 2:]
    lap = lap.ravel()
    lap -= lap.sum() / max(1, lap.size)
    sharpness = math.log1p(float(np.dot(lap, lap)) / max(1, lap.size))
    top = np.maximum(np.maximum(rgb[0], rgb[1]), rgb[2])
    spread = top - np.minimum(np.minimum(rgb[0], rgb[1]), rgb[2])
    spread /= np.maximum(top, 1e-6)  # 0 where the pixel is black
    counts = np.bincount(planes[0].astype(np.uint8), minlength=256)
    counts = counts[counts > 0]
    (luma_mean, rg_mean, yb_mean), (luma_std, rg_std, yb_std) = means.tolist(), stds.tolist()
    width, height = size
    return {
        "brightness": luma_mean / 255.0,
        "contrast": luma_std / 255.0,
        "sharpness": sharpness,
        # Hasler & Suesstrunk colourfulness.
        "colorfulness": (math.hypot(rg_std, yb_std) + 0.3 * math.hypot(rg_mean, yb_mean)) / 255.0,
        "saturation": float(spread.sum()) / n,
        "entropy": math.log2(n) - float(np.dot(counts, np.log2(counts))) / n,  # of the luma histogram, in bits
        "width": float(width),
        "height": float(height),
        "aspect_ratio": float(width / height) if height else 0.0,
    }
