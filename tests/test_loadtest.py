"""Fast tests of the load-test harness: step plan, per-step statistics, SLO headline, gate, image mix, checks."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from loadtest import images, promscrape, report, scenarios
from loadtest.stepstats import (
    DEFAULTS,
    Snapshot,
    StepPlan,
    headline,
    meets_slo,
    percentile,
    step_result,
    step_schedule,
)
from tests.helpers import ROOT


def test_step_schedule_lists_and_geometric_ranges():
    assert step_schedule("1,2,4,8") == [1, 2, 4, 8]
    assert step_schedule("2..64x2") == [2, 4, 8, 16, 32, 64]
    assert step_schedule("4..20x1.5") == [4, 6, 9, 14, 20]
    for bad in ("", "0,2", "a,b", "8..2", "2..64x1"):
        with pytest.raises(ValueError):
            step_schedule(bad)


def test_step_percentiles_count_only_that_steps_requests():
    # 100 fast requests before the window, then 98 at 10 ms and 2 at 500 ms inside it.
    before = Snapshot(t=10.0, requests=100, failures=0, response_times={5: 100}, per_name={"POST /a": (100, 0)})
    after = Snapshot(
        t=20.0, requests=200, failures=1, response_times={5: 100, 10: 98, 500: 2}, per_name={"POST /a": (200, 1)}
    )
    step = step_result(8, before, after)
    assert (step.users, step.requests, step.failures, step.rps) == (8, 100, 1, 10.0)
    assert step.p50_ms == 10 and step.p95_ms == 10 and step.p99_ms == 500 and step.max_ms == 500
    assert step.error_rate == 0.01
    assert step.per_name == {"POST /a": {"requests": 100, "failures": 1}}
    assert percentile({}, 0.99) is None


def test_headline_is_fastest_step_within_slo_and_error_budget():
    steps = [
        {"users": 1, "requests": 100, "rps": 50.0, "p99_ms": 20.0, "error_rate": 0.0},
        {"users": 4, "requests": 400, "rps": 180.0, "p99_ms": 150.0, "error_rate": 0.0},
        {"users": 8, "requests": 500, "rps": 210.0, "p99_ms": 190.0, "error_rate": 0.01},  # too many errors
        {"users": 16, "requests": 520, "rps": 215.0, "p99_ms": 400.0, "error_rate": 0.0},  # too slow
    ]
    assert headline(steps, 200.0, 0.001)["users"] == 4
    assert headline(steps, 10.0, 0.001) is None
    assert not meets_slo({"requests": 0, "rps": 0.0, "p99_ms": None, "error_rate": 0.0}, 200.0, 0.001)


class _FakeStats:
    """Cumulative totals and a response-time histogram, like Locust's aggregated stats entry."""

    def __init__(self):
        self.requests, self.hist, self.resets = 0, {}, 0

    def record(self, count: int, ms: int) -> None:
        self.requests += count
        self.hist[ms] = self.hist.get(ms, 0) + count

    def reset(self) -> None:
        self.resets += 1
        self.requests, self.hist = 0, {}


def test_step_plan_warms_up_measures_each_step_and_stops_when_slo_breaks():
    clock = {"t": 0.0}
    stats = _FakeStats()
    plan = StepPlan([1, 2, 4, 8, 16], warmup=5, duration=10, settle=2, latency_objective_ms=50.0, break_steps=1)
    snapshot = lambda: Snapshot(clock["t"], stats.requests, 0, dict(stats.hist))  # noqa: E731
    seen, wanted = [], []
    while clock["t"] < 200:
        users = plan.tick(clock["t"], snapshot, stats.reset, lambda i, r, ok: seen.append((i, r.users, ok)))
        wanted.append(users)
        if users is None:
            break
        stats.record(50 * users, 10 * users)  # this second: 50 req/s per user, latency 10 ms per user
        clock["t"] += 1.0
    assert wanted[:5] == [1] * 5 and wanted[-1] is None  # warm-up at the first step's users, then the end
    assert stats.resets == 1  # reset once, when the warm-up ended
    assert seen == [(0, 1, True), (1, 2, True), (2, 4, True), (3, 8, False)]  # stopped at the first break
    assert [s.p99_ms for s in plan.results] == [10, 20, 40, 80]  # each step's own latency, not cumulative
    assert [s.rps for s in plan.results] == [50, 100, 200, 400]  # 8 measured seconds per step
    assert [s.requests for s in plan.results] == [400, 800, 1600, 3200]
    assert headline([s.to_dict() for s in plan.results], 50.0, 0.001)["users"] == 4


