"""The inference log: one JSON line per classified image, written by the service and read by the drift job.

Schema (version 2, in this order): ``v``, ``time`` (ISO 8601, UTC), ``request_id``, ``source`` (who sent it:
``production`` unless the client set ``X-Traffic-Source``), ``model`` (BentoML tag), ``variant`` (fp32, fp16
or int8), ``label``, ``confidence``, ``ood_score``, ``unfamiliar``, the statistics of
:data:`imgcls.imagestats.STAT_FIELDS` and ``embedding`` (a list of floats). Version 1 lines (no source,
variant or OOD score) are still read. The training reference tables have the same columns, with the
embedding spread over ``emb_0 .. emb_{n-1}``.

Where it lives: ``IMGCLS_LOG_DIR``, else ``$BENTOML_HOME/inference_log`` (``~/bentoml/inference_log``), the
same absolute folder for a server started anywhere and for the drift job (:func:`default_log_dir`).
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import math
import os
import queue
import re
import threading
import time as _time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from imgcls.imagestats import STAT_FIELDS

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
EMBEDDING_PREFIX = "emb_"
PRODUCTION = "production"
REQUIRED_FIELDS = ("time", "request_id", "model", "label", "confidence", *STAT_FIELDS, "embedding")
#: The files a writer of each kind writes: the inference log, and the labels people send back (feedback).
INFERENCE, FEEDBACK = "inference", "feedback"
FILE_PATTERN = re.compile(r"^(inference|feedback)-\d{8}T\d{6,12}-(\d+)\.jsonl$")
THUMBNAIL_DIR = "unfamiliar"
THUMBNAIL_SIDE = 96
#: Where an operator who opted in keeps every classified image, as the model saw it (drift.accuracy --export).
KEPT_DIR = "images"
#: The writer looks for files past the size or age bound at least this often, not only when it opens a file.
RETENTION_EVERY_S = 60.0


def default_log_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``IMGCLS_LOG_DIR``, else ``inference_log`` in the BentoML home; always absolute."""
    env = os.environ if environ is None else environ
    if env.get("IMGCLS_LOG_DIR"):
        return Path(env["IMGCLS_LOG_DIR"]).expanduser().absolute()
    home = Path(env.get("BENTOML_HOME") or Path.home() / "bentoml").expanduser()
    return (home / "inference_log").absolute()


def ensure_writable(folder: str | os.PathLike) -> Path:
    """Create the log folder if needed; PermissionError saying what to do when this process cannot write there."""
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(
            f"the inference log folder {folder} is not writable by uid {os.getuid()}: every record would be lost. "
            f"Give that user the folder (e.g. chown {os.getuid()} {folder}) or set IMGCLS_LOG_DIR elsewhere."
        )
    return folder


def make_record(
    request_id: str,
    model: str,
    variant: str,
    label: str,
    confidence: float,
    ood_score: float,
    unfamiliar: bool,
    stats: Mapping[str, float],
    embedding: Sequence[float] | np.ndarray,
    source: str = PRODUCTION,
    time: datetime | None = None,
) -> dict[str, Any]:
    """One log record in schema order."""
    return {
        "v": SCHEMA_VERSION,
        "time": (time or datetime.now(UTC)).isoformat(timespec="milliseconds"),
        "request_id": request_id,
        "source": source,
        "model": model,
        "variant": variant,
        "label": label,
        "confidence": round(float(confidence), 6),
        "ood_score": round(float(ood_score), 4),
        "unfamiliar": bool(unfamiliar),
        **{name: round(float(stats[name]), 6) for name in STAT_FIELDS},
        "embedding": np.round(np.asarray(embedding, dtype=np.float64), 5).tolist(),  # one call, not one per number
    }


