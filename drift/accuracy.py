"""`python -m drift.accuracy`: the model's accuracy on production images, from the labels people sent later.

Drift says the inputs moved; only labels say the model got worse. The service records each label sent to
``POST /feedback`` beside the inference log (``feedback-*.jsonl``); this job joins them to the predictions of the
window by request id (the last label of an id counts), and reports over the labelled images the accuracy, each
class's precision and recall and the confusion matrix, with Evidently's classification preset, next to the same
figures on the model's held-out test set (stored with the model in ``metrics.json``).

The verdict: the accuracy **dropped** when even the upper end of its 95% Wilson interval lies more than
``--max-drop`` below the test accuracy, so a handful of unlucky labels does not alarm. Labels are a sample that
people chose to send (often the answers that looked wrong): read the figure as a lower bound when they do.
Memory follows the labels, not the window: only the predictions that have a label are kept.

``--export DIR`` turns the labelled images into a training folder instead (``DIR/<label>/<request id>.jpg``, as
``python -m training --data DIR`` reads it), where the operator opted in to keeping images on the service
(``IMGCLS_KEEP_IMAGES_BYTES``; off by default, when no user image is kept).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from evidently.core.report import Snapshot
from prometheus_client import CollectorRegistry, Gauge

from drift import EXIT_USAGE, UsageParser
from drift.logread import LogError, find_log_files, parse_since
from drift.promfile import push, write_textfile
from drift.reference import ReferenceError, model_folder
from drift.report import COLUMNS
from drift.reportpage import CANNOT_JUDGE
from drift.workspace import (
    DEFAULT_PROJECT,
    DROPPED,
    IN_LINE,
    WORKSPACE_DIR,
    cannot_judge_snapshot,
    figure_metrics,
    record,
    run_tags,
    tagged,
)
from imgcls.inference_log import (
    FEEDBACK,
    KEPT_DIR,
    default_log_dir,
    log_files,
    parse_feedback,
    parse_record,
    thumbnail_files,
    thumbnail_name,
)  # fmt: skip
from imgcls.model_files import METRICS_FILE

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DROPPED, EXIT_CANNOT_JUDGE = 0, 1, 2
EXIT_CODES = f"""exit codes:
  {EXIT_OK}  the accuracy on labelled images is in line with the test accuracy
  {EXIT_DROPPED}  it dropped: even its 95% upper bound is more than --max-drop below the test accuracy
  {EXIT_CANNOT_JUDGE}  cannot judge: no log or labels, fewer than --min-labels, several models, no test metrics
  {EXIT_USAGE} the command line is wrong (nothing is judged, written or pushed)
  with --export: {EXIT_OK} images were copied, {EXIT_CANNOT_JUDGE} none (no kept image, or no label in the window)
"""
PREFIX, JOB = "imgcls_accuracy", "imgcls_accuracy"
Z95 = 1.959964


@dataclass
class AccuracyResult:
    """What one run found."""

    model: str
    labelled: int  # predictions of the window with a label
    predictions: int  # predictions of the window
    accuracy: float
    upper: float  # 95% Wilson upper bound of the accuracy
    test_accuracy: float
    dropped: bool
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # precision, recall, support
    confusion: list[list[int]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    html_path: str = ""

    @property
    def labelled_share(self) -> float:
        return self.labelled / self.predictions if self.predictions else float("nan")


def wilson_upper(correct: int, n: int, z: float = Z95) -> float:
    """The upper end of the Wilson score interval of ``correct`` successes in ``n``."""
    if n == 0:
        return 1.0
    p = correct / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


def read_labels(folder: Path) -> dict[str, str]:
    """The last label sent for each request id (a label may come any time after its prediction)."""
    labels: dict[str, tuple[str, str]] = {}
    for path in log_files(folder, FEEDBACK):
        with open(path, "rb") as f:
            for line in f:
                record = parse_feedback(line)
                if record is None:
                    continue
                previous = labels.get(record["request_id"])
                if previous is None or record["time"] >= previous[0]:
                    labels[record["request_id"]] = (record["time"], record["label"])
    return {rid: label for rid, (_, label) in labels.items()}


def join(
    folder: Path, labels: dict[str, str], since: datetime | None, model: str | None
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The window's labelled predictions (model, label, target) and the predictions per model in the window."""
    rows, predictions = [], {}
    for path in find_log_files(folder):
        with open(path, "rb") as f:
            for line in f:
                parsed = parse_record(line)
                if parsed is None:
                    continue
                record, when = parsed
                if since is not None and when < since:
                    continue
                predictions[record["model"]] = predictions.get(record["model"], 0) + 1
                target = labels.get(record["request_id"])
                if target is not None and (model is None or record["model"] == model):
                    rows.append((record["model"], record["label"], target, record["request_id"]))
    return pd.DataFrame(rows, columns=["model", "prediction", "target", "request_id"]), predictions