def test_step_plan_runs_every_step_when_told_not_to_stop():
    plan = StepPlan([1, 2], warmup=0, duration=4, settle=1, latency_objective_ms=1.0, break_steps=0)
    snap = lambda: Snapshot(0.0, 0, 0, {})  # noqa: E731
    assert [plan.tick(float(t), snap, lambda: None) for t in range(10)] == [1, 1, 1, 1, 2, 2, 2, 2, None, None]
    assert [s.users for s in plan.results] == [1, 2]


def test_without_steps_locust_runs_its_own_constant_load_with_no_shape(tmp_path):
    """`locust -f loadtest -u 2 -t 3s`: Locust's own load, not the step shape (which would ignore -u and -t)."""
    cmd = [sys.executable, "-m", "locust", "-f", "loadtest", "--headless", "-u", "2", "-r", "2", "-t", "3s",
           "--host", "http://127.0.0.1:9", "--only-summary", "--loglevel", "INFO", "--image-pool", "1"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    log = out.stdout + out.stderr
    assert "Shape test starting" not in log and "Ramping to 2 users" in log, log[-2000:]


def test_step_defaults_are_defined_once_and_shown_by_the_runners_help():
    """(Locust prints --help before it loads a locustfile, so its web UI is where the custom defaults show.)"""
    runner = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    ).stdout
    assert "--latency-objective-ms" in runner
    for value in (DEFAULTS.latency_objective_ms, DEFAULTS.step_duration, DEFAULTS.warmup, DEFAULTS.steps):
        assert f"(default: {value})" in " ".join(runner.split()), value
    assert StepPlan([1]).duration == DEFAULTS.step_duration and StepPlan([1]).warmup == DEFAULTS.warmup
    flat = " ".join(runner.split())
    assert "(default: )" not in flat and "(default: None)" not in flat and "-1.0" not in flat and "{," not in flat
    assert "exit status: 0 the gate passed; 1 it failed" in flat


@pytest.mark.parametrize(
    ("kind", "fmt", "size"),
    [("web_jpeg", "JPEG", None), ("jpeg_500x375", "JPEG", (500, 375)), ("phone_jpeg", "JPEG", (4032, 3024)),
     ("png", "PNG", (800, 600)), ("webp", "WEBP", (1024, 768))],
)  # fmt: skip
def test_generated_images_have_the_promised_format_and_size(kind, fmt, size):
    img = images.KINDS[kind](np.random.default_rng(0))
    opened = Image.open(io.BytesIO(img.data))
    assert opened.format == fmt and opened.size == img.size
    if size:
        assert opened.size == size
    else:
        assert 320 * 240 <= opened.size[0] * opened.size[1] <= 1024 * 768
    if kind == "phone_jpeg":
        assert 1_000_000 < len(img.data) < 10 * 2**20  # photo-like: MBs, yet under the service's 10 MiB limit


def test_image_mix_parses_weights_and_draws_every_kind():
    assert images.parse_mix("web_jpeg=3, png=1,webp=0") == {"web_jpeg": 3.0, "png": 1.0}
    for bad in ("gif=1", "web_jpeg=x", "png=0", "png=-1"):
        with pytest.raises(ValueError):
            images.parse_mix(bad)
    mix = images.ImageMix(images.parse_mix("jpeg_500x375=1,webp=1"), per_kind=2)
    assert {mix.pick().kind for _ in range(200)} == {"jpeg_500x375", "webp"}


