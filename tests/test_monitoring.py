"""Monitoring: the Prometheus rules (promtool), and the dashboard's queries against a real Prometheus."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
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
    from loadtest.run import RunConfig

    (slo,) = [rule["expr"] for rule in rules() if rule.get("record") == "imgcls:slo_p99_latency_seconds"]
    assert float(slo.removeprefix("vector(").removesuffix(")")) == RunConfig().slo_p99_ms / 1000
