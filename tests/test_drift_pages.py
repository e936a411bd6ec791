"""Where people look: the report's banner and legend, the thumbnails.

Synthetic logs as in tests/test_drift.py (the service's schema functions, real Evidently, a model saved in the
test store); thumbnails written by the service's own log writer.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import numpy as np

from drift.__main__ import main
from drift.logread import read_log
from drift.report import drift_report, save_cannot_judge
from drift.reportpage import CANNOT_JUDGE, COLOURS, DRIFT, MEANINGS, NO_DRIFT
from drift.thumbnails import most_unfamiliar
from imgcls.imagestats import STAT_FIELDS
from imgcls.inference_log import EMBEDDING_PREFIX, InferenceLogWriter, make_record
from tests.test_drift import T0, stored_model, synthetic_rows, write_log  # noqa: F401  (stored_model: a fixture)


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
    writer = InferenceLogWriter(folder, flush_interval=0.05, fsync=False)
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
