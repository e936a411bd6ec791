"""Monitoring: the Prometheus rules (promtool), and the dashboard's queries against a real Prometheus."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from loadtest.servers import free_port
from loadtest.stepstats import DEFAULTS
from monitoring.monitor import PAGES, answers
from tests.helpers import ROOT

MONITORING = ROOT / "monitoring"
RULES = MONITORING / "rules.yml"
RULE_TESTS = sorted((MONITORING / "tests").glob("*.yml"))


def promtool() -> str:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: `make system-deps` installs Debian's prometheus package"
    return binary


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def alerts() -> list[dict]:
    return [rule for rule in rules() if "alert" in rule]


def test_rules_file_is_valid():
    check = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_rules_unit_tests_pass():
    assert RULE_TESTS, "no promtool tests in monitoring/tests"
    run = subprocess.run([promtool(), "test", "rules", *map(str, RULE_TESTS)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_tells_the_on_call_engineer_what_to_do():
    for rule in alerts():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert "Look first at" in rule["annotations"]["description"], rule["alert"]


def test_every_alert_has_tests_that_must_fire_and_must_not_fire():
    fired, silent = set(), set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - fired == set(), "alerts without a test that makes them fire"
    assert names - silent == set(), "alerts without a test that keeps them silent"


def test_latency_objective_matches_the_load_test_gate():
    (slo,) = [rule["expr"] for rule in rules() if rule.get("record") == "imgcls:slo_p99_latency_seconds"]
    assert float(slo.removeprefix("vector(").removesuffix(")")) == DEFAULTS.latency_objective_ms / 1000


DASHBOARD = MONITORING / "grafana" / "dashboard.json"
LOAD_SECONDS = 15


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query on the dashboard, rows' panels included."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    panels += [inner for row in panels for inner in row.get("panels", [])]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Every metric an expression reads, through the recording rules it uses."""
    records = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    names, todo = set(), [expr]
    while todo:
        for token in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", todo.pop()):
            if token in records and token not in names:
                todo.append(records[token])
            names.add(token)
    return names


def test_dashboard_queries_use_existing_recording_rules_and_no_grafana_variables():
    targets = dashboard_targets()
    assert targets
    for title, expr in targets:
        assert "$" not in expr, f"{title}: Grafana variables cannot be checked against Prometheus: {expr}"
    # Every recording rule the dashboard names exists (a typo would only show as an empty panel).
    records = {rule["record"] for rule in rules() if "record" in rule}
    used = {name for _, expr in targets for name in re.findall(r"\b[a-z_]+:[a-z0-9_:]+", expr)}
    assert used - records == set()


def test_dashboard_panels_have_unique_ids_and_do_not_overlap():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = [(p["title"], x, y) for p in panels for x, y in cells_of(p["gridPos"])]
    taken: dict[tuple[int, int], str] = {}
    for title, x, y in cells:
        assert (x, y) not in taken, f"{title} overlaps {taken[x, y]}"
        assert 0 <= x < 24, f"{title} is wider than Grafana's 24 columns"
        taken[x, y] = title


def cells_of(pos: dict) -> list[tuple[int, int]]:
    return [(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])]


def query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?query={urllib.parse.quote(expr)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)["data"]["result"]


def has_figures(result: list[dict]) -> bool:
    """At least one finite sample (a quantile over no requests is NaN: that is no figure either)."""
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def push_drift_figures(pushgateway: str) -> None:
    """What the drift job pushes after a run that found drift (drift.promfile renders it)."""
    from drift.promfile import render
    from drift.report import ColumnDrift, DriftResult

    columns = [
        ColumnDrift("brightness", "ks", 0.0001, 0.0018, True),
        ColumnDrift("sharpness", "ks", 0.4, 0.0018, False),
        ColumnDrift("embedding", "classifier", 0.93, 0.62, True),
    ]
    result = DriftResult(
        drift=True, dataset_drift=False, drifted_share=0.1, embedding_score=0.93, embedding_threshold=0.62,
        embedding_drift=True, columns=columns, rows_current=500, rows_reference=1000,
        rows_current_total=500, rows_reference_total=1000, timestamp="2026-11-25T00:00:00Z",
    )  # fmt: skip
    body = render(result, "image-classifier:test", skipped_lines=2).encode()
    request = urllib.request.Request(f"{pushgateway}/metrics/job/imgcls_drift", data=body, method="PUT")
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status in (200, 202)


def push_accuracy_figures(pushgateway: str) -> None:
    """What the accuracy job pushes after a run that found the accuracy dropped (drift.accuracy renders it)."""
    from prometheus_client import generate_latest

    from drift.accuracy import AccuracyResult, registry

    result = AccuracyResult(model="image-classifier:test", labelled=120, predictions=4000, accuracy=0.81, upper=0.87,
                            test_accuracy=0.97, dropped=True)  # fmt: skip
    body = generate_latest(registry(result, result.model))
    request = urllib.request.Request(f"{pushgateway}/metrics/job/imgcls_accuracy", data=body, method="PUT")
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status in (200, 202)


