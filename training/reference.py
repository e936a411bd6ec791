"""What each exported variant is measured by in production: its drift reference and its unfamiliar-image detector.

Every variant (fp32, fp16, int8) sees the same images a little differently, so each gets its own: the
detector is fitted on the training images' embeddings as that variant computes them, its threshold set on the
validation images, and its flag rate checked on the test images; the reference holds held-out images with the
statistics, prediction, confidence, embedding and unfamiliarity score that the service logs for that variant.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from imgcls import ood
from imgcls.imagestats import STAT_FIELDS, image_stats
from imgcls.inference_log import EMBEDDING_PREFIX
from imgcls.onnx_run import predict, session_for
from training.dataset import Images

log = logging.getLogger(__name__)


@dataclass
class VariantScores:
    """One variant's outputs on the splits, its detector and its reference table."""

    test_probs: np.ndarray
    detector: ood.OodDetector
    flagged_val: float
    flagged_test: float
    reference: pd.DataFrame


def statistics(images: Images) -> np.ndarray:
    """[N, len(STAT_FIELDS)] image statistics of decoded images, as the service computes them."""
    rows = [image_stats(p, size) for p, size in zip(images.pixels, images.sizes, strict=True)]
    return np.array([[row[k] for k in STAT_FIELDS] for row in rows]).reshape(len(rows), len(STAT_FIELDS))


def _detector_stats(stats: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The columns the detector reads (``ood.DEFAULT.inputs``) of the images' statistics and answers."""
    return ood.feature_matrix([dict(zip(STAT_FIELDS, row, strict=True)) for row in stats], probs, ood.DEFAULT.inputs)


def score_variant(
    path: Path,
    splits: dict[str, Images],
    stats: dict[str, np.ndarray],
    classes: list[str],
    reference_images: int,
    seed: int,
    threads: int = 0,
) -> VariantScores:
    """Run one variant over train/val/test, fit its detector and build its reference (held-out: val + test)."""
    session = session_for(path, threads=threads)
    outputs = {name: predict(session, images.pixels) for name, images in splits.items()}
    content = {name: _detector_stats(stats[name], outputs[name][0]) for name in splits}
    detector = ood.fit(
        outputs["train"][1], content["train"], splits["train"].labels, outputs["val"][1], content["val"], seed=seed
    )
    scores = {name: detector.score(outputs[name][1], content[name]) for name in splits}
    flagged = {name: float((scores[name] > 1.0).mean()) for name in ("val", "test")}

    heldout = ("val", "test")
    probs = np.concatenate([outputs[n][0] for n in heldout])
    emb = np.concatenate([outputs[n][1] for n in heldout])
    table = np.concatenate([stats[n] for n in heldout])
    ood_scores = np.concatenate([scores[n] for n in heldout])
    pick = np.arange(len(probs))
    if len(pick) > reference_images:
        pick = np.sort(np.random.default_rng(seed).permutation(len(pick))[:reference_images])
    frame = pd.DataFrame(table[pick], columns=list(STAT_FIELDS)).astype("float64")
    frame["label"] = [classes[k] for k in probs[pick].argmax(1)]
    frame["confidence"] = probs[pick].max(1).astype("float64")
    frame["ood_score"] = ood_scores[pick].astype("float64")
    emb_cols = pd.DataFrame(
        emb[pick].astype("float64"), columns=[f"{EMBEDDING_PREFIX}{k}" for k in range(emb.shape[1])]
    )
    reference = pd.concat([frame, emb_cols], axis=1)
    log.info(
        "%s: unfamiliar-image detector set on validation images (%.0f%% quantile); flags %.1f%% of test images",
        path.name, 100 * detector.quantile, 100 * flagged["test"],
    )  # fmt: skip
    return VariantScores(outputs["test"][0], detector, flagged["val"], flagged["test"], reference)
