"""Where people look: the run history in Evidently's workspace and UI, the report's banner and legend, the thumbnails.

Synthetic logs as in tests/test_drift.py (the service's schema functions, real Evidently, a model saved in the
test store); thumbnails written by the service's own log writer.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import typing as t
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import requests
from evidently.ui.workspace import Workspace

from drift.__main__ import main
from drift.logread import read_log
from drift.report import drift_report, save_cannot_judge
from drift.reportpage import CANNOT_JUDGE, COLOURS, DRIFT, MEANINGS, NO_DRIFT
from drift.thumbnails import most_unfamiliar
from drift.workspace import DEFAULT_PROJECT, cannot_judge_snapshot, record, tagged
from imgcls.imagestats import STAT_FIELDS
from imgcls.inference_log import EMBEDDING_PREFIX, InferenceLogWriter, make_record
from loadtest.servers import free_port
from tests.test_drift import T0, stored_model, synthetic_rows, write_log  # noqa: F401  (stored_model: a fixture)


def workspace_runs(folder: Path) -> list:
    """The snapshots of the workspace's project, oldest first, read back with Evidently's own API."""
    workspace = Workspace(str(folder))
    (project,) = workspace.search_project(DEFAULT_PROJECT)
    runs = [workspace.get_run(project.id, i) for i in workspace.list_runs(project.id)]
    return sorted(runs, key=lambda r: r.timestamp)


def values(run) -> dict[str, float]:
    """``ValueDrift:<column>`` and ``ImgclsFigure:<figure>`` of a snapshot, with their values."""
    out = {}
    for result in run.metric_results.values():
        params = result.metric_value_location.metric.params
        kind = params["type"].rsplit(":", 1)[1]
        if kind in ("ValueDrift", "ImgclsFigure"):
            out[f"{kind}:{params.get('column') or params.get('figure')}"] = result.value
    return out


@pytest.fixture(scope="module")
def recorded(stored_model, tmp_path_factory) -> tuple[Path, list]:  # noqa: F811
    """Four runs of the real job, each on the rows logged since the last: no drift, a brightness shift, too few
    rows, no drift again. Returns the reports folder and the workspace's snapshots."""
    root = tmp_path_factory.mktemp("history")
    out = root / "reports"
    windows = [synthetic_rows(300, seed=30), synthetic_rows(300, seed=31, brightness_shift=0.12),
               synthetic_rows(40, seed=32), synthetic_rows(300, seed=33)]  # fmt: skip
    codes = []
    for k, rows in enumerate(windows):
        start = T0 + timedelta(hours=k)
        write_log(root / "log" / f"inference-{k}.jsonl", rows, stored_model, start=start)
        codes.append(main(["--log-dir", str(root / "log"), "--since", start.isoformat(), "--out", str(out)]))
    assert codes == [0, 1, 2, 0]
    return out, workspace_runs(out / "workspace")


def test_every_run_is_in_the_evidently_workspace_with_its_verdict_and_figures(recorded, stored_model):  # noqa: F811
    out, runs = recorded
    verdicts = [NO_DRIFT, DRIFT, CANNOT_JUDGE, NO_DRIFT]
    assert [[t for t in r.tags if t in verdicts] for r in runs] == [[v] for v in verdicts]
    assert all({"drift job", stored_model, stored_model.split(":")[0], "int8"} <= set(r.tags) for r in runs)
    figures = [values(r) for r in runs]
    assert [f["ImgclsFigure:rows"] for f in figures] == [300, 300, 40, 300]
    judged = [figures[i] for i in (0, 1, 3)]
    for f in judged:
        assert {k.split(":")[1] for k in f if k.startswith("ValueDrift")} == {*STAT_FIELDS, "confidence", "ood_score",
                                                                              "label"}  # fmt: skip
        assert 0.5 <= f["ImgclsFigure:embedding_threshold"] < 1 and 0 <= f["ImgclsFigure:unfamiliar_share"] <= 1
    shifted = figures[1]
    assert shifted["ValueDrift:brightness"] < shifted["ImgclsFigure:column_threshold"]
    assert "40 current rows" in runs[2].metadata["reason"]
    for r in runs:  # every run, the one that could not judge included, has a page of its own
        assert Path(r.metadata["report"]).is_file() and Path(r.metadata["report"]).name.startswith("drift-")


