"""The service's own Prometheus metrics, next to BentoML's built-in ones on ``/metrics``.

BentoML runs every worker (API workers and the model service) with one shared
``PROMETHEUS_MULTIPROC_DIR`` and aggregates them on ``/metrics``. ``prometheus_client`` only writes
there if it is first imported after BentoML has set that variable, so metrics are created lazily
by :func:`get`, from inside a worker, never at module import time.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

PREFIX = "imgcls"
# Seconds, from a small image's decode or a GPU batch to a large CPU batch.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Unfamiliarity scores: 1.0 is the threshold (about 1% of in-distribution images score above it).
OOD_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


@functools.cache
def get() -> SimpleNamespace:
    """This process's metric objects (created on first use)."""
    from prometheus_client import Counter, Gauge, Histogram

    return SimpleNamespace(
        predictions=Counter(f"{PREFIX}_predictions", "Classified images by predicted (top-1) label", ["label"]),
        images=Counter(
            f"{PREFIX}_images",
            "Classified images by traffic source (IMGCLS_TRAFFIC_SOURCES; drift judges production)",
            ["source"],
        ),
        confidence=Histogram(
            f"{PREFIX}_confidence", "Top-1 probability of classified images", buckets=CONFIDENCE_BUCKETS
        ),
        ood_score=Histogram(
            f"{PREFIX}_ood_score",
            "Unfamiliarity (distance to the training images) of classified images",
            buckets=OOD_BUCKETS,
        ),  # fmt: skip
        unfamiliar=Counter(f"{PREFIX}_unfamiliar", "Classified images flagged as unlike the training images"),
        rejected=Counter(f"{PREFIX}_rejected", "Requests or images refused, by reason (the error code)", ["reason"]),
        preprocess_seconds=Histogram(
            f"{PREFIX}_preprocess_seconds", "Decode, resize and statistics of one image", buckets=DURATION_BUCKETS
        ),
        model_seconds=Histogram(
            f"{PREFIX}_model_seconds", "onnxruntime time for one model batch", buckets=DURATION_BUCKETS
        ),
        batch_size=Histogram(f"{PREFIX}_batch_size", "Images per model batch", buckets=BATCH_BUCKETS),
        in_flight=Gauge(
            f"{PREFIX}_in_flight",
            "Requests being processed now (received, not yet answered)",
            multiprocess_mode="livesum",
        ),  # fmt: skip
        ready=Gauge(
            f"{PREFIX}_ready",
            "1 while an API worker serves (after its self-test), 0 while it shuts down",
            multiprocess_mode="livemin",
        ),  # fmt: skip
        log_write_errors=Counter(
            f"{PREFIX}_inference_log_write_errors",
            "Writes of the inference log that failed (a full disk, an I/O error)",
        ),
        log_dropped=Counter(
            f"{PREFIX}_inference_log_dropped",
            "Inference-log records lost: the writer fell behind, or their write failed",
        ),
        model_info=Gauge(
            f"{PREFIX}_model_info",
            "The model being served (value 1): tag, variant, onnxruntime provider",
            ["model", "variant", "provider"],
            multiprocess_mode="livemax",
        ),
    )


def reject(reason: str) -> None:
    """Count one refused request or image."""
    get().rejected.labels(reason=reason).inc()
