"""Headline drift figures for Prometheus: a text file for node-exporter's textfile collector, or a push to a
Pushgateway (the scheduled job on Kubernetes, which has no node to leave a file on)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, generate_latest, push_to_gateway, write_to_textfile

from drift.report import DriftResult

PREFIX = "imgcls_drift"
JOB = "imgcls_drift"


def registry(
    result: DriftResult | None,
    model: str | None,
    skipped_lines: int = 0,
    rows_current: int = 0,
    unfamiliar_share: float = float("nan"),
) -> CollectorRegistry:
    """The figures of one run; ``result`` None means the window could not be judged."""
    reg = CollectorRegistry()
    labels = {"model": model or ""}

    def gauge(name: str, help_text: str, value: float) -> None:
        Gauge(f"{PREFIX}_{name}", help_text, list(labels), registry=reg).labels(**labels).set(value)

    gauge(
        "judged",
        "1 when the last run could judge drift, 0 when it could not (no log, too few rows)",
        result is not None,
    )
    gauge("last_run_timestamp_seconds", "Unix time of the last drift run", time.time())
    gauge("skipped_lines", "Corrupt or truncated inference-log lines skipped by the last run", skipped_lines)
    gauge("unfamiliar_share", "Share of the window's images flagged as unlike the training images", unfamiliar_share)
    if result is None:
        gauge("rows_current", "Current (log) rows used by the last run", rows_current)
        return reg
    gauge("detected", "1 when any feature, the predicted label or the embeddings drifted", result.drift)
    gauge(
        "dataset_drift",
        "Evidently's dataset drift: 1 when the share of drifted columns reaches drift_share",
        result.dataset_drift,
    )
    gauge(
        "share_drifted_features",
        "Share of monitored columns (statistics, confidence, unfamiliarity, label) that drifted",
        result.drifted_share,
    )
    gauge(
        "embedding_score", "Embedding drift score: ROC AUC of a reference-vs-current classifier", result.embedding_score
    )
    gauge("embedding_threshold", "Embedding drift score above which the embeddings drift", result.embedding_threshold)
    gauge("rows_current", "Current (log) rows used by the last run", result.rows_current)
    gauge("rows_reference", "Reference rows used by the last run", result.rows_reference)
    gauge("sampled", "1 when the last run sampled a table larger than the row cap", result.sampled)
    score = Gauge(
        f"{PREFIX}_feature_score",
        "Drift score per feature (p-value; ROC AUC for the embeddings)",
        ["model", "feature"],
        registry=reg,
    )
    drifted = Gauge(f"{PREFIX}_feature_drifted", "1 when the feature drifted", ["model", "feature"], registry=reg)
    for c in result.columns:
        score.labels(model=labels["model"], feature=c.feature).set(c.score)
        drifted.labels(model=labels["model"], feature=c.feature).set(c.drifted)
    return reg


def render(*args, **kwargs) -> str:
    """The text exposition of :func:`registry` (same arguments)."""
    return generate_latest(registry(*args, **kwargs)).decode()


def write_textfile(path: str | os.PathLike, reg: CollectorRegistry) -> Path:
    """Write the figures atomically (prometheus_client writes a temporary file and renames it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), reg)
    return path


def push(url: str, reg: CollectorRegistry, model: str | None, job: str = JOB) -> None:
    """Replace this model's figures on a Pushgateway (grouped by job and model)."""
    push_to_gateway(url, job=job, registry=reg, grouping_key={"model": model or ""}, timeout=30)
