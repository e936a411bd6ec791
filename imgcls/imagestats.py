"""Per-image statistics for drift detection: one function used by the training reference and the service.

They are computed on the model-input array (after decode, orientation and resize), subsampled to
about 64 px, which is exactly what the model sees; ``width``, ``height`` and ``aspect_ratio`` describe the
original upload. It runs once per request, so it is written for few numpy calls: about 0.15 ms at 32 px and
0.27 ms at 224 px on a 2-core box.
"""

from __future__ import annotations

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


def image_stats(pixels: np.ndarray, size: tuple[int, int]) -> dict[str, float]:
    """Statistics of one uint8 HWC RGB array and the original (width, height) it came from."""
    step = max(1, min(pixels.shape[:2]) // STATS_SIDE)
    rgb = pixels[::step, ::step].astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    # Variance of a 4-neighbour Laplacian: falls sharply with blur.
    lap = 4 * luma[1:-1, 1:-1] - luma[:-2, 1:-1] - luma[2:, 1:-1] - luma[1:-1, :-2] - luma[1:-1, 2:]
    # Hasler & Suesstrunk colourfulness. Means and deviations of the three planes in one pass each: this runs
    # per request, and on small inputs the cost is the number of numpy calls, not the arithmetic.
    planes = np.stack([luma, r - g, 0.5 * (r + g) - b]).reshape(3, -1)
    means = planes.mean(axis=1)
    stds = np.sqrt(np.square(planes - means[:, None]).mean(axis=1))
    colorfulness = np.hypot(stds[1], stds[2]) + 0.3 * np.hypot(means[1], means[2])
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    saturation = ((mx - mn) / np.maximum(mx, 1e-6)).mean()  # 0 where mx is 0
    hist = np.bincount(luma.astype(np.uint8).ravel(), minlength=256)
    p = hist[hist > 0] / luma.size
    width, height = size
    return {
        "brightness": float(means[0] / 255.0),
        "contrast": float(stds[0] / 255.0),
        "sharpness": float(np.log1p(lap.var())),
        "colorfulness": float(colorfulness / 255.0),
        "saturation": float(saturation),
        "entropy": float(-(p * np.log2(p)).sum()),
        "width": float(width),
        "height": float(height),
        "aspect_ratio": float(width / height) if height else 0.0,
    }
