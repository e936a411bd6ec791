"""The threads of an API worker that decode images and run the model, taking the requests' images in turn.

A plain thread pool runs its jobs in the order they came: the 64 images of one batch request would all be decoded
before a single photo sent just after them. :class:`FairPool` keeps a queue per request and takes one job from
each request with work waiting, round robin, so a request waits for at most one image of each request ahead of
it, however many images those carry.
"""

from __future__ import annotations

import collections
import logging
import threading
import typing as t

log = logging.getLogger(__name__)


class FairPool:
    """``threads`` daemon threads running ``submit(owner, fn, *args)`` jobs, one owner's job at a time in turn.

    A job goes to the thread that went idle last: at one request at a time the same thread decodes and runs the
    model every time, with its caches (and onnxruntime's per-thread state) warm, as in a plain thread pool.
    """

    def __init__(self, threads: int, name: str = "worker"):
        self._lock = threading.Lock()
        self._queues: dict[t.Hashable, collections.deque] = {}
        self._turns: collections.deque[t.Hashable] = collections.deque()  # owners with jobs waiting, in turn
        self._idle: list[threading.Lock] = []  # each idle thread sleeps on its own lock, held until it is woken
        self._closed = False
        for i in range(threads):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    def submit(self, owner: t.Hashable, fn: t.Callable[..., None], *args: t.Any) -> None:
        """Run ``fn(*args)`` in a pool thread, in ``owner``'s turn. ``fn`` reports its own result and errors."""
        with self._lock:
            jobs = self._queues.get(owner)
            if jobs is None:
                jobs = self._queues[owner] = collections.deque()
                self._turns.append(owner)
            jobs.append((fn, args))
            wake = self._idle.pop() if self._idle else None
        if wake is not None:
            wake.release()

    def close(self) -> None:
        """Stop the threads once the jobs submitted so far are done (they are daemons: exit does not wait)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for wake in idle:
            wake.release()

    def _next(self) -> tuple[t.Callable[..., None], tuple] | None:
        if not self._turns:
            return None
        owner = self._turns.popleft()
        jobs = self._queues[owner]
        job = jobs.popleft()
        if jobs:
            self._turns.append(owner)
        else:
            del self._queues[owner]
        return job

    def _work(self) -> None:
        wake = threading.Lock()
        wake.acquire()
        while True:
            with self._lock:
                job = self._next()
                if job is None:
                    if self._closed:
                        return
                    self._idle.append(wake)
            if job is None:
                wake.acquire()  # until submit() or close() releases it
                continue
            fn, args = job
            try:
                fn(*args)
            except Exception:  # a job reports its own errors; this one escaped, and the thread stays
                log.exception("a job of %s failed", threading.current_thread().name)
