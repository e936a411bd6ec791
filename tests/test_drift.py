"""The drift job on synthetic logs: bad lines, mixed models, too little data, the Prometheus file, a 100k-row log.

The rows are drawn from a small generative model of the log (correlated image statistics, a label,
a confidence, class-dependent embeddings), written with the service's own schema functions and read
by the real job with real Evidently. The model store lookup is real too (a model saved with
``bentoml.models.create`` in the test BentoML home).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from drift.__main__ import main
from drift.logread import LogError, parse_since, read_log
from drift.promfile import registry, render, write_textfile
from drift.report import DriftConfig, drift_report
from imgcls.imagestats import STAT_FIELDS
from imgcls.inference_log import EMBEDDING_PREFIX, encode, make_record
from imgcls.model_files import reference_file
from tests.helpers import ROOT

log = logging.getLogger(__name__)

CLASSES = ("circle", "square", "triangle", "star")
DIM = 16
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def synthetic_rows(n: int, seed: int, brightness_shift: float = 0.0) -> pd.DataFrame:
    """Rows shaped like the reference table: correlated statistics, label, confidence, class-dependent embedding."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    label_idx = rng.integers(len(CLASSES), size=n)
    size = rng.choice([(640, 480), (480, 640), (500, 375)], size=n)
    frame = pd.DataFrame(
        {
            "brightness": np.clip(0.45 + 0.12 * z[:, 0] + brightness_shift, 0, 1),
            "contrast": np.clip(0.2 + 0.04 * z[:, 0] + 0.03 * z[:, 1], 0, 1),
            "sharpness": 5 + 0.8 * z[:, 1] + 0.2 * rng.normal(size=n),
            "colorfulness": np.clip(0.3 + 0.05 * z[:, 1] + 0.03 * rng.normal(size=n), 0, None),
            "saturation": np.clip(0.4 + 0.08 * z[:, 1], 0, 1),
            "entropy": 7 + 0.3 * z[:, 0] + 0.2 * rng.normal(size=n),
            "width": size[:, 0].astype(float),
            "height": size[:, 1].astype(float),
        }
    )
    frame["aspect_ratio"] = frame["width"] / frame["height"]
    frame["label"] = [CLASSES[i] for i in label_idx]
    frame["confidence"] = rng.beta(8, 2, size=n)
    frame["ood_score"] = np.sqrt(rng.chisquare(DIM + 6, size=n))
    centroids = np.random.default_rng(1234).normal(size=(len(CLASSES), DIM))
    emb = centroids[label_idx] + 0.8 * rng.normal(size=(n, DIM))
    for j in range(DIM):
        frame[f"{EMBEDDING_PREFIX}{j}"] = emb[:, j]
    return frame[[*STAT_FIELDS, "label", "confidence", "ood_score", *(f"{EMBEDDING_PREFIX}{j}" for j in range(DIM))]]


def write_log(
    path: Path,
    rows: pd.DataFrame,
    model: str,
    start: datetime = T0,
    variant: str = "int8",
    source: str = "production",
) -> None:
    """Write rows as inference-log lines with the service's schema functions."""
    emb_cols = [c for c in rows.columns if c.startswith(EMBEDDING_PREFIX)]
    stats, embs = rows[list(STAT_FIELDS)].to_dict("records"), rows[emb_cols].to_numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        for i, (s, label, conf, ood) in enumerate(
            zip(stats, rows["label"], rows["confidence"], rows["ood_score"], strict=True)
        ):
            when = start + timedelta(seconds=i)
            fields = (model, variant, label, conf, ood, ood > 7.0, s, embs[i].tolist(), source)
            f.write(encode(make_record(uuid.uuid4().hex, *fields, time=when)))


@pytest.fixture(scope="module")
def stored_model(bentoml_home) -> str:
    """A model in the test store holding only a reference table: enough for the drift job's lookup."""
    import bentoml

    with bentoml.models.create("drift-synthetic") as model:
        for variant in ("int8", "fp16"):
            synthetic_rows(2000, seed=0).to_parquet(Path(model.path) / reference_file(variant))
    return str(model.tag)