def encode(record: Mapping[str, Any]) -> bytes:
    """A record as one newline-terminated JSON line."""
    return (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()


#: The times a record may carry: pandas and the drift job hold times as nanoseconds since 1970, up to 2262.
EARLIEST, LATEST = datetime(2000, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)


def _record_time(record: Mapping[str, Any]) -> datetime | None:
    """The time a record carries, or None when it has none, has no time zone or lies outside the readable range."""
    try:
        when = datetime.fromisoformat(record["time"])
    except (TypeError, ValueError, KeyError):
        return None
    return when if when.tzinfo is not None and EARLIEST <= when <= LATEST else None


def parse_line(line: str | bytes) -> dict[str, Any] | None:
    """A validated record (version 1 lines get the version 2 fields' defaults), or None for a torn, corrupt,
    incomplete or unknown-version line, or one with a field of the wrong type or out of range (the caller counts
    those): one bad line never stops a reader."""
    parsed = parse_record(line)
    return None if parsed is None else parsed[0]


def parse_record(line: str | bytes) -> tuple[dict[str, Any], datetime] | None:
    """:func:`parse_line`, with the record's time parsed."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(record, dict) or record.get("v") not in READABLE_VERSIONS:
        return None
    if any(k not in record for k in REQUIRED_FIELDS):
        return None
    record.setdefault("source", PRODUCTION)  # version 1 had no way to mark synthetic traffic
    record.setdefault("variant", None)
    record.setdefault("ood_score", None)
    record.setdefault("unfamiliar", None)
    try:
        numbers = [float(record["confidence"]), *(float(record[k]) for k in STAT_FIELDS)]
        if record["ood_score"] is not None:
            numbers.append(float(record["ood_score"]))
        if not isinstance(record["embedding"], list) or not record["embedding"]:
            return None
        embedding = [float(x) for x in record["embedding"]]
    except (TypeError, ValueError, OverflowError):
        return None
    when = _record_time(record)
    if when is None:
        return None
    if not all(math.isfinite(x) for x in numbers + embedding):
        return None
    texts = ("label", "source", "model", "request_id")
    if not all(isinstance(record[k], str) for k in texts) or not isinstance(record["variant"], str | None):
        return None
    if not isinstance(record["unfamiliar"], bool | None):
        return None
    return record, when


FEEDBACK_VERSION = 1


def make_feedback(request_id: str, label: str, model: str, time: datetime | None = None) -> dict[str, Any]:
    """A label a person gave the image of an answered request (``POST /feedback``): its own log, the feedback files
    beside the inference log, joined to the predictions by the accuracy job."""
    return {
        "v": FEEDBACK_VERSION,
        "time": (time or datetime.now(UTC)).isoformat(timespec="milliseconds"),
        "request_id": request_id,
        "label": label,
        "model": model,
    }


def parse_feedback(line: str | bytes) -> dict[str, Any] | None:
    """A validated feedback record, or None for a line that is not one."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(record, dict) or record.get("v") != FEEDBACK_VERSION or _record_time(record) is None:
        return None
    if not all(isinstance(record.get(k), str) and record[k] for k in ("request_id", "label", "model")):
        return None
    return record


def log_files(folder: str | os.PathLike, kind: str = INFERENCE) -> list[Path]:
    """Every log file of ``kind`` under ``folder`` (one level of per-pod subfolders included), oldest first."""
    folder = Path(folder)
    if folder.is_file():
        return [folder] if kind == INFERENCE else []
    found = [*folder.glob(f"{kind}-*.jsonl"), *folder.glob(f"*/{kind}-*.jsonl")]
    return sorted(found, key=lambda p: (p.name, str(p)))


def thumbnail_name(request_id: str) -> str:
    """The file name of request ``request_id``'s thumbnail in ``THUMBNAIL_DIR`` (the writer's and the reader's)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", request_id) + ".jpg"


def thumbnail_files(folder: str | os.PathLike, kind: str = THUMBNAIL_DIR) -> dict[str, Path]:
    """The stored thumbnails (or, with ``kind=KEPT_DIR``, the kept images) by file name (:func:`thumbnail_name`),
    under ``folder`` (or a log file's folder) and its per-pod subfolders."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    found = [*folder.glob(f"{kind}/*.jpg"), *folder.glob(f"*/{kind}/*.jpg")]
    return {p.name: p for p in found}


def thumbnail_jpeg(pixels: np.ndarray, side: int = THUMBNAIL_SIDE, quality: int = 80) -> bytes:
    """A JPEG of a model-input array, at most ``side`` square, for people to see what the model was sent."""
    from PIL import Image

    img = Image.fromarray(pixels)
    if max(img.size) > side:
        img = img.resize((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def kept_jpeg(pixels: np.ndarray) -> bytes:
    """A kept image: the model-input array at full size, at a quality to train on."""
    return thumbnail_jpeg(pixels, side=max(pixels.shape[:2]), quality=95)


class InferenceLogWriter:
    """Appends records to JSON-lines files off the request path.

    A background thread drains a queue at least every ``flush_interval`` seconds and writes each
    batch of whole lines with a single ``write`` on an ``O_APPEND`` descriptor, then ``fsync``s, so
    a crash of the process (or the machine) loses at most the last interval and never leaves half a
    line behind a whole one. A write that fails part-way (a full disk) is cut back to the last whole
    record, so the next batch never lands on a fragment. Every process writes its own files
    (``inference-<UTC start>-<pid>.jsonl``), so several workers never interleave, and a file that reaches
    ``max_bytes`` is closed and a new one started: rotation without renames. When the folder's files pass
    ``max_total_bytes``, or hold only records older than ``max_age_s``, the oldest ones no running process
    is writing to are deleted, checked once a minute; with an age limit a file is also rotated every
    ``max_age_s / 10`` (an hour at most), so no record outlives the limit by more than that.

    Thumbnails of unfamiliar images go to ``THUMBNAIL_DIR`` in the same folder, within ``thumbnail_bytes``, at
    most ``thumbnails_per_s`` a second (the first ones; the records of the others are written as usual): a sample
    to look at, where one per unfamiliar image would cost a JPEG encode and a file per request, and hold their
    pixels in memory while the disk stalls.
    With ``kept_image_bytes`` (0, off, by default) every image whose record is written is kept too, as the model saw
    it, in ``KEPT_DIR`` within that budget: the operator's opt-in to turning labelled production images into a
    training folder. Thumbnails and kept images older than ``max_age_s`` are deleted with the records.
    ``on_error`` counts failed writes and ``on_drop(n)`` records lost, queue full or write failed (the service's
    metrics).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        max_bytes: int = 64 << 20,
        max_total_bytes: int = 0,
        max_age_s: float = 0.0,
        thumbnail_bytes: int = 32 << 20,
        thumbnails_per_s: float = 2.0,
        kept_image_bytes: int = 0,
        flush_interval: float = 1.0,
        max_queue: int = 100_000,
        fsync: bool = True,
        on_error: Callable[[], None] | None = None,
        on_drop: Callable[[int], None] | None = None,
        kind: str = INFERENCE,
    ):
        self.folder, self.kind = ensure_writable(folder), kind
        self.max_bytes, self.max_total_bytes, self.max_age_s = max_bytes, max_total_bytes, max_age_s
        self.thumbnail_bytes, self.thumbnails_per_s = thumbnail_bytes, thumbnails_per_s
        self.kept_image_bytes = kept_image_bytes
        # A bucket that holds a second's thumbnails (at least one, none at all when the rate is 0).
        self._thumbnail_burst = max(1.0, thumbnails_per_s) if thumbnails_per_s > 0 else 0.0
        self._thumbnail_tokens, self._tokens_at = self._thumbnail_burst, _time.monotonic()
        self.flush_interval, self.max_queue, self.fsync = flush_interval, max_queue, fsync
        self.on_error, self.on_drop = on_error or (lambda: None), on_drop or (lambda n: None)
        self._last_prune: dict[str, float] = {}  # per image folder
        self._last_retention = float("-inf")
        self._opened_at = float("-inf")
        self.rotate_s = min(max_age_s / 10, 3600.0) if max_age_s else float("inf")
        self.dropped = 0  # records refused because the queue was full (disk stalled); logged
        self.lost = 0  # records whose write failed; logged
        Item = tuple[str, np.ndarray]  # (request id, pixels)
        self._queue: queue.SimpleQueue[tuple[bytes, Item | None, Item | None]] = queue.SimpleQueue()
        self._fd: int | None = None
        self._size = 0
        self.path: Path | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{kind}-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def write(
        self, record: Mapping[str, Any], thumbnail: np.ndarray | None = None, image: np.ndarray | None = None
    ) -> None:
        """Queue one record, a thumbnail of ``thumbnail`` pixels and, when images are kept, ``image``; never
        blocks the caller on disk."""
        if self._queue.qsize() >= self.max_queue:
            self.dropped += 1
            self.on_drop(1)
            if self.dropped in (1, 100) or self.dropped % 10_000 == 0:
                log.warning("inference log queue full (%d records): %d records dropped", self.max_queue, self.dropped)
            return
        if thumbnail is not None and not self._take_thumbnail_token():
            thumbnail = None
        request_id = str(record["request_id"])
        kept = (request_id, image) if image is not None and self.kept_image_bytes else None
        self._queue.put((encode(record), None if thumbnail is None else (request_id, thumbnail), kept))

    def _take_thumbnail_token(self) -> bool:
        """Whether a thumbnail may be saved now: a bucket of ``thumbnails_per_s`` tokens refilled continuously."""
        now = _time.monotonic()
        refilled = self._thumbnail_tokens + (now - self._tokens_at) * self.thumbnails_per_s
        self._thumbnail_tokens = min(self._thumbnail_burst, refilled)
        self._tokens_at = now
        if self._thumbnail_tokens < 1.0:
            return False
        self._thumbnail_tokens -= 1.0
        return True

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
            self._drain()
            if _time.monotonic() - self._last_retention > RETENTION_EVERY_S:
                self._enforce_retention()

    def _drain(self) -> None:
        lines, thumbnails, kept = [], [], []
        while True:
            try:
                line, thumb, image = self._queue.get_nowait()
            except queue.Empty:
                break
            lines.append(line)
            if thumb is not None:
                thumbnails.append(thumb)
            if image is not None:
                kept.append(image)
        if not lines:
            return
        try:
            self._write_lines(b"".join(lines))
        except OSError as exc:
            self.lost += len(lines)
            self.on_error()
            self.on_drop(len(lines))
            log.error("inference log: writing %d records to %s failed (%s); %d lost so far", len(lines),
                      self.folder, exc, self.lost)  # fmt: skip
        if thumbnails:
            self._save_images(THUMBNAIL_DIR, thumbnails, thumbnail_jpeg, self.thumbnail_bytes)
        if kept:
            self._save_images(KEPT_DIR, kept, kept_jpeg, self.kept_image_bytes)

    def _write_lines(self, data: bytes) -> None:
        if self._fd is None or self._size >= self.max_bytes or _time.monotonic() - self._opened_at > self.rotate_s:
            self._open_new()
        view = memoryview(data)
        try:
            while view:  # a regular file only writes short on a full disk; finish the batch or raise
                view = view[os.write(self._fd, view) :]
            if self.fsync:
                os.fsync(self._fd)
        except OSError:
            try:  # cut the file back to its last whole record, so the next batch does not extend a fragment
                os.ftruncate(self._fd, self._size)
            except OSError:  # the fragment stays; the next batch goes to a new file
                os.close(self._fd)
                self._fd = None
            raise
        self._size += len(data)

    def _open_new(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        self.path = self.folder / f"{self.kind}-{stamp}-{os.getpid()}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size
        self._opened_at = _time.monotonic()
        log.info("inference log: writing %s", self.path)
        self._enforce_retention()

    def _enforce_retention(self) -> None:
        """Delete the oldest files of the folder past the size or age bound, except files a running process
        writes."""
        self._last_retention = _time.monotonic()
        if not self.max_total_bytes and not self.max_age_s:
            return
        files = [p for p in log_files(self.folder, self.kind) if p.parent == self.folder and FILE_PATTERN.match(p.name)]
        newest_per_pid: dict[int, Path] = {}
        for p in files:  # oldest first: the last one seen per pid is the one it writes to
            newest_per_pid[int(FILE_PATTERN.match(p.name).group(2))] = p
        active = {p for pid, p in newest_per_pid.items() if _running(pid)}
        sizes = {}
        for p in files:
            try:
                sizes[p] = p.stat()
            except FileNotFoundError:  # another worker deleted it
                continue
        total = sum(s.st_size for s in sizes.values())
        now = _time.time()
        for p, st in sizes.items():
            too_big = self.max_total_bytes and total > self.max_total_bytes
            too_old = self.max_age_s and now - st.st_mtime > self.max_age_s
            if not (too_big or too_old) or p in active:
                continue
            try:
                p.unlink()
                log.info("inference log retention: deleted %s (%d bytes)", p.name, st.st_size)
            except FileNotFoundError:
                pass
            total -= st.st_size

    def _save_images(
        self, name: str, images: list[tuple[str, np.ndarray]], jpeg: Callable[[np.ndarray], bytes], budget: int
    ) -> None:
        folder = self.folder / name
        try:
            folder.mkdir(exist_ok=True)
            for request_id, pixels in images:
                path = folder / thumbnail_name(request_id)
                partial = path.with_suffix(".partial")  # renamed once whole: a full disk leaves no empty image
                try:
                    partial.write_bytes(jpeg(pixels))
                    partial.rename(path)
                finally:
                    partial.unlink(missing_ok=True)
        except OSError as exc:
            log.error("inference log: saving images in %s failed (%s)", folder, exc)
            return
        if _time.monotonic() - self._last_prune.get(name, float("-inf")) > 60:  # a scan per minute, not per flush
            self._last_prune[name] = _time.monotonic()
            prune_oldest(folder, "*.jpg", budget, self.max_age_s)


def _running(pid: int) -> bool:
    """Whether a process with this pid runs (in this pid namespace: a pod's own folder, its own processes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def prune_oldest(folder: Path, pattern: str, budget: int, max_age_s: float = 0.0) -> None:
    """Delete the oldest files matching ``pattern`` until the rest fit in ``budget`` bytes, and any older than
    ``max_age_s`` (0: no age limit)."""
    stats = []
    for p in folder.glob(pattern):
        try:
            st = p.stat()
        except FileNotFoundError:  # another worker pruned it
            continue
        stats.append((st.st_mtime, st.st_size, p))
    used, oldest = 0, _time.time() - max_age_s if max_age_s else float("-inf")
    for mtime, size, p in sorted(stats, reverse=True):
        used += size
        if used > budget or mtime < oldest:
            p.unlink(missing_ok=True)
