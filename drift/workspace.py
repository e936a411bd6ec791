"""The history of drift and accuracy runs, kept in an Evidently workspace and shown by Evidently's own UI.

Each run of ``python -m drift`` and ``python -m drift.accuracy`` adds its snapshot to a project of the workspace
(``OUT/workspace`` unless ``--workspace`` says otherwise): Evidently's metrics (each feature's p-value, the drifted
columns, the classification figures) and, as :class:`ImgclsFigure` metrics, the figures the job computes outside
them (the embeddings' AUC and its threshold, the unfamiliar share of the whole window, its rows). The snapshot is
tagged with the verdict, the model and its variant. The project's dashboard, set up when the project is created,
charts them across runs; read it with::

    DO_NOT_TRACK=1 evidently ui --workspace reports/workspace --host 127.0.0.1 --port 8000

(``make monitor`` starts it beside Prometheus.) Runs that could not judge are recorded too, with their reason.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from evidently import Report
from evidently.core.metric_types import SingleValueCalculation, SingleValueMetric
from evidently.core.report import Snapshot
from evidently.sdk.models import PanelMetric
from evidently.sdk.panels import bar_plot_panel, line_plot_panel
from evidently.ui.workspace import Project, Workspace

DEFAULT_PROJECT = "imgcls"
WORKSPACE_DIR = "workspace"
FIGURES = "imgcls figures"  # the run's additional dataset that holds the figures, one row
DROPPED, IN_LINE = "dropped", "in line"  # the accuracy job's verdicts (the drift job's: drift.reportpage)
DRIFT_TAB, ACCURACY_TAB = "Drift", "Accuracy"

#: What each figure a job adds is called on the reports and the dashboard.
TITLES = {
    "rows": "Rows in the window",
    "unfamiliar_share": "Unfamiliar share of the window",
    "column_threshold": "p-value threshold of each column",
    "embedding_auc": "Embeddings: AUC of a reference-vs-current classifier",
    "embedding_threshold": "Embeddings: AUC threshold",
    "embedding_drifted": "Embeddings moved (1) or not (0)",
    "cannot_judge": "The run could not judge (1)",
    "dropped": "Accuracy dropped (1) or not (0)",
    "test_accuracy": "Accuracy on the held-out test set",
    "accuracy_upper": "Accuracy on labelled images: 95% upper bound",
    "labelled_share": "Share of predictions with a label",
}


class ImgclsFigure(SingleValueMetric):
    """A figure the job computed outside Evidently's metrics, carried into the snapshot so the dashboard can chart
    it; its value is read from the run's additional dataset :data:`FIGURES` (a metric's own fields would make each
    value a series of its own)."""

    figure: str
    title: str

    def _default_tests(self, context) -> list:
        return []

    def _default_tests_with_reference(self, context) -> list:
        return []


class ImgclsFigureCalculation(SingleValueCalculation[ImgclsFigure]):
    def calculate(self, context, current_data, reference_data):
        frame = context.additional_data[FIGURES].as_dataframe()
        return self.result(float(frame[self.metric.figure].iloc[0])), None

    def display_name(self) -> str:
        return self.metric.title


def figure_metrics(figures: Mapping[str, float]) -> tuple[list[ImgclsFigure], dict[str, pd.DataFrame]]:
    """The metrics that carry ``figures`` and the ``additional_data`` a report's ``run`` needs for them."""
    metrics = [ImgclsFigure(figure=name, title=TITLES[name]) for name in figures]
    return metrics, {FIGURES: pd.DataFrame({name: [float(v)] for name, v in figures.items()})}


def tagged(snapshot: Snapshot, tags: Iterable[str], metadata: Mapping[str, str]) -> Snapshot:
    """``snapshot`` with ``tags`` and ``metadata`` added (the verdict is known only once the report has run)."""
    model = snapshot.to_snapshot_model()
    model.tags = [*model.tags, *(t for t in tags if t)]
    model.metadata = {**model.metadata, **{k: v for k, v in metadata.items() if v}}
    return Snapshot.load_model(model)


def run_tags(verdict: str, model: str | None, variant: str | None, kind: str) -> list[str]:
    """The job (``drift job`` or ``accuracy job``), the verdict, the model tag, its name and its variant."""
    return [f"{kind} job", verdict, *([model, model.split(":")[0]] if model else []), variant or ""]


