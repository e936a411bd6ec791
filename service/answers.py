"""Answering: the model's outputs for an image to its result, and the results' schema (what ``/docs`` shows).

For each classified image :class:`Answerer` picks the top-k labels, scores how unfamiliar the image is
(:mod:`imgcls.ood`), counts it in the metrics and queues its inference-log record (with a thumbnail when it
is unfamiliar).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from pydantic import BaseModel, Field

from imgcls.inference_log import InferenceLogWriter, make_record
from imgcls.ood import OodDetector
from service import metrics


class Prediction(BaseModel):
    label: str
    score: float = Field(description="Probability of this label, 0..1")


class ClassifyResult(BaseModel):
    label: str = Field(description="The most likely label")
    score: float = Field(description="Its probability, 0..1")
    top_k: list[Prediction] = Field(description="The top_k most likely labels, most likely first")
    unfamiliar: bool = Field(description="True when the image is unlike anything the model was trained on")
    ood_score: float = Field(description="How unlike the training images it is; unfamiliar above the threshold")
    model: str = Field(description="Tag of the model in the BentoML store")
    request_id: str


class BatchItem(BaseModel):
    label: str | None = None
    score: float | None = None
    top_k: list[Prediction] | None = None
    unfamiliar: bool | None = None
    ood_score: float | None = None
    error: str | None = Field(default=None, description="Set instead of label when this image was refused")
    detail: str | None = None


class ClassifyBatchResult(BaseModel):
    results: list[BatchItem] = Field(description="One entry per uploaded image, in upload order")
    model: str
    request_id: str


class Answerer:
    """Turns model output rows into results, for one served model variant."""

    def __init__(
        self, tag: str, variant: str, labels: list[str], detector: OodDetector, inference_log: InferenceLogWriter
    ):
        self.tag, self.variant, self.labels, self.detector = tag, variant, labels, detector
        self.inference_log = inference_log
        self.metrics = metrics.get()

    def answer(
        self,
        rows: np.ndarray,
        stats: list[Mapping[str, float]],
        pixels: list[np.ndarray],
        top_k: int,
        request_ids: list[str],
        source: str,
    ) -> list[dict]:
        """One result per row of model output ``[N, classes + embedding]``; each is logged and counted."""
        n = len(self.labels)
        probs, embedding = rows[:, :n], rows[:, n:]
        scores = self.detector.score(embedding, stats, probs)
        results = []
        for i, row in enumerate(probs):
            order = np.argsort(-row, kind="stable")[: min(top_k, n)]
            top = [{"label": self.labels[j], "score": round(float(row[j]), 6)} for j in order]
            label, score = top[0]["label"], top[0]["score"]
            ood = float(scores[i]) if math.isfinite(scores[i]) else 1e9
            unfamiliar = ood > 1.0
            self.metrics.predictions.labels(label=label).inc()
            self.metrics.images.labels(source=source).inc()
            self.metrics.confidence.observe(score)
            self.metrics.ood_score.observe(ood)
            if unfamiliar:
                self.metrics.unfamiliar.inc()
            record = make_record(
                request_ids[i], self.tag, self.variant, label, score, ood, unfamiliar, stats[i],
                embedding[i], source,
            )  # fmt: skip
            self.inference_log.write(record, thumbnail=pixels[i] if unfamiliar else None, image=pixels[i])
            results.append(
                {"label": label, "score": score, "top_k": top, "unfamiliar": unfamiliar, "ood_score": round(ood, 3)}
            )
        return results