def _pred(**over):
    pred = {"label": "cat", "score": 0.7, "top_k": [{"label": "cat", "score": 0.7}, {"label": "dog", "score": 0.2}]}
    return {**pred, **over}


def test_response_checks_catch_what_a_broken_service_would_send():
    labels = frozenset({"cat", "dog"})
    assert scenarios.check_prediction(_pred(), labels, 5) is None
    assert "not one of" in scenarios.check_prediction(_pred(label="bird"), labels, 5)
    assert "[0, 1]" in scenarios.check_prediction(_pred(score=1.5), labels, 5)
    unsorted = [{"label": "dog", "score": 0.2}, {"label": "cat", "score": 0.7}]
    assert "descending" in scenarios.check_prediction(_pred(label="dog", score=0.2, top_k=unsorted), labels, 5)
    assert "entries" in scenarios.check_prediction(_pred(), labels, 1)  # more than top_k returned
    assert "top label" in scenarios.check_prediction(_pred(label="dog", score=0.2), labels, 5)
    body = json.dumps({**_pred(), "model": "m:1", "request_id": "r"}).encode()
    assert scenarios.check_single(body, labels, 5) is None
    assert "model" in scenarios.check_single(json.dumps(_pred()).encode(), labels, 5)
    assert scenarios.check_batch(json.dumps({"results": [_pred(), _pred()]}).encode(), labels, 5, 2) is None
    assert "expected 2" in scenarios.check_batch(json.dumps({"results": [_pred()]}).encode(), labels, 5, 2)


def test_labels_from_model_folder_file_or_list(tmp_path):
    (tmp_path / "labels.json").write_text('["a", "b"]')
    assert scenarios.load_labels(str(tmp_path)) == {"a", "b"}
    assert scenarios.load_labels(str(tmp_path / "labels.json")) == {"a", "b"}
    assert scenarios.load_labels("x, y") == {"x", "y"}
    assert scenarios.load_labels("") is None
    with pytest.raises(ValueError):
        scenarios.load_labels(str(tmp_path / "missing.json"))


def test_multipart_body_is_parsed_by_a_real_multipart_parser():
    from python_multipart import MultipartParser  # what Starlette and BentoML parse uploads with

    img = images.jpeg_500x375(np.random.default_rng(0))
    payload = scenarios.single_payload(img, 3)
    boundary = payload.content_type.split("boundary=")[1]
    parts = {}
    parser = MultipartParser(
        boundary,
        callbacks={
            "on_part_begin": lambda: parts.setdefault("_cur", bytearray()).clear(),
            "on_part_data": lambda data, start, end: parts["_cur"].extend(data[start:end]),
            "on_part_end": lambda: parts.setdefault("bodies", []).append(bytes(parts["_cur"])),
        },
    )
    parser.write(payload.body)
    assert parts["bodies"] == [img.data, b"3"]


METRICS_BEFORE = """# TYPE imgcls_batch_size histogram
imgcls_batch_size_bucket{le="1.0"} 2
imgcls_batch_size_bucket{le="+Inf"} 2
imgcls_batch_size_count 2
imgcls_batch_size_sum 2
# TYPE imgcls_rejected counter
imgcls_rejected_total{reason="empty_image"} 1
"""
METRICS_AFTER = """# TYPE imgcls_batch_size histogram
imgcls_batch_size_bucket{le="1.0"} 2
imgcls_batch_size_bucket{le="+Inf"} 12
imgcls_batch_size_count 12
imgcls_batch_size_sum 42
# TYPE imgcls_rejected counter
imgcls_rejected_total{reason="empty_image"} 4
imgcls_rejected_total{reason="undecodable_image"} 2
# TYPE imgcls_model_info gauge
imgcls_model_info{model="m:1",variant="int8",provider="CPUExecutionProvider"} 1
"""


