"""The inference log: whole lines, per-process files, rotation, flush on close and within a second."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from service.imagestats import STAT_FIELDS
from service.inference_log import InferenceLogWriter, encode, log_files, make_record, parse_line


def record(i: int) -> dict:
    stats = dict.fromkeys(STAT_FIELDS, 0.5)
    return make_record(f"req-{i}", "image-classifier:abc", "circle", 0.9, stats, [0.1] * 16)


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


WRITER_SCRIPT = """
import sys, time
from service.inference_log import InferenceLogWriter, make_record
from service.imagestats import STAT_FIELDS
w = InferenceLogWriter(sys.argv[1], flush_interval=0.1, max_bytes=20000)
i = 0
while True:
    w.write(make_record(f"{sys.argv[2]}-{i}", "m:1", "a", 0.5, dict.fromkeys(STAT_FIELDS, 1.0), [0.0] * 8))
    i += 1
    if i % 50 == 0:
        time.sleep(0.01)
"""


def test_concurrent_writers_killed_hard_leave_only_whole_lines(tmp_path):
    """Four processes write at once and are SIGKILLed: no torn line, and each lost at most ~its last flush."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
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
