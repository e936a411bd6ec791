"""What the API workers know of each other: keep-alive connections spread evenly over them, and whether a request
has the whole server to itself.

The workers share one listening socket, and a new connection goes to whichever worker's event loop takes it
first, which is more often the busy one: its loop is already awake. Measured on a 2-core box with 8 clients that
reconnect now and then, the split went from 4+4 to 0+8 within 20 s, one worker queueing every request while the
other idled (p99 190 ms where a thread-per-request server held 100 ms).

So each API worker counts its working connections (those that sent a whole request, ``service/http_protocol.py``)
in its slot of a small shared file that the supervisor creates (:func:`create`), and a worker holding clearly
more than the least loaded one closes a connection after its response (``Connection: close``, see
``service/middleware.py``), one every ``CLOSE_INTERVAL_S`` at most, so that the responses in flight do not all
close at once: the client reconnects, and a few such rounds even the counts out. A worker that died leaves its
count behind until its replacement resets the slot; a stale count only makes the others less eager to close,
never more.

The same file counts each worker's requests in flight and stamps the last time there were two or more in the
whole server, so that a worker can tell a request that has been alone in the server for a while (one client at a
time) and run its model on every core (``service/app.py``). A dead worker's stale count keeps the others from
thinking themselves alone until it is replaced: slower, never wrong.
"""

from __future__ import annotations

import atexit
import logging
import mmap
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: Where the supervisor tells the workers the file is.
CENSUS_FILE = "IMGCLS_CONNECTION_CENSUS"
#: Per worker an int32 of connections and one of requests in flight; then a float64 for the whole server.
SLOT_BYTES = 8
STAMP_BYTES = 8
#: A crowded worker closes at most one connection this often.
CLOSE_INTERVAL_S = 0.1


def create(workers: int) -> None:
    """In the supervisor, before it starts the API workers: a zeroed slot per worker, removed at exit."""
    try:
        fd, path = tempfile.mkstemp(prefix="imgcls-connections-")
    except OSError as exc:  # no writable temporary folder: serve anyway, unbalanced
        log.warning("connection balancing off: %s", exc)
        return
    try:
        os.ftruncate(fd, SLOT_BYTES * max(1, workers) + STAMP_BYTES)
    finally:
        os.close(fd)
    os.environ[CENSUS_FILE] = path  # the workers copy the environment when they are created
    atexit.register(Path(path).unlink, missing_ok=True)


class Census:
    """This worker's view of the shared counts."""

    def __init__(self, path: str, slot: int):
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        workers = (len(self._map) - STAMP_BYTES) // SLOT_BYTES
        whole = memoryview(self._map)
        self.counts = whole[: 4 * workers].cast("i")  # connections per worker
        self.requests = whole[4 * workers : 8 * workers].cast("i")  # requests in flight per worker
        # When two or more requests were last in flight in the server: CLOCK_MONOTONIC, the same in every process.
        self._together_at = whole[8 * workers : 8 * workers + STAMP_BYTES].cast("d")
        if not 0 <= slot < workers:
            raise ValueError(f"worker slot {slot} outside the census of {workers} workers")
        self.slot = slot
        self.counts[slot] = self.requests[slot] = 0  # a replacement worker starts afresh
        self._last_close = float("-inf")

    def add(self, delta: int) -> None:
        """Count ``delta`` more connections of this worker."""
        self.counts[self.slot] += delta  # only this process writes its slot

    def add_request(self, delta: int) -> None:
        """Count ``delta`` more requests in flight in this worker (and stamp the time when that makes two or more)."""
        self.requests[self.slot] += delta
        if delta > 0 and sum(self.requests) > 1:
            self._together_at[0] = time.monotonic()  # a torn write is impossible: an aligned 8-byte store

    def alone(self, for_s: float, now: float | None = None) -> bool:
        """True when at most one request is in flight in the whole server, and has been for ``for_s`` seconds."""
        now = time.monotonic() if now is None else now
        return sum(self.requests) <= 1 and now - self._together_at[0] > for_s

    def crowded(self) -> bool:
        """True when this worker holds at least two connections, and an eighth, more than the least loaded one."""
        counts = self.counts.tolist()
        mine = counts.pop(self.slot)
        return bool(counts) and mine - min(counts) >= max(2, mine // 8)

    def close_one(self, now: float | None = None) -> bool:
        """Whether to close the connection whose response is going out: crowded, and none closed just before."""
        now = time.monotonic() if now is None else now
        if now - self._last_close < CLOSE_INTERVAL_S or not self.crowded():
            return False
        self._last_close = now
        return True


#: Set in each API worker by :func:`join`; None elsewhere and when the census is unavailable.
CENSUS: Census | None = None


def count_request(delta: int) -> None:
    """``delta`` more requests in flight in this worker (no-op without a census)."""
    if CENSUS is not None:
        CENSUS.add_request(delta)


def alone(for_s: float) -> bool:
    """Whether the request in flight in this worker is the only one in the server, and has been for ``for_s``
    seconds (False without a census: the other workers cannot be seen)."""
    return CENSUS is not None and CENSUS.alone(for_s)


def join(worker_index: int | None) -> None:
    """In an API worker: take slot ``worker_index`` (BentoML's, from 1) of the census the supervisor created."""
    global CENSUS
    path = os.environ.get(CENSUS_FILE)
    if not path or not worker_index:
        return
    try:
        CENSUS = Census(path, worker_index - 1)
    except (OSError, ValueError) as exc:  # serving goes on; connections are just not balanced
        log.warning("connection balancing off: %s", exc)