@pytest.mark.slow
@pytest.mark.integration
def test_make_monitor_shows_every_dashboard_figure_under_load_and_stops_on_ctrl_c(server, tmp_path):
    """`monitoring/monitor.py` (what `make monitor` runs) against the real service, a short Locust load, then
    every dashboard query through Prometheus's HTTP API, the rules' health, and one alert end to end."""
    prom_port, push_port, evidently_port = free_port(), free_port(), free_port()
    base, pushgateway = f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{push_port}"
    evidently = f"http://127.0.0.1:{evidently_port}"
    cmd = [sys.executable, "-m", "monitoring.monitor", "--service", server.url.removeprefix("http://"),
           "--pushgateway", f"127.0.0.1:{push_port}", "--port", str(prom_port), "--evidently-port",
           str(evidently_port), "--workspace", str(tmp_path / "workspace"), "--data-dir", str(tmp_path / "monitor"),
           "--scrape-interval", "1s"]  # fmt: skip
    # A session of its own, as a terminal job has: should Ctrl+C not stop it, its group goes with its servers.
    printed: list[str] = []
    monitor = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: answers(base + "/-/ready") and answers(pushgateway + "/-/ready"), monitor, 60)
        for line in monitor.stdout:  # what it prints once both are up
            printed.append(line)
            if line.startswith("Ctrl+C stops."):
                break
        links = {line.split()[0]: line.split()[1] for line in printed if line.split()[:1] and line.split()[0] in PAGES}
        assert set(links) == set(PAGES) and all(answers(url) for url in links.values()), links  # no dead link
        assert any(line.startswith(f"Evidently    {evidently}") for line in printed) and answers(evidently + "/")
        push_drift_figures(pushgateway)
        push_accuracy_figures(pushgateway)
        locust = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "loadtest", "--headless", "--host", server.url, "-u", "4",
             "-r", "4", "-t", f"{LOAD_SECONDS}s", "--bad-input-share", "0.2", "--image-pool", "2", "--only-summary"],
            cwd=ROOT, capture_output=True, text=True, timeout=LOAD_SECONDS + 90,
        )  # fmt: skip
        assert "Aggregated" in locust.stdout + locust.stderr, locust.stderr[-3000:]
        assert "will be ignored" not in locust.stderr  # -u/-r/-t do drive Locust's constant load

        # A test has no week of history: "last week" queries are checked without their offset.
        checked = {(title, expr.replace(" offset 1w", "")) for title, expr in dashboard_targets()}
        empty = set(checked)
        deadline = time.monotonic() + 60  # recording rules need a few evaluations after the first scrapes
        while empty and time.monotonic() < deadline:
            empty = {(title, expr) for title, expr in empty if not has_figures(query(base, expr))}
            time.sleep(1)
        assert not empty, "dashboard queries without figures:\n" + "\n".join(f"  {t}: {e}" for t, e in empty)

        with urllib.request.urlopen(base + "/api/v1/rules", timeout=10) as resp:
            groups = json.load(resp)["data"]["groups"]
        loaded = [rule for group in groups for rule in group["rules"]]
        assert len(loaded) == len(rules())
        assert [(r["name"], r["lastError"]) for r in loaded if r["health"] != "ok"] == []

        def firing() -> set[str]:
            with urllib.request.urlopen(base + "/api/v1/alerts", timeout=10) as resp:
                alerts = json.load(resp)["data"]["alerts"]
            return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}

        wait_for(lambda: {"ImgclsDriftDetected", "ImgclsAccuracyDropped"} <= firing(), monitor, 30)  # pushed, scraped
    finally:
        if monitor.poll() is None:
            monitor.send_signal(signal.SIGINT)  # Ctrl+C
        try:
            out, _ = monitor.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(monitor.pid, signal.SIGKILL)
            out, _ = monitor.communicate()
    out = "".join(printed) + out
    assert monitor.returncode == 0, out
    assert f"Prometheus   {base}  (log {tmp_path / 'monitor' / 'prometheus.log'})" in out, out
    assert f"Pushgateway  {pushgateway}  (started here" in out
    assert "stopped prometheus-pushgateway, prometheus, evidently" in out
    assert not answers(base + "/-/ready") and not answers(pushgateway + "/-/ready") and not answers(evidently + "/")


def wait_for(condition, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"monitor exited with {proc.returncode}: {proc.stdout.read()}"
        assert time.monotonic() < deadline, f"not true within {timeout:.0f}s: {condition}"
        time.sleep(0.5)
