"""The drift reference: statistics, prediction and embedding of held-out images, as the service will log them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from service.imagestats import STAT_FIELDS, image_stats
from service.inference_log import EMBEDDING_PREFIX
from training.dataset import Images
from training.evaluate import predict

log = logging.getLogger(__name__)


def build_reference(session, images: Images, classes: list[str], max_images: int, seed: int = 0) -> pd.DataFrame:
    """One row per held-out image: STAT_FIELDS, ``label``, ``confidence`` and ``emb_0..emb_{E-1}``.

    ``images`` were decoded by the serving preprocessing, so the statistics are the very numbers the
    service computes for an upload of the same file; the prediction comes from the fp32 ONNX model.
    """
    n = len(images.labels)
    pick = np.sort(np.random.default_rng(seed).permutation(n)[:max_images]) if n > max_images else np.arange(n)
    pixels = images.pixels[pick]
    probs, emb = predict(session, pixels)
    rows = [image_stats(pixels[j], images.sizes[i]) for j, i in enumerate(pick)]
    frame = pd.DataFrame(rows, columns=list(STAT_FIELDS)).astype("float64")
    frame["label"] = [classes[k] for k in probs.argmax(1)]
    frame["confidence"] = probs.max(1).astype("float64")
    emb_cols = pd.DataFrame(emb.astype("float64"), columns=[f"{EMBEDDING_PREFIX}{k}" for k in range(emb.shape[1])])
    return pd.concat([frame, emb_cols], axis=1)


def save_reference(frame: pd.DataFrame, path: Path) -> Path:
    """Write the reference table as Parquet."""
    frame.to_parquet(path, index=False)
    log.info("Wrote drift reference %s (%d images, %d columns)", path, len(frame), frame.shape[1])
    return path
