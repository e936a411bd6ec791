"""The Evidently 0.7 drift report: image statistics, predicted label, confidence, unfamiliarity and embeddings
against the reference.

The decision rule, and why. Each of the 9 image statistics, the confidence, the unfamiliarity score and the
predicted label is tested on its own (Kolmogorov-Smirnov for numbers, chi-square for the label). The
statistics are strongly correlated (brightness, contrast, entropy, ...), and "any column at p < 0.05" over 12
columns alarms on a good share of healthy windows, so each column is judged at ``alpha / 12`` (Bonferroni):
the chance that any column alarms on in-distribution data stays at or below ``alpha`` whatever the
correlation. The embeddings are judged by Evidently's classifier method: a linear model learns to
tell reference from current rows on one half and is scored (ROC AUC) on the other; with no drift the
held-out AUC is distributed like that of random scores (Mann-Whitney), so the threshold is the
``1 - embedding_alpha`` quantile of that null. The job reports drift when any column or the
embeddings drift: at most ``alpha + embedding_alpha`` (3% by default) false alarms on healthy traffic.
Evidently's own "dataset drift" (share of drifted columns >= ``drift_share``) is reported beside it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from drift.reference import embedding_columns
from drift.reportpage import cannot_judge_page, report_page
from drift.thumbnails import Thumbnail
from imgcls.imagestats import STAT_FIELDS

log = logging.getLogger(__name__)

NUMERIC_COLUMNS = (*STAT_FIELDS, "confidence", "ood_score")
COLUMNS = (*NUMERIC_COLUMNS, "label")
EMBEDDING_NAME = "embedding"
#: As imgcls.inference_log.make_record writes them.
LOG_DECIMALS = {**dict.fromkeys(STAT_FIELDS, 6), "confidence": 6, "ood_score": 4}
LOG_EMBEDDING_DECIMALS = 5


@dataclass
class DriftConfig:
    """How the drift job judges; the defaults are what `python -m drift` uses."""

    alpha: float = 0.02  # family-wise false-alarm rate of the column tests (Bonferroni-split)
    embedding_alpha: float = 0.01  # false-alarm rate of the embedding test
    drift_share: float = 0.5  # Evidently's dataset drift: this share of columns drifted
    min_rows: int = 100  # fewer current rows cannot be judged (exit code 2)
    max_rows: int = 20_000  # per side; larger tables are sampled (and the report says so)
    seed: int = 0  # for sampling


@dataclass
class ColumnDrift:
    """The drift test of one column."""

    feature: str
    method: str
    score: float  # p-value for ks/chisquare; ROC AUC for the embeddings
    threshold: float
    drifted: bool

    @property
    def drifts_when(self) -> str:
        """How the score stands to the threshold when the column drifts: p-values fall, the embeddings' AUC rises."""
        if self.feature == EMBEDDING_NAME:
            return "AUC > thr"
        return "p < thr" if self.method == LABEL_TEST else "p <= thr"  # Evidently's KS test drifts at p <= threshold


@dataclass
class DriftResult:
    """What a drift report found, and where it was saved."""

    drift: bool  # the verdict: any column or the embeddings drifted
    dataset_drift: bool  # Evidently's rule: share of drifted columns >= drift_share
    drifted_share: float
    embedding_score: float
    embedding_threshold: float
    embedding_drift: bool
    columns: list[ColumnDrift]
    rows_current: int
    rows_reference: int
    rows_current_total: int
    rows_reference_total: int
    timestamp: str
    notes: list[str] = field(default_factory=list)
    html_path: Path | None = None
    json_path: Path | None = None
    snapshot: Any = field(default=None, repr=False)  # Evidently's, for the workspace

    @property
    def sampled(self) -> bool:
        return self.rows_current < self.rows_current_total or self.rows_reference < self.rows_reference_total

    def to_dict(self) -> dict:
        """A JSON-ready summary."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "snapshot"}
        out["columns"] = [asdict(c) for c in self.columns]
        out["sampled"] = self.sampled
        out["html_path"] = str(self.html_path) if self.html_path else None
        out["json_path"] = str(self.json_path) if self.json_path else None
        return out


class NotEnoughData(ValueError):
    """Too few rows to judge drift."""


def embedding_auc_threshold(n_reference: int, n_current: int, alpha: float) -> float:
    """The ROC AUC that random scores exceed with probability ``alpha`` on Evidently's held-out half."""
    n1, n2 = max(n_reference / 2, 1.0), max(n_current / 2, 1.0)
    sd = math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))
    return 0.5 + NormalDist().inv_cdf(1 - alpha) * sd


LABEL_TEST = "chi2_2sample"


