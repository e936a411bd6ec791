"""Opportunistic batching: concurrent requests share model calls, and a request never waits for company.

When a call slot is free, a request's images go to the model at once, alone. Requests that arrive while
every slot is busy wait, and go together as the next call (up to ``max_batch_size`` images): the busier the
model, the bigger the batches, with no queue delay and nothing learned that could outlast a burst (as
Triton's dynamic batcher behaves with no ``max_queue_delay``). Two batchers share that rule:

- a model in every API worker (:class:`ThreadBatcher`): one call at a time on the worker's own session, run by
  the thread that has just decoded an image, which then also runs what queued meanwhile;
- one shared model process (GPU, :class:`Batcher`, on the event loop): each API worker keeps ``hop_in_flight``
  hop calls going to it, and the model process batches the hop calls of all workers again with one call at a
  time on the GPU (:func:`in_process`).

Load shedding: an image that would wait longer than ``max_wait_s`` for the model (estimated from the
recent time per image) is refused at once with 503, and one that has waited that long is refused then.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
import typing as t
from dataclasses import dataclass

import numpy as np

from imgcls.errors import ApiError

Call = t.Callable[[np.ndarray], t.Awaitable[np.ndarray]]

#: A batch whose predecessor ran faster than this runs on the event loop itself: for a small model the thread
#: hand-off costs more than the overlap it buys (demo model on a 2-core box: 8% less CPU per request, 12% more
#: req/s). Slower batches run in a thread, so the worker keeps reading and decoding uploads meanwhile.
INLINE_BELOW_S = 0.002


class Model(t.Protocol):
    last_seconds: float

    def infer(self, pixels: np.ndarray) -> np.ndarray: ...


def in_process(model: Model) -> Call:
    """A call that runs ``model.infer`` in this process: inline when it is fast, else in a thread."""

    async def call(pixels: np.ndarray) -> np.ndarray:
        if model.last_seconds < INLINE_BELOW_S:
            return model.infer(pixels)
        return await asyncio.to_thread(model.infer, pixels)

    return call


@dataclass
class _Waiting:
    pixels: np.ndarray
    future: asyncio.Future | concurrent.futures.Future
    since: float


class _Queue:
    """The images waiting for the model, the estimate of their wait, and how the next batch is taken."""

    def __init__(self, max_batch_size: int, max_in_flight: int, max_wait_s: float, retry_after_s: int):
        self.max_batch_size, self.max_in_flight = max_batch_size, max(1, max_in_flight)
        self.max_wait_s, self.retry_after_s = max_wait_s, retry_after_s
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._waiting_images = 0
        self._running_images = 0
        self._in_flight = 0
        self._seconds_per_image = 0.0  # recent model time per image, for the shedding estimate

    def _timed(self, seconds: float, images: int) -> None:
        """Fold a call of ``images`` images that took ``seconds`` into the recent time per image."""
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * seconds / images

    def _expected_wait(self, images: int) -> float:
        """Seconds until ``images`` more would be done, after every image waiting or running now (a batch's time
        grows with its images)."""
        ahead = self._waiting_images + self._running_images + images
        return ahead * self._seconds_per_image / self.max_in_flight

    def _overloaded(self) -> ApiError:
        return ApiError(
            503,
            "overloaded",
            f"The model is saturated (an image would wait more than {self.max_wait_s * 1000:.0f} ms, "
            "IMGCLS_MAX_LATENCY_MS); retry after the number of seconds in Retry-After.",
            retry_after=self.retry_after_s,
        )

    def _take(self) -> tuple[list[_Waiting], int]:
        """The next batch from the front of the queue: up to ``max_batch_size`` images (a larger request goes
        alone), skipping callers that gave up and refusing those that waited past ``max_wait_s``."""
        now, group, images = time.monotonic(), [], 0
        while self._waiting:
            item = self._waiting[0]
            if group and images + len(item.pixels) > self.max_batch_size:
                break
            self._waiting.popleft()
            self._waiting_images -= len(item.pixels)
            if item.future.done():  # the caller gave up (timeout, disconnect)
                continue
            if now - item.since > self.max_wait_s:
                _settle(item.future, exc=self._overloaded())
                continue
            group.append(item)
            images += len(item.pixels)
        return group, images


def _settle(future: asyncio.Future | concurrent.futures.Future, result: t.Any = None, exc: Exception | None = None):
    """Give ``future`` its result or error, unless its caller has given up on it meanwhile."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except (asyncio.InvalidStateError, concurrent.futures.InvalidStateError):
        pass