def cannot_judge_snapshot(kind: str, reason: str, rows: int) -> Snapshot:
    """The snapshot of a run that could not judge: its rows and, in its metadata, why."""
    metrics, extra = figure_metrics({"rows": rows, "cannot_judge": 1})
    stamp = datetime.now(UTC).replace(tzinfo=None)
    return Report(metrics, metadata={"reason": reason}).run(extra[FIGURES], None, additional_data=extra,
                                                             timestamp=stamp, name=kind)  # fmt: skip


@contextmanager
def _locked(folder: Path):
    """One job at a time in the workspace: two runs creating its project at once would make two."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".imgcls.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def record(
    folder: str | os.PathLike, snapshot: Snapshot, features: Iterable[str], project: str = DEFAULT_PROJECT
) -> str:
    """Add ``snapshot`` to ``project`` in the workspace at ``folder`` (both created when missing); returns the
    snapshot's file. ``features``: the drift columns the dashboard charts when it is created."""
    folder = Path(folder)
    with _locked(folder):
        workspace = Workspace(str(folder))
        found = workspace.search_project(project)
        target = found[0] if found else _create_project(workspace, project, list(features))
        return workspace.add_run(target.id, snapshot).url


def _create_project(workspace: Workspace, name: str, features: list[str]) -> Project:
    project = workspace.create_project(name, description="Drift and accuracy runs of the image classifier")
    board = project.dashboard
    # Every value of a panel filters on the same tags: this Evidently picks a value's filter by metric and labels
    # alone, so two values that differ only in their tags would share one.
    drift, accuracy = ["drift job"], ["accuracy job"]
    panels = {
        DRIFT_TAB: [
            bar_plot_panel(
                "Verdict: what moved in each run",
                [
                    PanelMetric(
                        legend="columns that moved",
                        metric="DriftedColumnsCount",
                        metric_labels={"value_type": "count"},
                        tags=drift,
                    ),  # fmt: skip
                    _figure("embedding_drifted", "embeddings moved", drift),
                    _figure("cannot_judge", "could not judge", drift),
                ],
                description="A run found drift where its bar rises above zero.",
                stacked=True,
            ),
            line_plot_panel("Rows in the window", [_figure("rows", "rows", drift)], size="half"),
            line_plot_panel(
                "Unfamiliar share",
                [_figure("unfamiliar_share", "share of the window unlike the training images", drift)],
                size="half",
            ),
            line_plot_panel(
                "Embeddings",
                [_figure("embedding_auc", "AUC", drift), _figure("embedding_threshold", "drifts above", drift)],
                description="ROC AUC of a classifier told to separate current from reference embeddings.",
                size="half",
            ),
            *(
                line_plot_panel(
                    feature,
                    [
                        PanelMetric(
                            legend="p-value", metric="ValueDrift", metric_labels={"column": feature}, tags=drift
                        ),  # fmt: skip
                        _figure("column_threshold", "drifts below", drift),
                    ],
                    size="half",
                )
                for feature in features
            ),
        ],
        ACCURACY_TAB: [
            bar_plot_panel(
                "Verdict of each run",
                [
                    _figure("dropped", "accuracy dropped", accuracy),
                    _figure("cannot_judge", "could not judge", accuracy),
                ],
                description="A run found the accuracy dropped where its bar rises above zero.",
                stacked=True,
            ),
            line_plot_panel(
                "Accuracy",
                [
                    PanelMetric(legend="on labelled images", metric="Accuracy", tags=accuracy),
                    _figure("accuracy_upper", "its 95% upper bound", accuracy),
                    _figure("test_accuracy", "on the test set", accuracy),
                ],
            ),
            line_plot_panel("Labelled predictions", [_figure("rows", "labelled", accuracy)], size="half"),
            line_plot_panel(
                "Labelled share", [_figure("labelled_share", "predictions with a label", accuracy)], size="half"
            ),
        ],
    }
    for tab, tab_panels in panels.items():
        for panel in tab_panels:
            board.add_panel(panel, tab=tab)
    return project


def _figure(figure: str, legend: str, tags: list[str]) -> PanelMetric:
    return PanelMetric(legend=legend, metric=ImgclsFigure.__name__, metric_labels={"figure": figure}, tags=tags)
