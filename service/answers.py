"""Answering: the model's outputs for one image to its JSON result, and every error to the one error response.

For each classified image :class:`Answerer` picks the top-k labels, scores how unfamiliar the image is
(:mod:`imgcls.ood`), counts it in the metrics and queues its inference-log record (with a thumbnail when it
is unfamiliar).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from starlette.responses import JSONResponse

from imgcls.errors import ApiError
from imgcls.inference_log import InferenceLogWriter, make_record
from imgcls.ood import OodDetector
from service import metrics


def error_response(err: ApiError) -> JSONResponse:
    """The JSON error response for ``err`` (with Retry-After when it has one); counted by its code."""
    metrics.reject(err.code)
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


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
        scores = self.detector.score(embedding, stats)
        results = []
        for i, row in enumerate(probs):
            order = np.argsort(-row, kind="stable")[: min(top_k, n)]
            top = [{"label": self.labels[j], "score": round(float(row[j]), 6)} for j in order]
            label, score = top[0]["label"], top[0]["score"]
            ood = float(scores[i]) if math.isfinite(scores[i]) else 1e9
            unfamiliar = ood > 1.0
            self.metrics.predictions.labels(label=label).inc()
            self.metrics.confidence.observe(score)
            self.metrics.ood_score.observe(ood)
            if unfamiliar:
                self.metrics.unfamiliar.inc()
            record = make_record(
                request_ids[i], self.tag, self.variant, label, score, ood, unfamiliar, stats[i],
                embedding[i], source,
            )  # fmt: skip
            self.inference_log.write(record, thumbnail=pixels[i] if unfamiliar else None)
            results.append(
                {"label": label, "score": score, "top_k": top, "unfamiliar": unfamiliar, "ood_score": round(ood, 3)}
            )
        return results
