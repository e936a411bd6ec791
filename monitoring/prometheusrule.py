"""The PrometheusRule for clusters with the Prometheus operator: monitoring/rules.yml wrapped verbatim.

``python -m monitoring.prometheusrule > deploy/monitoring/prometheusrule.yaml`` writes it; tests/test_deploy.py
checks that the file is what this prints, so the rules have one source.
"""

from __future__ import annotations

import sys
from pathlib import Path

RULES = Path(__file__).with_name("rules.yml")
HEADER = """\
# Generated from monitoring/rules.yml by `python -m monitoring.prometheusrule > deploy/monitoring/prometheusrule.yaml`:
# edit the rules there, then run that again (tests/test_deploy.py fails while the two differ).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: imgcls
spec:
"""


def render(rules_text: str | None = None) -> str:
    """The PrometheusRule manifest whose spec is the rules file, comments included, indented under ``spec``."""
    text = RULES.read_text() if rules_text is None else rules_text
    body = "".join(f"  {line}" if line.strip() else line for line in text.splitlines(keepends=True))
    return HEADER + body


if __name__ == "__main__":
    sys.stdout.write(render())
