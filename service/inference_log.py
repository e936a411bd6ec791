"""The inference-log schema: one JSON line per classified image, shared by the service and the drift job.

Each line holds ``time`` (ISO 8601, UTC), ``request_id``, ``model`` (the BentoML model tag),
``label``, ``confidence``, the statistics of :data:`service.imagestats.STAT_FIELDS` and
``embedding`` (a list of floats). The training reference table has the same columns, with the
embedding spread over ``emb_0 .. emb_{n-1}``.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import queue
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.imagestats import STAT_FIELDS

log = logging.getLogger(__name__)

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
    when = (time or datetime.now(UTC)).isoformat(timespec="milliseconds")
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


class InferenceLogWriter:
    """Appends records to JSON-lines files off the request path.

    A background thread drains a queue at least every ``flush_interval`` seconds and writes each
    batch of whole lines with a single ``write`` on an ``O_APPEND`` descriptor, then ``fsync``s, so
    a crash of the process (or the machine) loses at most the last interval and never leaves half a
    line behind a whole one. Every process writes its own files
    (``inference-<UTC start>-<pid>.jsonl``), so several workers never interleave, and a file that
    reaches ``max_bytes`` is closed and a new one started: rotation without renames.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        max_bytes: int = 64 << 20,
        flush_interval: float = 1.0,
        max_queue: int = 100_000,
        fsync: bool = True,
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.flush_interval, self.max_queue, self.fsync = max_bytes, flush_interval, max_queue, fsync
        self.dropped = 0  # records refused because the queue was full (disk stalled); logged
        self.written = 0
        self._queue: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._fd: int | None = None
        self._size = 0
        self.path: Path | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def write(self, record: dict[str, Any]) -> None:
        """Queue one record; never blocks the caller on disk."""
        if self._queue.qsize() >= self.max_queue:
            self.dropped += 1
            if self.dropped in (1, 100) or self.dropped % 10_000 == 0:
                log.warning("inference log queue full (%d records): %d records dropped", self.max_queue, self.dropped)
            return
        self._queue.put(encode(record))

    def close(self) -> None:
        """Write everything queued, then close the file; safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval):
            try:
                self._drain()
            except OSError:
                log.exception("inference log: writing to %s failed; will retry", self.folder)

    def _drain(self) -> None:
        lines = []
        while True:
            try:
                lines.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if not lines:
            return
        if self._fd is None or self._size >= self.max_bytes:
            self._open_new()
        data = b"".join(lines)
        view = memoryview(data)
        while view:  # a regular file only writes short on a full disk; finish the batch or raise
            view = view[os.write(self._fd, view) :]
        if self.fsync:
            os.fsync(self._fd)
        self._size += len(data)
        self.written += len(lines)

    def _open_new(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        self.path = self.folder / f"inference-{stamp}-{os.getpid()}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size
        log.info("inference log: writing %s", self.path)


def log_files(folder: str | os.PathLike) -> list[Path]:
    """Every inference-log file in ``folder``, oldest first (the names start with their UTC start time)."""
    return sorted(Path(folder).glob("inference-*.jsonl"))
