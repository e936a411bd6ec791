"""The history of drift runs, so a person sees when a shift started and not only that it exists.

Each run appends one JSON line to ``history.jsonl`` (its summary: time, model, variant, window, rows, verdict,
every feature's score, threshold and drift, the unfamiliar share, the report's path), runs that could not judge
included, with the reason. The line is one ``write`` on an ``O_APPEND`` descriptor: concurrent runs never
interleave, and a run killed mid-write leaves at most one torn last line, which the reader skips.
``history.html`` is rendered from it (:mod:`drift.trendpage`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from drift.logread import LogData
from drift.report import DriftResult
from drift.reportpage import CANNOT_JUDGE, DRIFT, NO_DRIFT, verdict
from drift.trendpage import render_history_page

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
PAGE_FILE = "history.html"
VERSION = 1
VERDICTS = (DRIFT, NO_DRIFT, CANNOT_JUDGE)


def run_entry(
    result: DriftResult | None,
    data: LogData | None,
    reason: str = "",
    sources: Sequence[str] | None = None,
    since: str | None = None,
    last: int | None = None,
    report: str | os.PathLike | None = None,
    history: str | os.PathLike = HISTORY_FILE,
) -> dict[str, Any]:
    """The history line of one run; ``result`` None means it could not judge, for ``reason``.

    ``report`` is stored relative to the history file's folder when it lies under it, so a reports folder
    that is copied or served elsewhere keeps its links."""
    has_rows = data is not None and data.rows > 0 and data.start is not None
    entry: dict[str, Any] = {
        "v": VERSION,
        "time": result.timestamp if result else datetime.now(UTC).isoformat(timespec="seconds"),
        "verdict": verdict(result),
        "reason": None if result else reason,
        "model": data.model if data else None,
        "variant": data.variant if data else None,
        "sources": sorted(sources) if sources is not None else None,
        "window": {
            "since": since,
            "last": last,
            "start": data.start.isoformat(timespec="seconds") if has_rows else None,
            "end": data.end.isoformat(timespec="seconds") if has_rows else None,
        },
        "rows": data.rows if data is not None else 0,
        "rows_used": result.rows_current if result else None,
        "rows_reference": result.rows_reference if result else None,
        "skipped_lines": data.skipped if data else 0,
        "unfamiliar_share": _finite(data.unfamiliar_share) if data else None,
        "dataset_drift": result.dataset_drift if result else None,
        "features": [
            {
                "feature": c.feature,
                "method": c.method,
                "score": _finite(c.score),
                "threshold": _finite(c.threshold),
                "drifted": bool(c.drifted),
                "drifts_when": c.drifts_when,
            }
            for c in (result.columns if result else [])
        ],
        "report": _relative(report, Path(history).parent) if report else None,
    }
    return entry


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _relative(path: str | os.PathLike, base: Path) -> str:
    path, base = Path(path).absolute(), base.absolute()
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def append_run(path: str | os.PathLike, entry: dict[str, Any]) -> Path:
    """Append ``entry`` as one line with one ``write`` on an ``O_APPEND`` descriptor, then ``fsync``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, separators=(",", ":"), allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)  # read: the last byte
    try:
        # The lock keeps another run's write from landing between the look at the last byte and this write (a
        # reader can see a large write half done); the single O_APPEND write is what keeps lines whole.
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        # A run killed mid-write left a line without its newline: start on a new line, or this one is lost with it.
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        written = os.write(fd, line)
        if written != len(line):  # a regular file writes short only when the disk is full
            raise OSError(f"only {written} of {len(line)} bytes of the history line were written to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def load_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The runs in ``path``, oldest first; torn or damaged lines are skipped (and logged). [] if there is none."""
    path = Path(path)
    if not path.exists():
        return []
    entries, skipped = [], 0
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        entry = _parse(line)
        if entry is None:
            skipped += 1
        else:
            entries.append(entry)
    if skipped:
        log.warning("%s: skipped %d torn or damaged lines", path, skipped)
    return sorted(entries, key=lambda e: e["_time"])


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(line)
        when = datetime.fromisoformat(entry["time"])
    except (ValueError, KeyError, TypeError):
        return None
    if (
        not isinstance(entry, dict)
        or entry.get("verdict") not in VERDICTS
        or not isinstance(entry.get("features"), list)
        or not all(isinstance(f, dict) and isinstance(f.get("feature"), str) for f in entry["features"])
    ):
        return None
    entry["_time"] = when if when.tzinfo else when.replace(tzinfo=UTC)
    return entry


def record_run(history: str | os.PathLike, entry: dict[str, Any], page: str | os.PathLike) -> Path:
    """Append the run to ``history`` and render the whole history to ``page``; returns the page's path."""
    append_run(history, entry)
    return render_history_page(load_history(history), page, Path(history).parent)
