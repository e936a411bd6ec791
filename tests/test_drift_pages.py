"""Where people look: the run history and its trend page, the report's banner and legend, the thumbnails.

Synthetic logs as in tests/test_drift.py (the service's schema functions, real Evidently, a model saved in the
test store); thumbnails written by the service's own log writer.
"""

from __future__ import annotations

import json
import re
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from drift.__main__ import main
from drift.history import append_run, load_history, record_run
from drift.logread import read_log
from drift.report import drift_report, save_cannot_judge
from drift.reportpage import CANNOT_JUDGE, COLOURS, DRIFT, MEANINGS, NO_DRIFT
from drift.thumbnails import most_unfamiliar
from imgcls.imagestats import STAT_FIELDS
from imgcls.inference_log import EMBEDDING_PREFIX, InferenceLogWriter, make_record
from tests.test_drift import T0, stored_model, synthetic_rows, write_log  # noqa: F401  (stored_model: a fixture)


def entry(i: int, verdict: str = NO_DRIFT, **extra) -> dict:
    """A history line as the job writes it (only the fields the reader and the page rely on)."""
    time = (T0 + timedelta(hours=i)).isoformat()
    features = [{"feature": "brightness", "method": "ks", "score": 0.5 / (i + 1), "threshold": 0.0017,
                 "drifted": verdict == DRIFT, "drifts_when": "p <= thr"}]  # fmt: skip
    return {"v": 1, "time": time, "verdict": verdict, "model": "m:1", "variant": "int8", "rows": 100 + i,
            "features": features, **extra}  # fmt: skip


def test_history_appends_whole_lines_and_skips_the_torn_line_of_a_killed_run(tmp_path):
    path = tmp_path / "history.jsonl"
    append_run(path, entry(0))
    append_run(path, entry(1, DRIFT))
    whole = path.read_bytes()
    with open(path, "ab") as f:  # a run killed in the middle of its write
        f.write(json.dumps(entry(2)).encode()[:40])
    assert [e["verdict"] for e in load_history(path)] == [NO_DRIFT, DRIFT]
    append_run(path, entry(3, CANNOT_JUDGE, reason="too few rows"))
    runs = load_history(path)
    assert [e["rows"] for e in runs] == [100, 101, 103], "the run after the torn line is kept whole"
    assert runs[-1]["reason"] == "too few rows"
    assert path.read_bytes().startswith(whole)
    assert load_history(tmp_path / "none.jsonl") == []


def test_concurrent_runs_never_interleave_their_lines(tmp_path):
    path = tmp_path / "history.jsonl"
    big = {"notes": "x" * 20_000}  # well past the size at which a pipe write may be split

    def runs(k: int) -> None:
        for i in range(50):
            append_run(path, entry(i, reason=f"writer {k}", **big))

    threads = [threading.Thread(target=runs, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_bytes().splitlines()
    assert len(lines) == 200 and len(load_history(path)) == 200


@pytest.fixture(scope="module")
def recorded(stored_model, tmp_path_factory) -> tuple[Path, list[dict]]:  # noqa: F811
    """Four runs of the real job, each on the rows logged since the last: no drift, a brightness shift, too few
    rows, no drift again. Returns the reports folder and the history."""
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
    return out, load_history(out / "history.jsonl")


def test_every_run_is_recorded_with_its_summary(recorded, stored_model):  # noqa: F811
    out, runs = recorded
    assert [r["verdict"] for r in runs] == [NO_DRIFT, DRIFT, CANNOT_JUDGE, NO_DRIFT]
    assert [r["rows"] for r in runs] == [300, 300, 40, 300]
    assert all(r["model"] == stored_model and r["variant"] == "int8" for r in runs)
    shifted = {f["feature"]: f for f in runs[1]["features"]}
    assert shifted["brightness"]["drifted"] and shifted["brightness"]["score"] < shifted["brightness"]["threshold"]
    assert set(shifted) == {*STAT_FIELDS, "confidence", "ood_score", "label", "embedding"}
    assert shifted["embedding"]["drifts_when"] == "AUC > thr"
    assert "40 current rows" in runs[2]["reason"] and runs[2]["features"] == []
    assert runs[1]["window"]["start"].startswith((T0 + timedelta(hours=1)).isoformat()[:19])
    assert all(0 <= r["unfamiliar_share"] <= 1 for r in runs)
    for r in runs:  # every run, the one that could not judge included, has a page of its own
        assert (out / r["report"]).is_file() and r["report"].startswith("drift-")


def test_trend_page_shows_every_run_and_feature_and_is_self_contained(recorded):
    out, runs = recorded
    page = (out / "history.html").read_text()
    charts = re.findall(r'<svg [^>]*aria-label="([^"]+)"', page)
    assert charts == [*STAT_FIELDS, "confidence", "ood_score", "label", "embedding", "unfamiliar share"]
    table = page[page.index("Runs, newest first") :]
    assert table.count("<tr>") == 1 + len(runs)
    for r in runs:
        assert r["_time"].strftime("%Y-%m-%d %H:%M:%S") in table
        assert f'href="{r["report"]}"' in table
    assert "40 current rows" in table  # why the third run could not judge
    brightness = page[page.index('aria-label="brightness"') : page.index('aria-label="contrast"')]
    assert brightness.count('fill="#c62828"><title>') == 1, "the one drifted run is marked in red"
    assert "Drifting since" not in page, "the latest judged run did not drift"
    # Self-contained: nothing is fetched, so it opens from disk, in a mail or behind a firewall alike.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page and "url(" not in page


def test_trend_page_says_since_when_the_traffic_drifts(tmp_path):
    path, page = tmp_path / "history.jsonl", tmp_path / "history.html"
    for i, verdict in enumerate([NO_DRIFT, NO_DRIFT, DRIFT, CANNOT_JUDGE, DRIFT]):
        record_run(path, entry(i, verdict), page)
    text = page.read_text()
    assert "Drifting since the run at 2025-01-01 02:00:00 UTC</b> (2 judged run(s) in a row" in text
    assert "the last run without drift was at 2025-01-01 01:00:00 UTC" in text
    assert main(["--out", str(tmp_path), "--history-only"]) == 0
    assert page.read_text() == text
    assert main(["--out", str(tmp_path / "empty"), "--history-only"]) == 2


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
