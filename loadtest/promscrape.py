"""Scrape a service's Prometheus /metrics before and after a load test and summarise what moved.

Names are matched loosely so the report keeps working when the service renames a metric: the batch-size
histogram is the one whose name contains ``--batch-metric`` (default ``batch_size``), rejected inputs are
every counter whose name contains ``rejected``, split by their ``reason`` label.
"""

from __future__ import annotations

import logging
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base_url: str, timeout: float = 10.0) -> Samples | None:
    """All samples of ``base_url``/metrics, or None when the target has no /metrics (e.g. the baseline)."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=timeout) as resp:
            text = resp.read().decode("utf-8", errors="replace")
    except OSError as exc:
        log.info("no /metrics at %s (%s); the report will not have service metrics", base_url, exc)
        return None
    return parse(text)


def parse(text: str) -> Samples:
    """Prometheus text exposition to {(sample name, sorted labels): value}."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _total(samples: Samples, name: str, exclude_labels: tuple[str, ...] = ("le",)) -> float:
    return sum(v for (n, labels), v in samples.items() if n == name and not any(k in exclude_labels for k, _ in labels))


def _delta(before: Samples, after: Samples, name: str) -> float:
    return _total(after, name) - _total(before, name)


def summarize(before: Samples | None, after: Samples | None, batch_metric: str = "batch_size") -> dict:
    """What changed during the test: batches, mean batch size, rejected inputs by reason, model calls."""
    if before is None or after is None:
        return {"available": False}
    out: dict = {"available": True}
    batch_hists = sorted(
        {n[: -len("_count")] for (n, _) in after if n.endswith("_count") and batch_metric in n},
        key=len,
    )
    if batch_hists:
        name = batch_hists[0]
        count, total = _delta(before, after, name + "_count"), _delta(before, after, name + "_sum")
        out["batch_metric"] = name
        out["batches"] = int(count)
        out["mean_batch_size"] = round(total / count, 3) if count > 0 else None
    else:
        out["batch_metric"] = None
        log.info("no histogram named like %r in /metrics; mean batch size not reported", batch_metric)
    rejected: dict[str, float] = defaultdict(float)
    for (name, labels), value in after.items():
        if "rejected" in name and name.endswith("_total"):
            reason = dict(labels).get("reason", "unknown")
            rejected[reason] += value - before.get((name, labels), 0.0)
    out["rejected_inputs"] = {k: int(v) for k, v in sorted(rejected.items()) if v > 0}
    out["rejected_total"] = int(sum(rejected.values()))
    info = [dict(labels) for (name, labels), value in after.items() if name.endswith("_model_info") and value > 0]
    out["model_info"] = info[0] if info else None  # e.g. {"model": tag, "variant": "int8", "provider": ...}
    return out
