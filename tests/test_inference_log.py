"""The inference log: whole lines, per-process files, rotation, flush on close and within a second."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from imgcls import inference_log
from imgcls.imagestats import STAT_FIELDS
from imgcls.inference_log import (
    THUMBNAIL_DIR,
    InferenceLogWriter,
    default_log_dir,
    encode,
    ensure_writable,
    log_files,
    make_record,
    parse_line,
    thumbnail_files,
    thumbnail_name,
)
from tests.helpers import ROOT


def record(i: int, source: str = "production") -> dict:
    stats = dict.fromkeys(STAT_FIELDS, 0.5)
    return make_record(f"req-{i}", "image-classifier:abc", "int8", "circle", 0.9, 3.2, False, stats, [0.1] * 16, source)


def read_all(folder: Path) -> list[dict]:
    lines = [line for f in log_files(folder) for line in f.read_bytes().splitlines()]
    parsed = [parse_line(line) for line in lines]
    assert None not in parsed, "every line must be whole and valid"
    return parsed


def test_record_round_trips_and_bad_lines_are_rejected():
    line = encode(record(1))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_line(line)["request_id"] == "req-1"
    assert parse_line(line[: len(line) // 2]) is None
    assert parse_line(b'{"time": "x"}') is None
    broken = json.loads(line)
    broken["confidence"] = "high"
    assert parse_line(json.dumps(broken)) is None
    future = {**json.loads(line), "v": 99}
    assert parse_line(json.dumps(future)) is None, "a version this code does not know is not guessed at"
    good = json.loads(line)
    for field, value in [("time", "9999-01-01T00:00:00+00:00"), ("time", "2026-01-01T00:00:00"),
                         ("model", ["a", "b"]), ("label", 3), ("embedding", "0.1"), ("embedding", []),
                         ("unfamiliar", "yes"), ("variant", {"x": 1})]:  # fmt: skip
        assert parse_line(json.dumps({**good, field: value})) is None, f"{field}={value!r} was accepted"
    assert parse_line(b"[" * 100_000) is None  # too deeply nested for the parser: a bad line, not a crash


def test_version_1_lines_still_read_as_production_traffic():
    v1 = {k: v for k, v in json.loads(encode(record(1))).items() if k not in ("source", "variant", "ood_score")}
    v1.pop("unfamiliar")
    parsed = parse_line(json.dumps({**v1, "v": 1}))
    assert parsed["source"] == "production" and parsed["variant"] is None and parsed["ood_score"] is None


def test_the_log_folder_defaults_to_one_absolute_place_for_every_process(tmp_path):
    assert default_log_dir({"IMGCLS_LOG_DIR": "rel/logs"}) == Path.cwd() / "rel" / "logs"
    assert default_log_dir({"BENTOML_HOME": str(tmp_path)}) == tmp_path / "inference_log"
    assert default_log_dir({}) == Path.home() / "bentoml" / "inference_log"


def test_close_flushes_everything(tmp_path):
    writer = InferenceLogWriter(tmp_path, flush_interval=30)
    for i in range(500):
        writer.write(record(i))
    writer.close()
    assert [r["request_id"] for r in read_all(tmp_path)] == [f"req-{i}" for i in range(500)]


def test_records_reach_disk_within_the_flush_interval(tmp_path):
    writer = InferenceLogWriter(tmp_path, flush_interval=0.2)
    writer.write(record(0))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not log_files(tmp_path):
        time.sleep(0.05)
    time.sleep(0.3)
    assert len(read_all(tmp_path)) == 1
    writer.close()


def test_rotation_by_size_keeps_every_record(tmp_path):
    writer = InferenceLogWriter(tmp_path, max_bytes=4096, flush_interval=0.05)
    for i in range(200):
        writer.write(record(i))
        if i % 20 == 0:
            time.sleep(0.1)
    writer.close()
    assert len(log_files(tmp_path)) > 3
    assert sorted(int(r["request_id"][4:]) for r in read_all(tmp_path)) == list(range(200))


def test_retention_deletes_the_oldest_files_but_never_one_being_written(tmp_path):
    writer = InferenceLogWriter(tmp_path, max_bytes=2048, max_total_bytes=8192, flush_interval=0.02)
    for i in range(400):
        writer.write(record(i))
        if i % 10 == 0:
            time.sleep(0.03)
    writer.close()
    files = log_files(tmp_path)
    assert sum(f.stat().st_size for f in files) <= 8192 + 2 * 2048
    kept = sorted(int(r["request_id"][4:]) for r in read_all(tmp_path))
    assert kept[-1] == 399 and kept == list(range(kept[0], 400)), "the newest records are kept, without gaps"


def test_thumbnails_of_unfamiliar_images_are_saved_small(tmp_path):
    writer = InferenceLogWriter(tmp_path, flush_interval=0.05)
    writer.write(record(7), thumbnail=np.full((224, 224, 3), 128, np.uint8))
    writer.close()
    (thumb,) = (tmp_path / THUMBNAIL_DIR).glob("*.jpg")
    assert thumb.name == "req-7.jpg" and thumb.stat().st_size < 5000


def test_thumbnails_are_a_sample_of_a_few_a_second(tmp_path, monkeypatch):
    clock = [1000.0]  # the writer's monotonic clock, moved by hand
    monkeypatch.setattr(inference_log, "_time", SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    writer = InferenceLogWriter(tmp_path, flush_interval=0.05, thumbnails_per_s=2)
    pixels = np.full((64, 64, 3), 128, np.uint8)
    for i in range(10):  # at once: the first two get thumbnails
        writer.write(record(i), thumbnail=pixels)
    clock[0] += 0.5  # one more token
    writer.write(record(10), thumbnail=pixels)
    writer.write(record(11), thumbnail=pixels)
    writer.close()
    saved = sorted(p.name for p in (tmp_path / THUMBNAIL_DIR).glob("*.jpg"))
    assert saved == ["req-0.jpg", "req-1.jpg", "req-10.jpg"]
    assert len(read_all(tmp_path)) == 12  # every record is logged

    none = InferenceLogWriter(tmp_path / "none", flush_interval=0.05, thumbnails_per_s=0)
    none.write(record(20), thumbnail=pixels)
    none.close()
    assert not (tmp_path / "none" / THUMBNAIL_DIR).exists() and len(read_all(tmp_path / "none")) == 1


def test_per_pod_subfolders_are_found(tmp_path):
    """Log files and thumbnails of every pod's folder are found, by the name the reader derives from the record."""
    pixels = np.zeros((32, 32, 3), np.uint8)
    for pod in ("pod-a", "pod-b"):
        writer = InferenceLogWriter(tmp_path / pod, flush_interval=0.05)
        writer.write(record(1))
        # A /classify_batch image's request id has a slash, which cannot be in a file name.
        writer.write({**record(2), "request_id": f"{pod}/3"}, thumbnail=pixels)
        writer.close()
    assert {f.parent.name for f in log_files(tmp_path)} == {"pod-a", "pod-b"}
    found = thumbnail_files(tmp_path)
    assert {found[thumbnail_name(f"{pod}/3")].parent.parent.name for pod in ("pod-a", "pod-b")} == {"pod-a", "pod-b"}