class ThreadBatcher(_Queue):
    """Batching for a model in this process, run by the threads that decode: ``run(pixels, done)`` right after a
    decode, in its thread, or ``await batcher(pixels)`` from the event loop.

    A thread that finds the model free runs it at once on its own images, then on whatever queued meanwhile (up
    to ``max_batch_size`` images at a time) until nothing waits; one that finds it busy queues its images and is
    free again. So a request costs two thread hand-offs (to its decode thread and back with the answer), as in a
    plain thread-pool server, where a batcher on the event loop costs four (futex and eventfd wake-ups, measured in
    docs/benchmarks.md). ``model_for(images)`` picks the session for a batch.
    """

    def __init__(
        self,
        model_for: t.Callable[[int], Model],
        executor: concurrent.futures.Executor,
        max_batch_size: int,
        max_wait_s: float = 1.0,
        retry_after_s: int = 1,
    ):
        super().__init__(max_batch_size, 1, max_wait_s, retry_after_s)
        self.model_for, self.executor = model_for, executor
        self._lock = threading.Lock()

    async def __call__(self, pixels: np.ndarray) -> np.ndarray:
        done: concurrent.futures.Future = concurrent.futures.Future()
        self.executor.submit(self.run, pixels, done)
        return await asyncio.wrap_future(done)

    def run(self, pixels: np.ndarray, done: concurrent.futures.Future) -> None:
        """In a worker thread: ``done`` gets the model's rows for ``pixels`` (uint8 [N, S, S, 3]), computed now
        if the model is free, else by the thread running it once it is."""
        with self._lock:
            if self._in_flight:
                if self._expected_wait(len(pixels)) > self.max_wait_s:
                    _settle(done, exc=self._overloaded())
                    return
                self._waiting.append(_Waiting(pixels, done, time.monotonic()))
                self._waiting_images += len(pixels)
                return
            self._in_flight, self._running_images = 1, len(pixels)
        group = [_Waiting(pixels, done, 0.0)]
        try:
            while group:
                self._run(group, self._running_images)
                with self._lock:
                    group, self._running_images = self._take()
                    self._in_flight = 1 if group else 0
        except BaseException:  # not a model error (those go to the callers): the next caller takes over
            with self._lock:
                self._in_flight, self._running_images = 0, 0
            raise

    def _run(self, group: list[_Waiting], images: int) -> None:
        start = time.monotonic()
        try:
            batch = group[0].pixels if len(group) == 1 else np.concatenate([w.pixels for w in group])
            out = self.model_for(images).infer(batch)
        except Exception as exc:  # every caller in the call sees its error as their own
            for item in group:
                _settle(item.future, exc=exc)
            return
        with self._lock:
            self._timed(time.monotonic() - start, images)
        row = 0
        for item in group:
            _settle(item.future, out[row : row + len(item.pixels)])
            row += len(item.pixels)


class Batcher(_Queue):
    """``await batcher(pixels)`` is ``call(pixels)``, sharing calls with concurrent callers (see the module)."""

    def __init__(
        self, call: Call, max_batch_size: int, max_in_flight: int = 1, max_wait_s: float = 1.0, retry_after_s: int = 1
    ):
        super().__init__(max_batch_size, max_in_flight, max_wait_s, retry_after_s)
        self.call = call
        self._tasks: set[asyncio.Task] = set()

    async def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if self._in_flight >= self.max_in_flight and self._expected_wait(len(pixels)) > self.max_wait_s:
            raise self._overloaded()
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(pixels, future, time.monotonic()))
        self._waiting_images += len(pixels)
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        while self._waiting and self._in_flight < self.max_in_flight:
            group, images = self._take()
            if not group:
                continue
            self._in_flight += 1
            self._running_images += images
            task = asyncio.get_running_loop().create_task(self._run(group, images))
            self._tasks.add(task)  # keep a reference until done
            task.add_done_callback(self._tasks.discard)

    async def _run(self, group: list[_Waiting], images: int) -> None:
        start = time.monotonic()
        try:
            pixels = group[0].pixels if len(group) == 1 else np.concatenate([w.pixels for w in group])
            out = await self.call(pixels)
            self._timed(time.monotonic() - start, images)
            row = 0
            for item in group:
                if not item.future.done():
                    item.future.set_result(out[row : row + len(item.pixels)])
                row += len(item.pixels)
        except asyncio.CancelledError:
            for item in group:
                item.future.cancel()
            raise
        except Exception as exc:  # every caller in the call sees its error as their own
            for item in group:
                if not item.future.done():
                    item.future.set_exception(exc)
        finally:
            self._in_flight -= 1
            self._running_images -= images
            self._dispatch()
