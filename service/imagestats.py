"""Per-image statistics for drift detection: one function used by the training reference and the service.

They are computed on the model-input array (after decode, orientation and resize), subsampled to
about 64 px, which costs about half a millisecond and is exactly what the model sees; ``width``, ``height`` and
``aspect_ratio`` describe the original upload.
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
    # Hasler & Suesstrunk colourfulness.
    rg, yb = r - g, 0.5 * (r + g) - b
    colorfulness = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0).mean()
    hist = np.bincount(luma.astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    width, height = size
    return {
        "brightness": float(luma.mean() / 255.0),
        "contrast": float(luma.std() / 255.0),
        "sharpness": float(np.log1p(lap.var())),
        "colorfulness": float(colorfulness / 255.0),
        "saturation": float(saturation),
        "entropy": float(-(p * np.log2(p)).sum()),
        "width": float(width),
        "height": float(height),
        "aspect_ratio": float(width / height) if height else 0.0,
    }