def _two_sample_chi2(reference: pd.Series, current: pd.Series, feature_type, threshold: float) -> tuple[float, bool]:
    """Chi-square test of homogeneity (reference vs current label counts); rare labels are pooled.

    Evidently's own "chisquare" treats the reference shares as exact, which is only right when the reference
    is much larger than the current window; on a 20k-row window against a 2k-row reference it reports
    p < 1e-20 for identically distributed labels. The two-sample test counts both sides' noise.
    """
    from scipy.stats import chi2_contingency

    table = pd.concat([reference.value_counts(), current.value_counts()], axis=1).fillna(0).to_numpy().T
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    rare = expected.min(axis=0) < 5  # the chi-square approximation needs about 5 expected per cell
    if rare.any():
        table = np.column_stack([table[:, ~rare], table[:, rare].sum(axis=1)])
        table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 1.0, False
    p_value = float(chi2_contingency(table, correction=False)[1])
    return p_value, p_value < threshold


def _register_label_test() -> None:
    """Make the two-sample test known to Evidently by name (registering it again replaces it with itself)."""
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    test = StatTest(LABEL_TEST, "two-sample chi-square p_value", [ColumnType.Categorical], 0.05)
    register_stattest(test, _two_sample_chi2)


def _sample(frame: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    if len(frame) <= cap:
        return frame
    idx = np.sort(np.random.default_rng(seed).choice(len(frame), size=cap, replace=False))
    return frame.iloc[idx]


def drift_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    out_dir: str | Path | None,
    config: DriftConfig | None = None,
    name: str = "drift",
    notes: list[str] | None = None,
    subject: str = "",
    thumbnails: Sequence[Thumbnail] | None = None,
    rows: int | None = None,
    figures: Mapping[str, float] | None = None,
) -> DriftResult:
    """Build and run the Evidently report of ``current`` against ``reference``; save HTML + JSON under ``out_dir``.

    ``subject`` (what was judged, e.g. the model and variant) goes into the page's title and banner, and
    ``thumbnails`` into a strip below it (``None``: no strip). ``rows``: the window's rows when ``current`` is a
    sample of them (the log reader's). ``figures`` (of :data:`drift.workspace.TITLES`) go into the snapshot beside
    the embeddings' and the thresholds, for the workspace's dashboard."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import DriftedColumnsCount, ValueDrift
    from evidently.metrics.embeddings import ModelDriftMethod

    from drift.workspace import figure_metrics

    _register_label_test()
    config = config or DriftConfig()
    notes = list(notes or [])
    rows = max(rows or 0, len(current))
    if rows < config.min_rows:
        raise NotEnoughData(
            f"{rows} current rows; at least {config.min_rows} are needed to judge drift "
            "(send more traffic, or widen --since / --last)."
        )
    emb = embedding_columns(reference)
    if embedding_columns(current) != emb:
        raise ValueError(
            f"the log has {len(embedding_columns(current))} embedding values per row but the reference has "
            f"{len(emb)}: the log and the reference come from different models."
        )
    # Lines of a service without the unfamiliar-image score (schema version 1) leave that column out.
    columns = tuple(c for c in COLUMNS if c in reference.columns and c in current.columns and current[c].notna().all())
    numeric = [c for c in columns if c in NUMERIC_COLUMNS]
    cols = [*columns, *emb]
    ref = _sample(reference[cols], config.max_rows, config.seed).reset_index(drop=True)
    cur = _sample(current[cols], config.max_rows, config.seed + 1).reset_index(drop=True)
    for side, used, total in (("current", len(cur), rows), ("reference", len(ref), len(reference))):
        if used < total:
            notes.append(f"The {side} table was sampled: {used:,} of {total:,} rows (seed {config.seed}).")
    # The log rounds each number (make_record); round both sides alike, or a discrete column such as
    # aspect_ratio (4/3 in the reference, 1.333333 in the log) never matches.
    for frame in (ref, cur):
        frame["label"] = frame["label"].astype(str)
        frame[numeric] = frame[numeric].astype(float).round({c: LOG_DECIMALS[c] for c in numeric})
        frame[emb] = frame[emb].astype(float).round(LOG_EMBEDDING_DECIMALS)

    column_threshold = config.alpha / len(columns)
    auc_threshold = embedding_auc_threshold(len(ref), len(cur), config.embedding_alpha)
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=["label"])
    metrics = [
        DriftedColumnsCount(
            columns=list(columns),
            num_method="ks",
            cat_method=LABEL_TEST,
            threshold=column_threshold,
            drift_share=config.drift_share,
        ),
        *(
            ValueDrift(column=c, method=LABEL_TEST if c == "label" else "ks", threshold=column_threshold)
            for c in columns
        ),
    ]
    # Evidently's classifier method, called directly: its report widget would add a t-SNE map of the embeddings
    # (about 15 s on 2 cores) that says less than the score.
    embedding_score, embedding_drift, _ = ModelDriftMethod(threshold=auc_threshold, bootstrap=False)(
        cur[emb].copy(), ref[emb].copy()
    )
    extra, additional = figure_metrics(
        {**(figures or {}), "column_threshold": column_threshold, "embedding_auc": embedding_score,
         "embedding_threshold": auc_threshold, "embedding_drifted": embedding_drift}
    )  # fmt: skip
    stamp = datetime.now(UTC)
    report = Report([*metrics, *extra], include_tests=True, metadata={"notes": " ".join(notes)})
    # np.errstate: a constant column (every upload the same size) makes Evidently divide 0 by 0 in a correlation.
    with np.errstate(invalid="ignore", divide="ignore"):
        snapshot = report.run(
            Dataset.from_pandas(cur[list(columns)], data_definition=definition),
            Dataset.from_pandas(ref[list(columns)], data_definition=definition),
            additional_data=additional,
            timestamp=stamp.replace(tzinfo=None),
            name=name,
        )
    evidently = snapshot.dict()
    result = _summarise(evidently, config, column_threshold, auc_threshold, embedding_score, embedding_drift)
    result.rows_current, result.rows_reference = len(cur), len(ref)
    result.rows_current_total, result.rows_reference_total = rows, len(reference)
    result.timestamp = stamp.isoformat(timespec="seconds")
    result.notes = notes
    result.snapshot = snapshot
    if out_dir is not None:
        base = _new_base(out_dir, name, stamp)
        result.html_path, result.json_path = base.with_suffix(".html"), base.with_suffix(".json")
        page = report_page(snapshot.get_html_str(as_iframe=False), result, subject, thumbnails)
        result.html_path.write_text(page, encoding="utf-8")
        result.json_path.write_text(json.dumps({"summary": result.to_dict(), **evidently}, indent=1, default=str))
        log.info("drift report saved: %s, %s", result.html_path, result.json_path)
    return result


def save_cannot_judge(
    out_dir: str | Path,
    reason: str,
    notes: Sequence[str] = (),
    subject: str = "",
    thumbnails: Sequence[Thumbnail] | None = None,
    name: str = "drift",
) -> Path:
    """Save the page of a run that could not judge (why, and the thumbnails of the window); returns its path."""
    stamp = datetime.now(UTC)
    path = _new_base(out_dir, name, stamp).with_suffix(".html")
    created = stamp.isoformat(timespec="seconds")
    path.write_text(cannot_judge_page(reason, notes, subject, thumbnails, created), encoding="utf-8")
    log.info("drift page saved: %s", path)
    return path


def _new_base(out_dir: str | Path, name: str, stamp: datetime) -> Path:
    """``OUT/NAME-<UTC time>``, with a counter when a report of that second exists (two runs must not collide)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{name}-{stamp.strftime('%Y%m%dT%H%M%SZ')}"
    for i in range(1, 1000):
        if not base.with_suffix(".html").exists():
            break
        base = out / f"{name}-{stamp.strftime('%Y%m%dT%H%M%SZ')}-{i}"
    return base