def test_concurrent_runs_share_one_project(tmp_path):
    def run(k: int) -> None:
        for _ in range(3):
            snapshot = tagged(cannot_judge_snapshot("drift", f"writer {k}", k), ["drift job"], {})
            record(tmp_path, snapshot, ["brightness"])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(workspace_runs(tmp_path)) == 12


def wait_for_json(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> t.Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return requests.get(url, timeout=5).json()
        except (requests.RequestException, ValueError):
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout} s: {log.read_text()[-3000:]}")


def test_evidently_ui_charts_each_feature_and_the_verdicts_across_runs(recorded, tmp_path):
    """Evidently's own UI, started as docs/drift.md says, serves the project's dashboard and its series."""
    out, runs = recorded
    port = free_port()
    env = {**os.environ, "DO_NOT_TRACK": "1"}
    cmd = [str(Path(sys.executable).parent / "evidently"), "ui", "--workspace", str(out / "workspace"),
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with open(tmp_path / "ui.log", "wb") as log, subprocess.Popen(cmd, env=env, stdout=log, stderr=log) as ui:
        try:
            base = f"http://127.0.0.1:{port}"
            projects = wait_for_json(base + "/api/projects", ui, tmp_path / "ui.log")
            (project,) = [p for p in projects if p["name"] == DEFAULT_PROJECT]
            board = requests.get(f"{base}/api/v2/dashboards/{project['id']}", timeout=10).json()
            panels = {p["title"]: p for p in board["panels"]}
            assert {*STAT_FIELDS, "confidence", "ood_score", "label", "Embeddings", "Unfamiliar share"} <= set(panels)
            assert {tab["title"] for tab in board["tabs"]} == {"Drift", "Accuracy"}

            def series(title: str) -> dict[str, list]:
                """Each value of the panel by its legend, one entry per run the panel shows (None: none)."""
                values = panels[title]["values"]
                keys = ("tags", "metadata", "metric", "metric_labels")
                filters = [{k: v.get(k, {}) for k in keys} for v in values]
                data = requests.post(f"{base}/api/v2/snapshots/{project['id']}/data_series_batch", timeout=10,
                                     json={"series_filter": filters}).json()  # fmt: skip
                n = len(data["sources"])
                return {values[s["filter_index"]]["legend"]: s["values"] + [None] * (n - len(s["values"]))
                        for s in data["series"]}  # fmt: skip

            brightness = series("brightness")
            assert [p < t for p, t in zip(brightness["p-value"], brightness["drifts below"], strict=True)] == [
                False, True, False]  # fmt: skip
            verdict = series("Verdict: what moved in each run")
            totals = [sum(v or 0 for v in run) for run in zip(*verdict.values(), strict=True)]
            assert [t > 0 for t in totals] == [False, True, True, False], verdict
            assert verdict["could not judge"][2] == 1 and verdict["columns that moved"][1] >= 1
        finally:
            ui.terminate()


def test_banner_shows_the_verdict_in_colour_with_what_drifted_and_what_it_means(tmp_path):
    reference = synthetic_rows(1000, seed=40)
    calm = drift_report(reference, synthetic_rows(300, seed=41), tmp_path / "calm", subject="m:1 (int8)")
    bright = drift_report(
        reference, synthetic_rows(300, seed=42, brightness_shift=0.12), tmp_path / "bright", subject="m:1 (int8)"
    )
    stuck = save_cannot_judge(tmp_path / "stuck", "60 current rows; at least 100 are needed", subject="m:1 (int8)")
    pages = {kind: p.read_text() for kind, p in ((NO_DRIFT, calm.html_path), (DRIFT, bright.html_path),
                                                 (CANNOT_JUDGE, stuck))}  # fmt: skip
    for kind, page in pages.items():
        banner = re.search(r'<div class="drift-banner" data-verdict="([^"]+)" style="background:(#\w+)', page)
        assert banner.groups() == (kind, COLOURS[kind])
        assert re.search(r"<title>[^<]*m:1 \(int8\)", page)
    assert len(set(COLOURS.values())) == 3
    drifted = [c.feature for c in bright.columns if c.drifted]
    assert "brightness" in drifted
    listed = pages[DRIFT][: pages[DRIFT].index("Reading the scores")]
    for feature in drifted:
        assert f"<b>{feature}</b>: {MEANINGS[feature]}" in listed.replace("&#x27;", "'")
    assert "Every feature is within its threshold" in pages[NO_DRIFT]
    assert not [c for c in calm.columns if c.drifted]
    assert "60 current rows; at least 100 are needed" in pages[CANNOT_JUDGE]
    # The legend and the table say which scores are p-values (drift below) and which is an AUC (drift above).
    for page in (pages[DRIFT], pages[NO_DRIFT]):
        assert "p-values" in page and "AUC" in page
        assert re.search(r"<b>embedding</b></td>(<td[^>]*>[^<]*</td>){2}<td[^>]*>AUC &gt; thr</td>", page)
        assert re.search(r"<b>brightness</b></td>(<td[^>]*>[^<]*</td>){2}<td[^>]*>p ≤ thr</td>", page)


def write_with_thumbnails(folder: Path, rows, model: str, scores: list[float], with_thumbnail: list[bool]) -> None:
    """Log ``rows`` through the service's writer with these unfamiliarity scores; thumbnails where asked."""
    writer = InferenceLogWriter(folder, flush_interval=0.05, fsync=False, thumbnails_per_s=1e6)
    emb = rows[[c for c in rows.columns if c.startswith(EMBEDDING_PREFIX)]].to_numpy()
    for i, (stats, label) in enumerate(zip(rows[list(STAT_FIELDS)].to_dict("records"), rows["label"], strict=True)):
        record = make_record(f"{folder.name}-{i}", model, "int8", label, 0.9, scores[i], scores[i] > 1.0, stats,
                             emb[i].tolist(), time=T0 + timedelta(seconds=i))  # fmt: skip
        pixels = np.full((32, 32, 3), (i * 37) % 256, np.uint8) if with_thumbnail[i] else None
        writer.write(record, thumbnail=pixels)
    writer.close()


def test_report_shows_the_most_unfamiliar_stored_images_first(stored_model, tmp_path, capsys):  # noqa: F811
    """Two pods' folders; the highest score of each has no thumbnail any more (pruned) and is passed over."""
    log_dir, pruned = tmp_path / "log", set()
    rng = np.random.default_rng(50)
    for pod, seed in (("pod-a", 51), ("pod-b", 52)):
        scores = [round(float(x), 4) for x in rng.uniform(0.2, 3.0, size=100)]
        stored = [s > 1.0 for s in scores]
        stored[int(np.argmax(scores))] = False
        pruned.add(f"{pod}-{int(np.argmax(scores))}")
        write_with_thumbnails(log_dir / pod, synthetic_rows(100, seed=seed), stored_model, scores, stored)
    frame = read_log(log_dir).frame
    has_thumbnail = (frame["ood_score"] > 1.0) & ~frame["request_id"].isin(list(pruned))
    expected = frame[has_thumbnail].sort_values("ood_score", ascending=False)["request_id"].tolist()
    shown = most_unfamiliar(frame, log_dir, 5)
    assert [t.request_id for t in shown] == expected[:5]
    assert {t.request_id[:5] for t in most_unfamiliar(frame, log_dir, 100)} == {"pod-a", "pod-b"}

    assert main(["--log-dir", str(log_dir), "--out", str(tmp_path / "r"), "--thumbnails", "5"]) in (0, 1)
    page = next((tmp_path / "r").glob("drift-*.html")).read_text()
    images = re.findall(r'<img src="data:image/jpeg;base64,[^"]+" alt="request ([\w-]+),', page)
    assert images == expected[:5]
    assert "thumbnails of the most unfamiliar images on the report: 5" in capsys.readouterr().out


def test_report_says_when_no_thumbnail_is_stored(stored_model, tmp_path):  # noqa: F811
    write_log(tmp_path / "log" / "inference-1.jsonl", synthetic_rows(150, seed=60), stored_model)
    assert main(["--log-dir", str(tmp_path / "log"), "--out", str(tmp_path / "r")]) == 0
    page = next((tmp_path / "r").glob("drift-*.html")).read_text()
    assert "No thumbnail of this window is stored" in page and "data:image/jpeg" not in page