def export(frame: pd.DataFrame, folder: Path, out: Path, corrected_only: bool) -> dict[str, int]:
    """Copy the kept image of each labelled prediction to ``out/<label>/``; the images copied per label."""
    kept = thumbnail_files(folder, KEPT_DIR)
    if not kept:
        raise LogError(f"no kept image under {folder}: the service keeps images only with IMGCLS_KEEP_IMAGES_BYTES "
                       "set (off by default)")  # fmt: skip
    if corrected_only:
        frame = frame[frame["prediction"] != frame["target"]]
    copied: dict[str, int] = {}
    for target, request_id in zip(frame["target"], frame["request_id"], strict=True):
        source = kept.get(thumbnail_name(request_id))
        if source is None:  # pruned, or classified before images were kept
            continue
        label_dir = out / re.sub(r"[^\w. -]", "_", target).lstrip(".")
        label_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, label_dir / source.name)
        copied[target] = copied.get(target, 0) + 1
    return copied


def test_metrics(tag: str) -> tuple[float, dict]:
    """The served model's accuracy on its held-out test set and its per-class figures (metrics.json)."""
    metrics = json.loads((model_folder(tag) / METRICS_FILE).read_text())
    accuracy = metrics.get("accuracy") or {}
    value = accuracy.get("int8") or accuracy.get("fp32")
    if value is None:
        raise ReferenceError(f"{tag} has no test accuracy in {METRICS_FILE}: retrain it with this version")
    return float(value), metrics.get("per_class") or {}


def judge(frame: pd.DataFrame, predictions: int, tag: str, max_drop: float) -> AccuracyResult:
    """The accuracy, per-class figures and verdict of the labelled predictions of one model."""
    test_accuracy, _ = test_metrics(tag)
    correct = int((frame["prediction"] == frame["target"]).sum())
    n = len(frame)
    upper = wilson_upper(correct, n)
    classes = sorted(set(frame["prediction"]) | set(frame["target"]))
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    for target, prediction in zip(frame["target"], frame["prediction"], strict=True):
        matrix[index[target], index[prediction]] += 1
    per_class = {}
    for c, i in index.items():
        predicted, actual = matrix[:, i].sum(), matrix[i, :].sum()
        per_class[c] = {
            "precision": float(matrix[i, i] / predicted) if predicted else float("nan"),
            "recall": float(matrix[i, i] / actual) if actual else float("nan"),
            "support": int(actual),
        }
    return AccuracyResult(
        model=tag, labelled=n, predictions=predictions, accuracy=correct / n, upper=upper,
        test_accuracy=test_accuracy, dropped=upper < test_accuracy - max_drop, per_class=per_class,
        confusion=matrix.tolist(), classes=classes,
    )  # fmt: skip


