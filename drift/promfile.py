"""Headline drift figures as a Prometheus text file, for node-exporter's textfile collector."""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

from drift.report import DriftResult

PREFIX = "imgcls_drift"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def render(result: DriftResult | None, model: str | None, skipped_lines: int = 0, rows_current: int = 0) -> str:
    """The text exposition of one run; ``result`` None means the window could not be judged."""
    labels = f'{{model="{_label(model or "")}"}}'
    gauges: list[tuple[str, str, str, float]] = [
        (
            "judged",
            "1 when the last run could judge drift, 0 when it could not (no log, too few rows)",
            labels,
            0.0 if result is None else 1.0,
        ),
        ("last_run_timestamp_seconds", "Unix time of the last drift run", labels, time.time()),
        (
            "skipped_lines",
            "Corrupt or truncated inference-log lines skipped by the last run",
            labels,
            float(skipped_lines),
        ),
    ]
    if result is None:
        gauges.append(("rows_current", "Current (log) rows used by the last run", labels, float(rows_current)))
    else:
        gauges += [
            (
                "detected",
                "1 when any feature, the predicted label or the embeddings drifted",
                labels,
                float(result.drift),
            ),
            (
                "dataset_drift",
                "Evidently's dataset drift: 1 when the share of drifted columns reaches drift_share",
                labels,
                float(result.dataset_drift),
            ),
            (
                "share_drifted_features",
                "Share of monitored columns (statistics, confidence, label) that drifted",
                labels,
                result.drifted_share,
            ),
            (
                "embedding_score",
                "Embedding drift score: ROC AUC of a reference-vs-current classifier",
                labels,
                result.embedding_score,
            ),
            (
                "embedding_threshold",
                "Embedding drift score above which the embeddings drift",
                labels,
                result.embedding_threshold,
            ),
            ("rows_current", "Current (log) rows used by the last run", labels, float(result.rows_current)),
            ("rows_reference", "Reference rows used by the last run", labels, float(result.rows_reference)),
            ("sampled", "1 when the last run sampled a table larger than the row cap", labels, float(result.sampled)),
        ]
    lines = []
    for name, help_text, lab, value in gauges:
        lines += [
            f"# HELP {PREFIX}_{name} {help_text}",
            f"# TYPE {PREFIX}_{name} gauge",
            f"{PREFIX}_{name}{lab} {_number(value)}",
        ]
    if result is not None:
        model_label = f'model="{_label(model or "")}"'
        for name, help_text, attr in (
            ("feature_score", "Drift score per feature (p-value; ROC AUC for the embeddings)", "score"),
            ("feature_drifted", "1 when the feature drifted", "drifted"),
        ):
            lines += [f"# HELP {PREFIX}_{name} {help_text}", f"# TYPE {PREFIX}_{name} gauge"]
            for c in result.columns:
                lines.append(
                    f'{PREFIX}_{name}{{{model_label},feature="{_label(c.feature)}"}} {_number(float(getattr(c, attr)))}'
                )
    return "\n".join(lines) + "\n"


def write_textfile(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically (temp file in the same folder, then rename), so a scrape never reads half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