WRITER_SCRIPT = """
import sys, time
from imgcls.inference_log import InferenceLogWriter, make_record
from imgcls.imagestats import STAT_FIELDS
w = InferenceLogWriter(sys.argv[1], flush_interval=0.1, max_bytes=20000)
stats, i = dict.fromkeys(STAT_FIELDS, 1.0), 0
while True:
    w.write(make_record(f"{sys.argv[2]}-{i}", "m:1", "int8", "a", 0.5, 1.0, False, stats, [0.0] * 8))
    i += 1
    if i % 50 == 0:
        time.sleep(0.01)
"""


def test_concurrent_writers_killed_hard_leave_only_whole_lines(tmp_path):
    """Four processes write at once and are SIGKILLed: no torn line, and each lost at most ~its last flush."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(tmp_path), f"p{n}"], env=env) for n in range(4)]
    time.sleep(3)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    records = read_all(tmp_path)
    assert len({f.name.rsplit("-", 1)[1] for f in log_files(tmp_path)}) == 4, "one file family per process"
    for n in range(4):
        ids = sorted(int(r["request_id"].split("-")[1]) for r in records if r["request_id"].startswith(f"p{n}-"))
        assert ids and ids == list(range(len(ids))), "a process's records are a gap-free prefix"


def test_an_unwritable_log_folder_is_refused_with_what_to_do(tmp_path, monkeypatch):
    """(Tests run as root, who may write anywhere, so the permission check is simulated here; the container test
    runs the real thing as the image's user.)"""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="not writable.*chown"):
        ensure_writable(tmp_path / "log")


def test_a_write_that_fails_part_way_is_cut_back_and_its_records_counted(tmp_path, monkeypatch):
    """A full disk mid-write: the partial batch is cut off the file, each of its records counted as lost, and the
    next batch starts on a line of its own."""
    lost, real_write, fail = [], os.write, [True]

    def write_half_then_fail(fd, data):
        if fail[0]:
            fail[0] = False
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    writer = InferenceLogWriter(tmp_path, flush_interval=60, on_drop=lost.append)
    writer.write(record(0))
    writer._drain()  # a whole first batch
    monkeypatch.setattr(inference_log.os, "write", write_half_then_fail)
    for i in range(1, 6):
        writer.write(record(i))
    writer._drain()  # fails half-way
    writer.write(record(6))
    writer.close()
    assert lost == [5]
    lines = [line for f in log_files(tmp_path) for line in f.read_bytes().splitlines(keepends=True)]
    assert all(parse_line(line) is not None and line.endswith(b"\n") for line in lines)
    assert sorted(r["request_id"] for r in read_all(tmp_path)) == ["req-0", "req-6"]


def test_old_files_are_pruned_on_a_timer_even_while_one_is_still_written(tmp_path, monkeypatch):
    """With an age limit the writer rotates its file every tenth of it and prunes by age once a minute (here a
    tenth of a second), not only when a file is opened, so no record outlives the limit by much."""
    monkeypatch.setattr(inference_log, "RETENTION_EVERY_S", 0.1)
    writer = InferenceLogWriter(tmp_path, max_age_s=1.0, flush_interval=0.02)
    started = time.monotonic()
    i = 0
    while time.monotonic() - started < 3:
        writer.write(record(i))
        i += 1
        time.sleep(0.01)
    ages = [time.time() - f.stat().st_mtime for f in log_files(tmp_path)]
    oldest = min(int(r["request_id"][4:]) for r in read_all(tmp_path))
    writer.close()
    assert max(ages) < 1.0 + 0.5 and oldest > 0  # the first records are gone while the writer kept writing


def test_files_of_processes_that_are_gone_are_not_protected(tmp_path):
    dead = next(pid for pid in range(4_000_000, 4_200_000, 1000) if not _alive(pid))
    stale = tmp_path / f"inference-20250101T000000-{dead}.jsonl"
    stale.write_bytes(b"\n" * 4096)
    writer = InferenceLogWriter(tmp_path, max_total_bytes=2048, flush_interval=0.02)
    writer.write(record(0))
    writer.close()
    assert not stale.exists() and len(read_all(tmp_path)) == 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