def test_in_distribution_log_passes_and_writes_reports(stored_model, tmp_path, capsys):
    write_log(tmp_path / "log" / "inference-1.jsonl", synthetic_rows(400, seed=1), stored_model)
    code = main(["--log-dir", str(tmp_path / "log"), "--out", str(tmp_path / "reports")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "verdict: no drift" in out and "brightness" in out and "embedding" in out
    html, js = sorted((tmp_path / "reports").glob("drift-*.html")), sorted((tmp_path / "reports").glob("drift-*.json"))
    assert len(html) == 1 and len(js) == 1
    page = html[0].read_text()
    assert "<title>No drift · " in page and 'data-verdict="no drift"' in page
    assert (tmp_path / "reports" / "drift.prom").read_text().count("imgcls_drift_detected{") == 1


def test_brightness_shift_is_drift(stored_model, tmp_path, capsys):
    write_log(tmp_path / "log" / "inference-1.jsonl", synthetic_rows(300, seed=2, brightness_shift=0.1), stored_model)
    code = main(["--log-dir", str(tmp_path / "log"), "--out", str(tmp_path / "reports")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert any(line.startswith("brightness") and line.endswith("YES") for line in out.splitlines()), out
    # The table says which way each score drifts: p-values fall, the embeddings' AUC rises.
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "p <= thr" in rows["brightness"] and "p < thr" in rows["label"] and "AUC > thr" in rows["embedding"]


def test_corrupt_and_truncated_lines_are_skipped_and_counted(stored_model, tmp_path, capsys):
    folder = tmp_path / "log"
    write_log(folder / "inference-a.jsonl", synthetic_rows(150, seed=3), stored_model)
    good = (folder / "inference-a.jsonl").read_bytes().splitlines(keepends=True)
    bad = [
        b"not json at all\n",
        b'{"v":1,"time":"2025-01-01T00:00:00+00:00"}\n',  # fields missing
        good[0].replace(b'"confidence":', b'"confidence":"NaN","x":'),  # non-finite confidence
        b"\x00\x00\x00\x00\n",  # zero-filled block after a crash
        good[1][: len(good[1]) // 2] + b"\n",  # torn in the middle
    ]
    # A second file with the bad lines between good ones, ending in a line cut short by a crash (no newline).
    (folder / "inference-b.jsonl").write_bytes(b"".join(good[2:5] + bad + good[5:7]) + good[7][:40])
    data = read_log(folder)
    assert data.skipped == len(bad) + 1
    assert len(data.frame) == 150 + 5 and data.model == stored_model
    code = main(["--log-dir", str(folder), "--out", str(tmp_path / "reports")])
    out = capsys.readouterr().out
    assert code in (0, 1) and f"{len(bad) + 1} skipped" in out
    assert "were skipped as corrupt or truncated" in next((tmp_path / "reports").glob("drift-*.html")).read_text()


def test_mixed_model_tags_are_refused_unless_one_is_chosen(stored_model, tmp_path, capsys):
    folder = tmp_path / "log"
    write_log(folder / "inference-1.jsonl", synthetic_rows(120, seed=4), stored_model)
    write_log(folder / "inference-2.jsonl", synthetic_rows(50, seed=5), "image-classifier:older")
    with pytest.raises(LogError, match="2 models"):
        read_log(folder)
    code = main(["--log-dir", str(folder), "--out", str(tmp_path / "reports")])
    err = capsys.readouterr().err
    assert code == 2 and "--model" in err and stored_model in err and "image-classifier:older" in err
    assert main(["--log-dir", str(folder), "--out", str(tmp_path / "r2"), "--model", stored_model]) == 0


def test_cannot_judge_without_enough_rows(stored_model, tmp_path, capsys):
    assert main(["--log-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    write_log(tmp_path / "log" / "inference-1.jsonl", synthetic_rows(60, seed=6), stored_model)
    assert main(["--log-dir", str(tmp_path / "log"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "60 current rows" in err and "at least 100" in err
    assert "imgcls_drift_judged" in (tmp_path / "r" / "drift.prom").read_text()


def test_window_since_and_last(stored_model, tmp_path):
    write_log(tmp_path / "log" / "inference-1.jsonl", synthetic_rows(300, seed=7), stored_model)
    assert len(read_log(tmp_path / "log", last=120).frame) == 120
    since = read_log(tmp_path / "log", since=T0 + timedelta(seconds=200))
    assert len(since.frame) == 100 and since.outside_window == 200
    assert parse_since("24h", now=T0) == T0 - timedelta(hours=24)
    assert parse_since("2025-01-01T00:00") == T0
    with pytest.raises(LogError, match="duration"):
        parse_since("yesterday")


def test_files_last_written_before_the_window_are_not_read(stored_model, tmp_path):
    """An hourly run over two weeks of log reads the last hour's files only (a file's mtime is its last line's)."""
    old, new = tmp_path / "log" / "inference-1.jsonl", tmp_path / "log" / "inference-2.jsonl"
    write_log(old, synthetic_rows(100, seed=7), stored_model)  # rows at T0 .. T0 + 99 s
    write_log(new, synthetic_rows(150, seed=8), stored_model, start=T0 + timedelta(hours=1))
    for path, last_row in ((old, T0 + timedelta(seconds=99)), (new, T0 + timedelta(hours=1, seconds=149))):
        stamp = (last_row + timedelta(seconds=1)).timestamp()  # flushed within a second of its last row
        os.utime(path, (stamp, stamp))
    data = read_log(tmp_path / "log", since=T0 + timedelta(minutes=30))
    assert len(data.frame) == 150 and data.files_before_window == 1 and data.lines == 150
    everything = read_log(tmp_path / "log", since=T0 + timedelta(seconds=50))
    assert len(everything.frame) == 200 and everything.outside_window == 50 and everything.files_before_window == 0


def test_unknown_model_in_log_says_where_to_look(bentoml_home, tmp_path, capsys):
    write_log(tmp_path / "log" / "inference-1.jsonl", synthetic_rows(150, seed=8), "image-classifier:nosuchtag")
    assert main(["--log-dir", str(tmp_path / "log"), "--out", str(tmp_path / "r")]) == 2
    assert "not in the BentoML model store" in capsys.readouterr().err


def test_prometheus_file_is_valid(tmp_path):
    reference, current = synthetic_rows(500, seed=9), synthetic_rows(200, seed=10)
    result = drift_report(reference, current, None, DriftConfig())
    path = write_textfile(tmp_path / "drift.prom", registry(result, 'image-classifier:"x"', skipped_lines=3))
    text = path.read_text()
    rendered = render(result, 'image-classifier:"x"', skipped_lines=3)
    assert [ln.split(" ")[0] for ln in rendered.splitlines()] == [ln.split(" ")[0] for ln in text.splitlines()]
    assert 'imgcls_drift_skipped_lines{model="image-classifier:\\"x\\""} 3.0' in text
    assert "imgcls_drift_embedding_score{" in text and 'feature="brightness"' in text and 'feature="ood_score"' in text
    assert [p.name for p in tmp_path.iterdir()] == ["drift.prom"]  # the temp file was renamed, not left behind
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make system-deps installs it)")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def judge_measured(log_dir: Path, out: Path) -> tuple[subprocess.CompletedProcess, float, int]:
    """`python -m drift` on ``log_dir``: its result, its seconds and its peak RSS in bytes."""
    cmd = [sys.executable, "-m", "drift", "--log-dir", str(log_dir), "--out", str(out)]
    started, peak = time.perf_counter(), 0
    with open(out.with_suffix(".out"), "w+") as stdout, open(out.with_suffix(".err"), "w+") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=stdout, stderr=stderr, text=True)
        while proc.poll() is None and time.perf_counter() - started < 600:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, psutil.Process(proc.pid).memory_info().rss)
            time.sleep(0.05)
        proc.wait(timeout=10)
        stdout.seek(0), stderr.seek(0)
        done = subprocess.CompletedProcess(cmd, proc.returncode, stdout.read(), stderr.read())
    return done, time.perf_counter() - started, peak


def replicated_log(folder: Path, model: str, copies: int) -> Path:
    """``copies`` x 10,000 lines of one model's log (its rows repeated, as the job reads them)."""
    seed = folder / "seed.jsonl"
    write_log(seed, synthetic_rows(10_000, seed=12), model)
    lines = seed.read_bytes()
    (folder / "log").mkdir()
    with open(folder / "log" / "inference-1.jsonl", "wb") as f:
        for _ in range(copies):
            f.write(lines)
    return folder / "log"


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("lines", [100_000, 1_000_000])
def test_a_large_log_is_judged_in_the_memory_of_a_sample(stored_model, tmp_path, lines):
    """An hour of traffic at about 280 req/s is a million log lines (580 MB here), read as a stream and judged on
    a sample of 20,000 rows, said so. The memory is asserted (the CronJob's limit depends on it); the time is
    printed (docs/drift.md has both)."""
    proc, elapsed, peak = judge_measured(replicated_log(tmp_path, stored_model, lines // 10_000), tmp_path / "r")
    print(f"python -m drift on {lines:,} log lines: {elapsed:.1f} s, peak RSS {peak / 2**20:.0f} MB")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{lines:,} lines" in proc.stdout and f"sampled: 20,000 of {lines:,} rows" in proc.stdout
    assert f"sampled: 20,000 of {lines:,} rows" in next((tmp_path / "r").glob("drift-*.html")).read_text()
    assert peak < 2**30


def test_load_test_and_simulated_traffic_stay_out_of_the_window_unless_asked(stored_model, tmp_path, capsys):
    """Right after a load test, the production window is judged on production traffic only."""
    folder = tmp_path / "log"
    write_log(folder / "inference-1.jsonl", synthetic_rows(300, seed=20), stored_model)
    shifted = synthetic_rows(300, seed=21, brightness_shift=0.15)
    write_log(folder / "inference-2.jsonl", shifted, stored_model, source="loadtest")
    assert main(["--log-dir", str(folder), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "300 of other traffic sources" in out and "verdict: no drift" in out
    assert "300 rows of other traffic sources were left out: loadtest 300." in out  # not the judged one, no dict
    assert "Evidently's rule (drift when at least 50% of the columns moved): 0% moved, not met" in out
    assert main(["--log-dir", str(folder), "--out", str(tmp_path / "b"), "--source", "loadtest"]) == 1
    assert main(["--log-dir", str(folder), "--out", str(tmp_path / "c"), "--all-sources"]) == 1
    assert main(["--log-dir", str(folder), "--out", str(tmp_path / "d"), "--source", "nobody"]) == 2
    assert "sources found: production (300), loadtest (300)" in capsys.readouterr().err


def test_each_variant_is_judged_against_its_own_reference(stored_model, tmp_path, capsys):
    folder = tmp_path / "log"
    write_log(folder / "inference-1.jsonl", synthetic_rows(200, seed=22), stored_model, variant="int8")
    write_log(folder / "inference-2.jsonl", synthetic_rows(200, seed=23), stored_model, variant="fp16")
    assert main(["--log-dir", str(folder), "--out", str(tmp_path / "a")]) == 2
    assert "--variant" in capsys.readouterr().err
    assert main(["--log-dir", str(folder), "--out", str(tmp_path / "b"), "--variant", "fp16"]) == 0
    assert "(fp16)" in next((tmp_path / "b").glob("drift-*.html")).read_text()


def test_a_wrong_command_line_is_no_monitoring_event(stored_model, tmp_path, capsys):
    """A typo in --since exits 64 and writes no report, history line or Prometheus file."""
    folder = tmp_path / "log"
    write_log(folder / "inference-1.jsonl", synthetic_rows(50, seed=24), stored_model)
    with pytest.raises(SystemExit) as exited:
        main(["--log-dir", str(folder), "--out", str(tmp_path / "out"), "--since", "yesterday"])
    assert exited.value.code == 64 and not (tmp_path / "out").exists()
    assert "--since: is neither an ISO 8601 time" in capsys.readouterr().err


def test_help_lists_the_exit_codes_and_the_default_log_folder(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out and "0  no drift" in out and "2  cannot judge" in out and "64 the command" in out
    assert "inference_log" in out
