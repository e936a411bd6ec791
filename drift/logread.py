"""Read the inference log as a stream: validate every line, count the bad ones, pick a window and the traffic
sources to judge, refuse a window that mixes models or variants (each has its own reference), and keep a sample.

Memory follows the sample, not the window: each line is parsed, counted and either dropped or offered to a
uniform random sample of at most ``max_rows`` rows (reservoir sampling, seeded), so an hour of traffic at a
thousand requests a second is read in the same memory as a minute of it. What the job reports about the whole
window (rows, sources, unfamiliar share, first and last time, the most unfamiliar images) is counted as the lines
go by.
"""

from __future__ import annotations

import heapq
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from imgcls.imagestats import STAT_FIELDS
from imgcls.inference_log import EMBEDDING_PREFIX, PRODUCTION, log_files, parse_record

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
#: Rows of the window at most kept whole, per model and variant, when no --max-rows is given.
DEFAULT_MAX_ROWS = 20_000
#: The most unfamiliar rows of the window remembered, for the report's thumbnails (most have none stored).
TOP_UNFAMILIAR = 1000
#: Models or variants a window may hold that each get a sample; beyond, rows are only counted (the window is
#: refused anyway unless --model and --variant pick one).
MAX_SAMPLED_KEYS = 16


class LogError(RuntimeError):
    """The log cannot be judged as asked (no files, no rows, several models); the message says what to do."""


@dataclass
class LogData:
    """A sample of the window's rows and what the whole window holds."""

    frame: pd.DataFrame  # the sample: time, request_id, model, variant, source, label, confidence, ood_score,
    # unfamiliar (1/0), STAT_FIELDS, emb_*; oldest first
    model: str | None  # the one model tag of the rows (None when there are no rows)
    files: list[Path]
    variant: str | None = None  # the one variant of the rows (None when there are no rows, or version 1 lines)
    lines: int = 0  # non-empty lines read
    skipped: int = 0  # corrupt, truncated or invalid lines
    outside_window: int = 0  # valid rows left out by --since / --last (in the files read)
    files_before_window: int = 0  # files last written before --since: not read at all
    other_sources: int = 0  # valid rows of traffic sources not judged (load tests, simulations)
    other_models: int = 0  # valid rows of models (or variants) other than --model (--variant)
    models: dict[str, int] = field(default_factory=dict)  # rows per model tag in the window
    sources: dict[str, int] = field(default_factory=dict)  # rows per traffic source in the window
    rows: int = 0  # the window's rows judged (the frame is a sample of them when there are more than max_rows)
    start: datetime | None = None  # the first and last time among them
    end: datetime | None = None
    unfamiliar_share: float = float("nan")  # share flagged unfamiliar; NaN when no row carries the flag
    most_unfamiliar: pd.DataFrame = field(default_factory=pd.DataFrame)  # request_id, time, label, ood_score


