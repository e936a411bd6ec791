"""Opportunistic batching: concurrent images share model calls, and an image never waits for company.

:meth:`Batcher.submit` is called from a worker thread with one image's pixels (or a few). When a call slot is free
the thread runs the model at once on them, then on whatever queued meanwhile (up to ``max_batch_size`` images a
call) until nothing waits; a thread that finds every slot busy queues its images and is free again, and the
thread that runs the next call settles its future. The busier the model, the bigger the batches, with no queue
delay and nothing learned that could outlast a burst (as Triton's dynamic batcher behaves with no
``max_queue_delay``). The thread that has just decoded an image runs the model with it, so a request costs one
thread hand-off each way, as in a plain thread-pool server.

``run`` is what a call does: the onnxruntime session in this process, or the hop to the model process
(``max_in_flight`` hops at a time). An image that would wait longer than ``max_wait_s`` for its call (estimated
from the recent time per image) is refused at once with 503, and one that has waited that long is refused then.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
import typing as t
from dataclasses import dataclass

import numpy as np

from imgcls.errors import ApiError

Run = t.Callable[[np.ndarray], np.ndarray]


@dataclass
class _Waiting:
    pixels: np.ndarray
    done: concurrent.futures.Future
    since: float


def settle(done: concurrent.futures.Future, result: t.Any = None, exc: BaseException | None = None) -> None:
    """Give ``done`` its result or error, unless its caller has given up on it meanwhile."""
    try:
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class Batcher:
    """``submit(pixels, done)``: ``done`` gets ``run``'s rows for ``pixels`` (uint8 [N, S, S, 3]), sharing calls with
    the images of concurrent callers (see the module)."""

    def __init__(
        self, run: Run, max_batch_size: int, max_in_flight: int = 1, max_wait_s: float = 1.0, retry_after_s: int = 1
    ):
        self.run, self.max_batch_size, self.max_in_flight = run, max_batch_size, max(1, max_in_flight)
        self.max_wait_s, self.retry_after_s = max_wait_s, retry_after_s
        self._lock = threading.Lock()
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._waiting_images = 0
        self._running_images = 0
        self._in_flight = 0
        self.seconds_per_image = 0.0  # recent model time per image, for the shedding estimate

    def submit(self, pixels: np.ndarray, done: concurrent.futures.Future) -> None:
        """In a worker thread: run now if a slot is free (then what queued meanwhile), else queue (see the module)."""
        with self._lock:
            if self._in_flight >= self.max_in_flight:
                if self._expected_wait(len(pixels)) > self.max_wait_s:
                    settle(done, exc=self._overloaded())
                    return
                self._waiting.append(_Waiting(pixels, done, time.monotonic()))
                self._waiting_images += len(pixels)
                return
            self._in_flight += 1
            self._running_images += len(pixels)
        group, images = [_Waiting(pixels, done, 0.0)], len(pixels)
        try:
            while group:
                self._call(group, images)
                with self._lock:
                    self._running_images -= images
                    group, images = self._take()
                    self._running_images += images
                    if not group:
                        self._in_flight -= 1
        except BaseException:  # not a model error (those go to the callers): let the next caller take over
            with self._lock:
                self._in_flight -= 1
                self._running_images -= images
            raise

    def _call(self, group: list[_Waiting], images: int) -> None:
        start = time.monotonic()
        try:
            batch = group[0].pixels if len(group) == 1 else np.concatenate([w.pixels for w in group])
            out = self.run(batch)
        except Exception as exc:  # every caller in the call sees its error as their own
            for item in group:
                settle(item.done, exc=exc)
            return
        with self._lock:
            self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * (time.monotonic() - start) / images
        row = 0
        for item in group:
            settle(item.done, out[row : row + len(item.pixels)])
            row += len(item.pixels)

    def _expected_wait(self, images: int) -> float:
        """Seconds until ``images`` more would be done, after every image waiting or running now."""
        ahead = self._waiting_images + self._running_images + images
        return ahead * self.seconds_per_image / self.max_in_flight

    def _overloaded(self) -> ApiError:
        return ApiError(
            503,
            "overloaded",
            f"The model is saturated (an image would wait more than {self.max_wait_s * 1000:.0f} ms, "
            "IMGCLS_MAX_LATENCY_MS); retry after the number of seconds in Retry-After.",
            retry_after=self.retry_after_s,
        )

    def _take(self) -> tuple[list[_Waiting], int]:
        """The next call's images from the front of the queue: up to ``max_batch_size`` (a larger submission goes
        alone), skipping callers that gave up and refusing those that waited past ``max_wait_s``."""
        now, group, images = time.monotonic(), [], 0
        while self._waiting:
            item = self._waiting[0]
            if group and images + len(item.pixels) > self.max_batch_size:
                break
            self._waiting.popleft()
            self._waiting_images -= len(item.pixels)
            if item.done.done():  # the caller gave up (deadline, disconnect)
                continue
            if now - item.since > self.max_wait_s:
                settle(item.done, exc=self._overloaded())
                continue
            group.append(item)
            images += len(item.pixels)
        return group, images
