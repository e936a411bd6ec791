"""Smoke runs of `python -m loadtest.run` against the real service and the FastAPI baseline (short, few users)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SHORT = ["--step-duration", "5", "--step-settle", "1", "--warmup", "2"]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loadtest.run", *args], cwd=ROOT, capture_output=True, text=True, timeout=240
    )


def test_runner_starts_service_and_baseline_measures_both_and_passes_a_lax_gate(tiny_model, tmp_path):
    out = tmp_path / "bench"
    proc = run_bench(
        "--model", tiny_model, "--device", "cpu", "--compare", "--scenario", "mix", "--steps", "1,2", *SHORT,
        "--image-mix", "web_jpeg=4,phone_jpeg=1,png=1,webp=1", "--bad-input-share", "0.05",
        "--latency-objective-ms", "10000", "--out", str(out),
        "--batch-share", "0.3", "--locust-arg=--image-pool=2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "SLO gate: passed" in proc.stdout
    assert "| **service / baseline at p99 <=" in proc.stdout  # the ready-to-paste comparison table

    for name in ("results.json", "results.md", "latency_vs_throughput.png"):
        assert (out / name).stat().st_size > 0, name
    for target in ("service", "baseline"):
        for step in ("step-01-1u", "step-02-2u"):  # a Locust run per step and target
            for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_report.html", "steps.json"):
                assert (out / target / step / name).stat().st_size > 0, f"{target}/{step}/{name}"

    result = json.loads((out / "results.json").read_text())
    assert result["gate"] == {"passed": True, "reasons": []}
    cmp = result["comparison"]
    assert cmp["baseline_p99_ms"] > 0
    # No ratio only when no service step came in at or under the baseline's p99 (possible on so short a run).
    assert (cmp["throughput_ratio"] is None) == (cmp["service_users"] is None)
    assert cmp["throughput_ratio"] is None or cmp["throughput_ratio"] > 0
    for target in ("service", "baseline"):
        steps = result["targets"][target]["steps"]
        assert [s["users"] for s in steps] == [1, 2]
        assert all(s["requests"] > 0 and s["p99_ms"] is not None for s in steps)
        assert all(s["server_cpu_ms_per_request"] > 0 for s in steps), steps  # the runner started both
        # Every answer validated: good images classified correctly, bad inputs refused with a 4xx.
        assert sum(s["failures"] for s in steps) == 0, json.dumps(steps, indent=1)
        names = {n for s in steps for n in s["per_name"]}
        assert "POST /classify [bad input]" in names and "POST /classify_batch [4 images]" in names, names
    # Both servers up, the two targets in turn at each step, the order reversed from one step to the next.
    (s1, s2), (b1, b2) = (result["targets"][t]["steps"] for t in ("service", "baseline"))
    in_turn = [s1, b1, b2, s2]
    assert all(a["window"][1] <= b["window"][0] for a, b in itertools.pairwise(in_turn)), in_turn
    assert "| 2 | " in proc.stdout.split("Step by step")[1]  # the step-by-step table with its ratios
    metrics = result["targets"]["service"]["metrics"]
    assert metrics["available"] and metrics["mean_batch_size"] >= 1
    assert metrics["rejected_total"] > 0  # the bad inputs, counted by the service itself
    assert metrics["model_info"]["variant"] == "int8"  # the CPU default, as the service reports it

    # A new user's next step, `python -m drift --since 1m`, judges production traffic only: the load test's rows
    # are marked as such, so it reports that there is nothing to judge (2), never drift (1).
    drift = subprocess.run(
        [sys.executable, "-m", "drift", "--log-dir", str(out / "service" / "inference_log"), "--since", "1m",
         "--out", str(tmp_path / "drift")],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert drift.returncode == 2, drift.stdout[-2000:] + drift.stderr[-2000:]
    assert "no valid rows of production" in drift.stderr and "sources found: loadtest" in drift.stderr


def test_runner_exits_non_zero_when_the_gate_cannot_be_met(server, tmp_path):
    out = tmp_path / "bench"
    proc = run_bench(
        "--host", server.url, "--scenario", "compare", "--steps", "2", *SHORT, "--latency-objective-ms", "10000",
        "--max-error-rate", "1", "--min-rps", "1e9", "--out", str(out),  # only the throughput floor can fail
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SLO gate: FAILED" in proc.stdout and "below --min-rps" in proc.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["gate"]["passed"] is False
    assert result["targets"]["service"]["headline"]["requests"] > 0  # measured, just not fast enough