def find_log_files(path: str | os.PathLike) -> list[Path]:
    """The log files under ``path`` (a file, a folder, or a folder of per-pod folders); LogError if none exists."""
    path = Path(path)
    if not path.exists():
        raise LogError(
            f"inference log folder {path} does not exist: pass --log-dir (or set IMGCLS_LOG_DIR) to the "
            "folder the service writes to."
        )
    return log_files(path)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A UTC time from ISO 8601 (``2025-01-31T12:00``) or a duration back from now (``30m``, ``24h``, ``7d``)."""
    match = _DURATION.match(text.strip().lower())
    now = now or datetime.now(UTC)
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise LogError(
            f"--since {text!r} is neither an ISO 8601 time (2025-01-31T12:00) nor a duration like 24h"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _keep_largest(heap: list, entry: tuple, size: int) -> None:
    """Add ``entry`` to ``heap``, a min-heap holding the ``size`` largest entries offered."""
    if len(heap) < size:
        heapq.heappush(heap, entry)
    else:
        heapq.heappushpop(heap, entry)


class _Window:
    """The rows of one model and variant (and embedding size) in the window: counted, and sampled."""

    def __init__(self, max_rows: int, last: int | None, rng: np.random.Generator):
        self.max_rows, self.last, self.rng = max_rows, last, rng
        self.rows = 0
        self.sample: list[dict] = []  # reservoir (without --last)
        self.newest: list[tuple[datetime, int, dict]] = []  # min-heap of the newest ``last`` rows (with --last)
        self.flagged = self.with_flag = 0
        self.start: datetime | None = None
        self.end: datetime | None = None
        self.top: list[tuple[float, int, dict]] = []  # min-heap of the most unfamiliar rows

    def add(self, record: dict, when: datetime, seq: int) -> None:
        self.rows += 1
        if self.last is not None:
            _keep_largest(self.newest, (when, seq, record), self.last)
            return
        self._count(record, when, seq)
        if len(self.sample) < self.max_rows:
            self.sample.append(record)
        else:
            j = int(self.rng.integers(self.rows))
            if j < self.max_rows:
                self.sample[j] = record

    def _count(self, record: dict, when: datetime, seq: int) -> None:
        self.start = when if self.start is None or when < self.start else self.start
        self.end = when if self.end is None or when > self.end else self.end
        if record["unfamiliar"] is not None:
            self.with_flag += 1
            self.flagged += bool(record["unfamiliar"])
        if record["ood_score"] is not None:
            _keep_largest(self.top, (float(record["ood_score"]), seq, record), TOP_UNFAMILIAR)

    def finish(self) -> list[dict]:
        """The sample (and, with --last, the counts of the newest rows only); oldest first by time."""
        if self.last is not None:
            newest, self.rows = self.newest, 0
            self.newest = []
            for when, seq, record in newest:  # now the window is known: count and sample as above
                self.last = None
                self.add(record, when, seq)
        return self.sample


def read_log(
    path: str | os.PathLike,
    since: datetime | None = None,
    last: int | None = None,
    model: str | None = None,
    variant: str | None = None,
    sources: frozenset[str] | None = frozenset({PRODUCTION}),
    max_rows: int = DEFAULT_MAX_ROWS,
    seed: int = 0,
) -> LogData:
    """Read every log file under ``path`` and return a sample of the valid rows in the window for one model and
    variant, with what the whole window holds.

    Bad lines (torn by a crash, corrupted, missing or mistyped fields, non-finite numbers, a time out of range,
    an embedding of another length than most) are skipped and counted. Only rows of ``sources`` are judged (None:
    every source), so load tests and simulations stay out of production's window. Rows of several model tags or
    variants are refused unless ``model`` / ``variant`` picks one, since each has its own reference. ``last``
    keeps the newest rows only; the sample holds at most ``max_rows`` of them, drawn uniformly (seeded).
    """
    files = find_log_files(path)
    if not files:
        raise LogError(f"no inference log files (*.jsonl) in {path}: is the service writing there (IMGCLS_LOG_DIR)?")
    # A line is written at most a flush interval after its request, so a file last written before the window
    # holds no row of it: an hourly --since 1h run reads the last hour's files, not two weeks of them.
    older = set()
    if since is not None:
        older = {f for f in files if datetime.fromtimestamp(f.stat().st_mtime, UTC) < since}
    data = LogData(frame=pd.DataFrame(), model=None, files=files, files_before_window=len(older))
    rng = np.random.default_rng(seed + 1)
    windows: dict[tuple[str, str, int], _Window] = {}
    keys: Counter = Counter()  # rows per (model, variant, embedding size) in the window
    sources_seen: Counter = Counter()
    seq = 0
    for file in files:
        if file in older:
            continue
        with open(file, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                data.lines += 1
                parsed = parse_record(line)
                if parsed is None:
                    data.skipped += 1
                    continue
                record, when = parsed
                if since is not None and when < since:
                    data.outside_window += 1
                    continue
                sources_seen[record["source"]] += 1
                if sources is not None and record["source"] not in sources:
                    data.other_sources += 1
                    continue
                if (model is not None and record["model"] != model) or (
                    variant is not None and record["variant"] != variant
                ):
                    data.other_models += 1
                    continue
                key = (record["model"], record["variant"] or "", len(record["embedding"]))
                keys[key] += 1
                window = windows.get(key)
                if window is None and len(windows) < MAX_SAMPLED_KEYS:
                    window = windows[key] = _Window(max_rows, last, rng)
                if window is not None:
                    seq += 1
                    window.add(record, when, seq)
    data.sources = dict(sources_seen.most_common())
    if not keys:
        _warn_skipped(data)
        return data
    # One model has one embedding size; rows of another length are damaged, not a different model.
    by_model: Counter = Counter()
    for (tag, var, _), n in keys.items():
        by_model[(tag, var)] += n
    dims = {(tag, var): max((n, dim) for (t, v, dim), n in keys.items() if (t, v) == (tag, var))[1]
            for tag, var in by_model}  # fmt: skip
    for (tag, var, dim), n in keys.items():
        if dim != dims[(tag, var)]:
            data.skipped += n
            by_model[(tag, var)] -= n
    _warn_skipped(data)
    data.models = {}
    for (tag, _), n in by_model.items():
        data.models[str(tag)] = data.models.get(str(tag), 0) + n
    if model is None and len(data.models) > 1:
        found = ", ".join(f"{k} ({v} rows)" for k, v in data.models.items())
        raise LogError(
            f"the log window holds predictions of {len(data.models)} models: {found}. Each model has its own "
            "reference, so they cannot be judged together: pass --model TAG to pick one (or --since to start after "
            "the switch)."
        )
    if variant is None and len(by_model) > 1:
        found = ", ".join(f"{var or 'not logged'} ({n} rows)" for (_, var), n in by_model.items())
        raise LogError(
            f"the log window holds predictions of several model variants: {found}. Each variant has its own "
            "reference: pass --variant to pick one."
        )
    ((tag, var),) = by_model
    window = windows.get((tag, var, dims[(tag, var)]))
    if window is None:  # beyond MAX_SAMPLED_KEYS: only possible with many models, refused above
        return data
    if last is not None:
        data.outside_window += max(0, window.rows - last)
    sample = window.finish()
    data.rows, data.start, data.end = window.rows, window.start, window.end
    data.unfamiliar_share = window.flagged / window.with_flag if window.with_flag else float("nan")
    data.frame = _to_frame(sample)
    top = sorted(window.top, reverse=True)
    data.most_unfamiliar = pd.DataFrame(
        {
            "request_id": [r["request_id"] for _, _, r in top],
            "time": pd.to_datetime([r["time"] for _, _, r in top], utc=True, format="ISO8601"),
            "label": [r["label"] for _, _, r in top],
            "ood_score": [score for score, _, _ in top],
        }
    )
    data.model = str(tag)
    data.variant = str(var) if var else None
    return data


def _warn_skipped(data: LogData) -> None:
    if data.skipped:
        log.warning("skipped %d of %d log lines (corrupt, truncated or invalid)", data.skipped, data.lines)


def _to_frame(records: list[dict]) -> pd.DataFrame:
    """Records as a table sorted by time, with the embedding spread over ``emb_*`` columns."""
    n, dim = len(records), len(records[0]["embedding"])
    numbers = np.empty((n, 3 + len(STAT_FIELDS)), dtype=np.float64)
    embeddings = np.empty((n, dim), dtype=np.float32)
    for i, r in enumerate(records):
        numbers[i, 0] = r["confidence"]
        numbers[i, 1] = np.nan if r["ood_score"] is None else r["ood_score"]
        numbers[i, 2] = np.nan if r["unfamiliar"] is None else float(r["unfamiliar"])
        numbers[i, 3:] = [r[k] for k in STAT_FIELDS]
        embeddings[i] = r["embedding"]
    frame = pd.DataFrame(numbers, columns=["confidence", "ood_score", "unfamiliar", *STAT_FIELDS])
    for column in ("label", "source", "variant", "model", "request_id"):
        frame.insert(0, column, pd.Series([str(r[column] or "") for r in records], dtype=object))
    frame.insert(0, "time", pd.to_datetime([r["time"] for r in records], utc=True, format="ISO8601"))
    emb = pd.DataFrame(embeddings, columns=[f"{EMBEDDING_PREFIX}{j}" for j in range(dim)])
    frame = pd.concat([frame, emb], axis=1)
    return frame.sort_values("time", kind="stable").reset_index(drop=True)
