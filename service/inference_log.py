"""The inference-log schema: one JSON line per classified image, shared by the service and the drift job.

Each line holds ``time`` (ISO 8601, UTC), ``request_id``, ``model`` (the BentoML model tag),
``label``, ``confidence``, the statistics of :data:`service.imagestats.STAT_FIELDS` and
``embedding`` (a list of floats). The training reference table has the same columns, with the
embedding spread over ``emb_0 .. emb_{n-1}``.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any

from service.imagestats import STAT_FIELDS

SCHEMA_VERSION = 1
EMBEDDING_PREFIX = "emb_"
REQUIRED_FIELDS = ("time", "request_id", "model", "label", "confidence", *STAT_FIELDS, "embedding")


def make_record(
    request_id: str,
    model: str,
    label: str,
    confidence: float,
    stats: dict[str, float],
    embedding: list[float],
    time: datetime | None = None,
) -> dict[str, Any]:
    """One log record in schema order."""
    when = (time or datetime.now(timezone.utc)).isoformat(timespec="milliseconds")
    record: dict[str, Any] = {"v": SCHEMA_VERSION, "time": when, "request_id": request_id, "model": model}
    record["label"] = label
    record["confidence"] = round(float(confidence), 6)
    for name in STAT_FIELDS:
        record[name] = round(float(stats[name]), 6)
    record["embedding"] = [round(float(x), 5) for x in embedding]
    return record


def encode(record: dict[str, Any]) -> bytes:
    """A record as one newline-terminated JSON line."""
    return (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()


def parse_line(line: str | bytes) -> dict[str, Any] | None:
    """A validated record, or None for a torn, corrupt or incomplete line (the caller counts those)."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or any(k not in record for k in REQUIRED_FIELDS):
        return None
    try:
        numbers = [float(record["confidence"]), *(float(record[k]) for k in STAT_FIELDS)]
        embedding = [float(x) for x in record["embedding"]]
        datetime.fromisoformat(record["time"])
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(x) for x in numbers + embedding) or not isinstance(record["label"], str):
        return None
    return record
