"""Read the inference log into a table: validate every line, count the bad ones, pick a window and the traffic
sources to judge, refuse a window that mixes models or variants (each has its own reference)."""

from __future__ import annotations

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
from imgcls.inference_log import EMBEDDING_PREFIX, PRODUCTION, log_files, parse_line

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class LogError(RuntimeError):
    """The log cannot be judged as asked (no files, no rows, several models); the message says what to do."""


@dataclass
class LogData:
    """The usable rows of the log and what was left out of them."""

    frame: pd.DataFrame  # time, request_id, model, variant, source, label, confidence, ood_score, unfamiliar (1/0),
    # STAT_FIELDS, emb_*; oldest first
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

    @property
    def unfamiliar_share(self) -> float:
        """Share of the window's images flagged as unlike the training images; NaN when no row carries the flag."""
        if self.frame.empty:
            return float("nan")
        return float(self.frame["unfamiliar"].mean())


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


def read_log(
    path: str | os.PathLike,
    since: datetime | None = None,
    last: int | None = None,
    model: str | None = None,
    variant: str | None = None,
    sources: frozenset[str] | None = frozenset({PRODUCTION}),
) -> LogData:
    """Read every log file under ``path`` and return the valid rows in the window for one model and variant.

    Bad lines (torn by a crash, corrupted, missing fields, non-finite numbers, wrong embedding length)
    are skipped and counted. Only rows of ``sources`` are judged (None: every source), so load tests and
    simulations stay out of production's window. Rows of several model tags or variants are refused unless
    ``model`` / ``variant`` picks one, since each has its own reference.
    """
    files = find_log_files(path)
    if not files:
        raise LogError(f"no inference log files (*.jsonl) in {path}: is the service writing there (IMGCLS_LOG_DIR)?")
    # A line is written at most a flush interval after its request, so a file last written before the window
    # holds no row of it: an hourly --since 1h run reads the last hour's files, not two weeks of them.
    older = set()
    if since is not None:
        older = {f for f in files if datetime.fromtimestamp(f.stat().st_mtime, UTC) < since}
    records, lines, skipped = [], 0, 0
    for file in files:
        if file in older:
            continue
        with open(file, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                lines += 1
                record = parse_line(line)
                if record is None:
                    skipped += 1
                else:
                    records.append(record)
    data = LogData(frame=pd.DataFrame(), model=None, files=files, lines=lines, files_before_window=len(older))
    if records:
        # One model has one embedding size; a record with another length is damaged, not a different model.
        dims = Counter(len(r["embedding"]) for r in records)
        dim = dims.most_common(1)[0][0]
        kept = [r for r in records if len(r["embedding"]) == dim]
        skipped += len(records) - len(kept)
        records = kept
    data.skipped = skipped
    if skipped:
        log.warning("skipped %d of %d log lines (corrupt, truncated or invalid)", skipped, lines)
    if not records:
        return data

    frame = _to_frame(records)
    if since is not None:
        keep = frame["time"] >= pd.Timestamp(since)
        data.outside_window += int((~keep).sum())
        frame = frame[keep]
    data.sources = {str(k): int(v) for k, v in frame["source"].value_counts().items()}
    if sources is not None:
        keep = frame["source"].isin(sources)
        data.other_sources = int((~keep).sum())
        frame = frame[keep]
    counts = frame["model"].value_counts()
    data.models = {str(k): int(v) for k, v in counts.items()}
    if model is not None:
        keep = frame["model"] == model
        data.other_models = int((~keep).sum())
        frame = frame[keep]
        if frame.empty:
            found = ", ".join(f"{k} ({v} rows)" for k, v in data.models.items()) or "none"
            raise LogError(f"no rows for model {model} in the log window; models found: {found}")
    elif len(counts) > 1:
        found = ", ".join(f"{k} ({v} rows)" for k, v in data.models.items())
        raise LogError(
            f"the log window holds predictions of {len(counts)} models: {found}. Each model has its own reference, "
            "so they cannot be judged together: pass --model TAG to pick one (or --since to start after the switch)."
        )
    variants = frame["variant"].value_counts()
    if variant is not None:
        keep = frame["variant"] == variant
        data.other_models += int((~keep).sum())
        frame = frame[keep]
    elif len(variants) > 1:
        found = ", ".join(f"{k} ({v} rows)" for k, v in variants.items())
        raise LogError(
            f"the log window holds predictions of several model variants: {found}. Each variant has its own "
            "reference: pass --variant to pick one."
        )
    if last is not None and len(frame) > last:
        data.outside_window += len(frame) - last
        frame = frame.iloc[len(frame) - last :]
    data.frame = frame.reset_index(drop=True)
    data.model = str(frame["model"].iloc[0]) if len(frame) else None
    if len(frame) and frame["variant"].iloc[0] != "":
        data.variant = str(frame["variant"].iloc[0])
    return data


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
