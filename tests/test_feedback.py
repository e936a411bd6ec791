"""Labels that arrive later: POST /feedback through the real service, then the accuracy job over its log."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
import requests

from imgcls.demo_images import CLASSES, DemoParams, render
from imgcls.inference_log import FEEDBACK, log_files, parse_feedback
from tests.helpers import ROOT, assert_error, jpeg, start_server

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def feedback(server, body: dict) -> requests.Response:
    return requests.post(server.url + "/feedback", json=body, timeout=30)


def test_labels_for_answers_are_recorded_and_bad_ones_refused(server):
    answer = requests.post(server.url + "/classify", files={"image": ("a.jpg", jpeg())}, timeout=30).json()
    batch = requests.post(server.url + "/classify_batch", files=[("images", ("a.jpg", jpeg()))] * 2, timeout=30).json()
    label = answer["label"]
    assert feedback(server, {"request_id": answer["request_id"], "label": label}).json() == {"recorded": 1}
    items = [{"request_id": f"{batch['request_id']}/1", "label": label}, {"request_id": answer["request_id"],
             "label": label}]  # fmt: skip
    assert feedback(server, {"items": items}).json() == {"recorded": 2}

    forged = answer["request_id"][:16] + "0" * 16
    assert_error(feedback(server, {"request_id": forged, "label": label}), 404, "unknown_request_id")
    assert_error(feedback(server, {"request_id": "not-an-id", "label": label}), 404, "unknown_request_id")
    assert_error(feedback(server, {"request_id": answer["request_id"], "label": "zebra"}), 400, "unknown_label")
    assert_error(feedback(server, {"request_id": answer["request_id"]}), 400, "missing_field")
    unreadable = requests.post(server.url + "/feedback", data=b'{"request_id": ""}', timeout=30,
                               headers={"Content-Type": "multipart/form-data"})  # no boundary  # fmt: skip
    assert_error(unreadable, 400, "invalid_request")
    refused = feedback(server, {"items": [*items, {"request_id": forged, "label": label}]})
    assert_error(refused, 404, "unknown_request_id")
    assert "Item 3" in refused.json()["detail"]  # and nothing of that request was recorded
    time.sleep(2)  # the writer flushes once a second
    recorded = [
        parse_feedback(line) for f in log_files(server.log_dir, FEEDBACK) for line in f.read_bytes().splitlines()
    ]
    ids = [r["request_id"] for r in recorded if r]
    assert ids.count(answer["request_id"]) == 2 and ids.count(f"{batch['request_id']}/1") == 1 and forged not in ids


def test_the_accuracy_job_joins_labels_to_predictions(server, tmp_path):
    """Every label says the answer was wrong: the accuracy on labelled images is 0, far below the test set's."""
    labels = requests.get(server.url + "/info", timeout=10).json()["labels"]
    since = datetime.now(UTC).isoformat(timespec="seconds")  # the other tests' predictions stay out
    time.sleep(1)
    items = []
    for i in range(60):
        image = render(CLASSES.index(labels[i % len(labels)]), 5000 + i, DemoParams(image_size=160))
        answer = requests.post(server.url + "/classify", files={"image": ("s.jpg", image)}, timeout=30).json()
        wrong = labels[(labels.index(answer["label"]) + 1) % len(labels)]
        items.append({"request_id": answer["request_id"], "label": wrong})
    assert feedback(server, {"items": items}).json() == {"recorded": 60}
    time.sleep(2)
    cmd = [sys.executable, "-m", "drift.accuracy", "--log-dir", str(server.log_dir), "--out", str(tmp_path),
           "--since", since, "--min-labels", "20"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "verdict: ACCURACY DROPPED" in proc.stdout and "precision" in proc.stdout
    (page,) = tmp_path.glob("accuracy-*.html")
    assert "Accuracy dropped" in page.read_text()
    prom = (tmp_path / "accuracy.prom").read_text()
    assert "imgcls_accuracy_dropped{" in prom and "imgcls_accuracy_labelled_share{" in prom

    few = subprocess.run([*cmd[:-1], "10000"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert few.returncode == 2 and "at least 10000 are needed" in few.stderr
    usage = subprocess.run([*cmd[:-4], "--since", "yesterday"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 64


def test_kept_images_with_their_labels_become_a_training_folder_only_where_the_operator_opted_in(
    server, tiny_model, tmp_path
):
    """IMGCLS_KEEP_IMAGES_BYTES on a second server: the labelled images go to DIR/<label>/, which training reads.
    The shared server keeps its default (no user image kept): its log folder has no images and export says why."""
    kept = start_server(".", {"IMGCLS_MODEL": tiny_model, "IMGCLS_DEVICE": "cpu",
                              "IMGCLS_KEEP_IMAGES_BYTES": str(16 << 20)}, tmp_path / "kept")  # fmt: skip
    try:
        labels = requests.get(kept.url + "/info", timeout=10).json()["labels"]
        items, n = [], 3 * len(labels)  # three a class: training needs one for each split
        for i in range(n):
            image = render(CLASSES.index(labels[i % len(labels)]), 6000 + i, DemoParams(image_size=160))
            answer = requests.post(kept.url + "/classify", files={"image": ("s.jpg", image)}, timeout=30).json()
            items.append({"request_id": answer["request_id"], "label": labels[i % len(labels)]})
        assert feedback(kept, {"items": items}).json() == {"recorded": n}
        time.sleep(2)  # the writer flushes once a second
    finally:
        kept.stop()
    out = tmp_path / "folder"
    cmd = [sys.executable, "-m", "drift.accuracy", "--log-dir", str(kept.log_dir), "--export", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and f"exported {n} of {n} labelled images" in proc.stdout, proc.stdout + proc.stderr
    from training.dataset import discover

    classes, splits = discover(out)
    assert classes == sorted(labels) and sum(len(s.paths) for s in splits.values()) == n

    assert not (server.log_dir / "images").exists()  # the default: no user image kept
    none = subprocess.run([*cmd[:3], "--log-dir", str(server.log_dir), "--export", str(tmp_path / "none")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert none.returncode == 2 and "IMGCLS_KEEP_IMAGES_BYTES" in none.stderr