def evidently_report(frame: pd.DataFrame, result: AccuracyResult, out: Path) -> tuple[Path, Snapshot]:
    """Evidently's classification preset over the labelled predictions, with the test figures beside it; the
    page's path and the snapshot."""
    from evidently import DataDefinition, Dataset, MulticlassClassification, Report
    from evidently.presets import ClassificationPreset

    definition = DataDefinition(
        classification=[MulticlassClassification(target="target", prediction_labels="prediction")],
        categorical_columns=["target", "prediction"],
    )
    data = Dataset.from_pandas(frame[["target", "prediction"]].astype(str), data_definition=definition)
    _, per_class = test_metrics(result.model)
    notes = (
        f"{result.model}: accuracy {result.accuracy:.1%} on {result.labelled} labelled images "
        f"({result.labelled_share:.1%} of {result.predictions} predictions), 95% upper bound {result.upper:.1%}; "
        f"test accuracy {result.test_accuracy:.1%}. Verdict: {'DROPPED' if result.dropped else 'in line'}. "
        f"Test set per class: {json.dumps(per_class)}"
    )
    stamp = datetime.now(UTC)
    figures, additional = figure_metrics(
        {"rows": result.labelled, "test_accuracy": result.test_accuracy, "accuracy_upper": result.upper,
         "labelled_share": result.labelled_share, "dropped": result.dropped}
    )  # fmt: skip
    snapshot = Report([ClassificationPreset(), *figures], metadata={"notes": notes}).run(
        data, None, additional_data=additional, timestamp=stamp.replace(tzinfo=None), name="accuracy"
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"accuracy-{stamp:%Y%m%dT%H%M%SZ}.html"
    snapshot.save_html(str(path))
    banner = (
        f'<div style="font:16px sans-serif;padding:12px;background:{"#fde8e8" if result.dropped else "#e8f5e9"}">'
        f"<b>{html.escape('Accuracy dropped' if result.dropped else 'Accuracy in line with the test set')}</b> - "
        f"{html.escape(notes.split('. Test set')[0])}.</div>"
    )
    page = path.read_text()
    path.write_text(page.replace("<body>", "<body>" + banner, 1) if "<body>" in page else banner + page)
    (out / path.name.replace(".html", ".json")).write_text(json.dumps(asdict(result), indent=1, default=str))
    return path, snapshot


def registry(result: AccuracyResult | None, model: str | None) -> CollectorRegistry:
    """The run's figures for Prometheus; ``result`` None when it could not judge."""
    reg = CollectorRegistry()
    labels = {"model": model or ""}

    def gauge(name: str, help_text: str, value: float) -> None:
        Gauge(f"{PREFIX}_{name}", help_text, list(labels), registry=reg).labels(**labels).set(value)

    gauge(
        "judged", "1 when the last accuracy run could judge, 0 when it could not (too few labels)", result is not None
    )
    gauge("last_run_timestamp_seconds", "Unix time of the last accuracy run", time.time())
    if result is not None:
        gauge("labelled", "Accuracy on the window's labelled images (0..1)", result.accuracy)
        gauge("labelled_upper", "Upper end of its 95% Wilson interval", result.upper)
        gauge("test", "Accuracy of the model on its held-out test set (0..1)", result.test_accuracy)
        gauge("labels", "Labelled predictions in the window", result.labelled)
        gauge("labelled_share", "Share of the window's predictions that got a label", result.labelled_share)
        gauge("dropped", "1 when the accuracy on labelled images dropped below the test accuracy", result.dropped)
    return reg


def main(argv: list[str] | None = None) -> int:
    p = UsageParser(prog="python -m drift.accuracy", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--log-dir", type=Path, default=default_log_dir(),
                   help="inference-log folder, with the feedback files (default: %(default)s)")  # fmt: skip
    p.add_argument("--since", help="predictions from this time on: ISO 8601 or a duration (24h, 7d); default: all")
    p.add_argument("--model", help="judge this model tag only (needed when the window holds several)")
    p.add_argument("--min-labels", type=int, default=30, help="fewer labels cannot be judged (default: %(default)s)")
    p.add_argument("--max-drop", type=float, default=0.05,
                   help="tolerated drop below the test accuracy, 0..1 (default: %(default)s)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("reports"), help="reports folder (default: %(default)s)")
    p.add_argument("--workspace", type=Path,
                   help=f"Evidently workspace each run is added to (default: OUT/{WORKSPACE_DIR})")  # fmt: skip
    p.add_argument("--project", default=DEFAULT_PROJECT, help="its project (default: %(default)s)")
    p.add_argument("--prom-file", type=Path, help="Prometheus text file (default: OUT/accuracy.prom)")
    p.add_argument("--pushgateway", metavar="URL", help="also push the figures to this Prometheus Pushgateway")
    p.add_argument("--export", type=Path, metavar="DIR", help="instead of judging, copy the window's labelled "
                   "images to DIR/<label>/, a training folder (needs images kept by the service)")  # fmt: skip
    p.add_argument("--corrected-only", action="store_true", help="with --export: only the images whose label "
                   "differs from the answer")  # fmt: skip
    args = p.parse_args(argv)
    try:
        since = parse_since(args.since) if args.since else None
    except LogError as exc:
        p.error(f"argument --since: {exc}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.export:
        try:
            frame, _ = join(args.log_dir, read_labels(args.log_dir), since, args.model)
            copied = export(frame, args.log_dir, args.export, args.corrected_only)
        except (LogError, OSError) as exc:
            print(f"cannot export: {exc}", file=sys.stderr)
            return EXIT_CANNOT_JUDGE
        print(f"exported {sum(copied.values())} of {len(frame)} labelled images to {args.export}: "
              + (", ".join(f"{k} {v}" for k, v in sorted(copied.items())) or "none kept"))  # fmt: skip
        print(f"train on them: python -m training --data {args.export}")
        return EXIT_OK if copied else EXIT_CANNOT_JUDGE
    result, model, reason, snapshot, labelled = None, args.model, "", None, 0
    try:
        labels = read_labels(args.log_dir)
        frame, predictions = join(args.log_dir, labels, since, args.model)
        models = sorted(set(frame["model"])) if len(frame) else []
        if len(models) > 1:
            raise LogError(f"labelled predictions of {len(models)} models ({', '.join(models)}): pass --model TAG")
        model = models[0] if models else args.model
        if len(frame) < args.min_labels:
            raise LogError(
                f"{len(frame)} labelled predictions in the window ({len(labels)} labels in all); at least "
                f"{args.min_labels} are needed: send labels to POST /feedback, or widen --since"
            )
        labelled = len(frame)
        result = judge(frame, predictions.get(model, len(frame)), model, args.max_drop)
        path, snapshot = evidently_report(frame, result, args.out)
        result.html_path = str(path)
    except (LogError, ReferenceError, OSError) as exc:
        reason = str(exc)
        print(f"cannot judge accuracy: {reason}", file=sys.stderr)
    verdict = CANNOT_JUDGE if result is None else DROPPED if result.dropped else IN_LINE
    workspace = args.workspace or args.out / WORKSPACE_DIR
    try:
        snapshot = snapshot or cannot_judge_snapshot("accuracy", reason, labelled)
        tags = run_tags(verdict, model, None, "accuracy")
        run = tagged(snapshot, tags, {"report": result.html_path if result else "", "reason": reason})
        print(f"workspace: {record(workspace, run, COLUMNS, args.project)}")
    except OSError as exc:  # the verdict still stands
        print(f"could not record the run in the workspace {workspace}: {exc}", file=sys.stderr)
    figures = registry(result, model)
    print(f"prometheus: {write_textfile(args.prom_file or args.out / 'accuracy.prom', figures)}")
    if args.pushgateway:
        try:
            push(args.pushgateway, figures, model, JOB)
        except OSError as exc:
            print(f"could not push to the Pushgateway {args.pushgateway}: {exc}", file=sys.stderr)
            return EXIT_CANNOT_JUDGE
    if result is None:
        return EXIT_CANNOT_JUDGE
    print(f"model {result.model}: {result.labelled} labelled of {result.predictions} predictions "
          f"({result.labelled_share:.1%})")  # fmt: skip
    print(f"accuracy on labelled images {result.accuracy:.1%} (95% upper bound {result.upper:.1%}); "
          f"test accuracy {result.test_accuracy:.1%}")  # fmt: skip
    print(f"{'class':16s} {'precision':>9s} {'recall':>7s} {'labels':>6s}")
    for name, figures_of in result.per_class.items():
        print(f"{name:16s} {figures_of['precision']:9.2f} {figures_of['recall']:7.2f} {figures_of['support']:6d}")
    print(f"verdict: {'ACCURACY DROPPED' if result.dropped else 'in line with the test set'}")
    print(f"report: {result.html_path}")
    return EXIT_DROPPED if result.dropped else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