def _summarise(
    evidently: dict,
    config: DriftConfig,
    column_threshold: float,
    auc_threshold: float,
    embedding_score: float,
    embedding_drift: bool,
) -> DriftResult:
    """The verdict and per-column results from the snapshot's metrics and tests, and the embedding test."""
    failed = {t["metric_config"]["metric_id"] for t in evidently["tests"] if t["status"] == "FAIL"}
    columns, drifted_share = [], 0.0
    for m in evidently["metrics"]:
        kind = m["config"]["type"]
        if kind.endswith("ValueDrift"):
            c = m["config"]
            columns.append(
                ColumnDrift(c["column"], c["method"], float(m["value"]), column_threshold, m["id"] in failed)
            )
        elif kind.endswith("DriftedColumnsCount"):
            drifted_share = float(m["value"]["share"])
    columns.append(
        ColumnDrift(EMBEDDING_NAME, "model AUC", float(embedding_score), auc_threshold, bool(embedding_drift))
    )
    return DriftResult(
        drift=any(c.drifted for c in columns),
        dataset_drift=drifted_share >= config.drift_share,
        drifted_share=drifted_share,
        embedding_score=float(embedding_score),
        embedding_threshold=auc_threshold,
        embedding_drift=bool(embedding_drift),
        columns=columns,
        rows_current=0,
        rows_reference=0,
        rows_current_total=0,
        rows_reference_total=0,
        timestamp="",
    )


def summary_table(result: DriftResult) -> str:
    """The per-feature results as a plain-text table, with the direction in which each score drifts."""
    lines = [f"{'feature':<14} {'method':<13} {'score':>10} {'drifts when':>11} {'threshold':>10}  drifted"]
    for c in result.columns:
        lines.append(
            f"{c.feature:<14} {c.method:<13} {c.score:>10.3g} {c.drifts_when:>11} {c.threshold:>10.3g}  "
            f"{'YES' if c.drifted else 'no'}"
        )
    return "\n".join(lines)