def test_metrics_summary_reports_mean_batch_size_and_rejections_during_the_test():
    summary = promscrape.summarize(promscrape.parse(METRICS_BEFORE), promscrape.parse(METRICS_AFTER))
    assert summary["batch_metric"] == "imgcls_batch_size"
    assert summary["batches"] == 10 and summary["mean_batch_size"] == 4.0
    assert summary["rejected_inputs"] == {"empty_image": 3, "undecodable_image": 2}
    assert summary["rejected_total"] == 5
    assert summary["model_info"] == {"model": "m:1", "variant": "int8", "provider": "CPUExecutionProvider"}
    assert promscrape.summarize(None, None) == {"available": False}


def _target(label, rps, p99):
    step = {"users": 4, "requests": 1000, "rps": rps, "p50_ms": p99 / 3, "p95_ms": p99 / 1.5, "p99_ms": p99,
            "error_rate": 0.0, "max_ms": p99}  # fmt: skip
    return {"label": label, "steps": [step], "headline": step, "metrics": {"available": False}}


def test_gate_and_comparison_table():
    result = {
        "command": "python -m loadtest.run --compare",
        "machine": report.machine_info(),
        "settings": {
            "scenario": "compare",
            "image_mix": "jpeg_500x375=1",
            "batch_share": 0.0,
            "bad_input_share": 0.0,
            "latency_objective_ms": 200.0,
            "max_error_rate": 0.001,
            "step_duration": 40,
            "step_settle": 10,
            "model": "m:1",
        },  # fmt: skip
        "targets": {"service": _target("service", 300.0, 120.0), "baseline": _target("baseline", 100.0, 150.0)},
    }
    result["targets"]["service"]["steps"].append(
        {**result["targets"]["service"]["steps"][0], "rps": 400.0, "p99_ms": 180}
    )
    result["comparison"] = report.comparison(
        result["targets"]["service"]["steps"], result["targets"]["baseline"]["headline"], 0.001
    )  # 400 req/s came at a p99 above the baseline's 150 ms, so it does not count
    assert result["comparison"]["throughput_ratio"] == 3.0
    assert report.gate(result, 200.0, 0.001, 0, 0)["passed"]
    assert not report.gate(result, 200.0, 0.001, 1e9, 0)["passed"]
    assert not report.gate(result, 200.0, 0.001, 0, 4.0)["passed"]
    result["targets"]["service"]["headline"] = None
    assert "no step met" in report.gate(result, 200.0, 0.001, 0, 0)["reasons"][0]
    result["targets"]["service"]["headline"] = result["targets"]["service"]["steps"][0]
    result["targets"]["service"]["steps"].append({**result["targets"]["service"]["steps"][0], "users": 8})
    table = report.markdown(result)
    assert "| **service / baseline at p99 <= 150 ms** | **3.00x** | 4 |" in table
    # Step by step: each service step beside the baseline's at the same users; "-" where the baseline had stopped.
    assert "| 4 | 300.0 | 40 / 120 | - | 100.0 | 50 / 150 | - | 3.00x |" in table
    assert "| 8 | 300.0 | 40 / 120 | - | - | - | - | - |" in table


def test_locust_finds_the_users_and_the_shape_in_the_folder():
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest", "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "ImageUser" in out.stdout


def test_server_cpu_per_request_is_read_over_each_steps_own_window():
    from loadtest.run import cpu_per_request

    samples = [(100.0 + t, 0.5 * t) for t in range(21)]  # half a CPU second per second
    step = {"requests": 250, "window": (105.0, 110.0)}
    assert cpu_per_request(step, samples) == pytest.approx(10.0)  # 2.5 CPU s over 250 requests
    assert cpu_per_request({**step, "window": (95.0, 110.0)}, samples) is None  # not covered by the samples
    assert cpu_per_request({**step, "requests": 0}, samples) is None
