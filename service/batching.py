"""Opportunistic batching: concurrent requests share model calls, and a request never waits for company.

When a call slot is free, a request's images go to the model at once, alone. Requests that arrive while
every slot is busy wait, and go together as the next call (up to ``max_batch_size`` images): the busier the
model, the bigger the batches, with no queue delay and nothing learned that could outlast a burst (as
Triton's dynamic batcher behaves with no ``max_queue_delay``). The same batcher serves both placements:

- a model in every API worker: one call at a time on the worker's own session (:func:`in_process`); a lone
  request that finds it idle may also run the model itself, in the thread that decoded its image
  (:meth:`Batcher.holding`), saving a thread hand-off;
- one shared model process (GPU): each API worker keeps ``hop_in_flight`` hop calls going to it, and the
  model process batches the hop calls of all workers again with one call at a time on the GPU.

Load shedding: an image that would wait longer than ``max_wait_s`` for the model (estimated from the
recent time per image) is refused at once with 503, and one that has waited that long is refused then.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
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
class Held:
    """A call slot taken with :meth:`Batcher.holding`."""

    seconds: float = 0.0  # the model time of the call made in it


@dataclass
class _Waiting:
    pixels: np.ndarray
    future: asyncio.Future
    since: float


class Batcher:
    """``await batcher(pixels)`` is ``call(pixels)``, sharing calls with concurrent callers (see the module)."""

    def __init__(
        self, call: Call, max_batch_size: int, max_in_flight: int = 1, max_wait_s: float = 1.0, retry_after_s: int = 1
    ):
        self.call, self.max_batch_size, self.max_in_flight = call, max_batch_size, max(1, max_in_flight)
        self.max_wait_s, self.retry_after_s = max_wait_s, retry_after_s
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._waiting_images = 0
        self._running_images = 0
        self._in_flight = 0
        self._seconds_per_image = 0.0  # recent model time per image, for the shedding estimate
        self._tasks: set[asyncio.Task] = set()

    async def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if self._in_flight >= self.max_in_flight and self._expected_wait(len(pixels)) > self.max_wait_s:
            raise self._overloaded()
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(pixels, future, time.monotonic()))
        self._waiting_images += len(pixels)
        self._dispatch()
        return await future

    def idle(self) -> bool:
        """A call slot is free and nobody waits: a caller may take it and run the model itself (:meth:`holding`)."""
        return self._in_flight < self.max_in_flight and not self._waiting

    @contextlib.contextmanager
    def holding(self, images: int) -> t.Iterator[Held]:
        """A call slot for a model call of ``images`` images that the caller runs itself; take it only when
        :meth:`idle`. Callers that arrive meanwhile wait, and go together when it is released. Set ``seconds`` on
        the yielded :class:`Held` to the call's model time, for the shedding estimate."""
        if not self.idle():
            raise RuntimeError("Batcher.holding() needs an idle batcher")
        self._in_flight += 1
        self._running_images += images
        held = Held()
        try:
            yield held
        finally:
            if held.seconds:
                self._timed(held.seconds, images)
            self._in_flight -= 1
            self._running_images -= images
            self._dispatch()

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

    def _dispatch(self) -> None:
        while self._waiting and self._in_flight < self.max_in_flight:
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
                    item.future.set_exception(self._overloaded())
                    continue
                group.append(item)
                images += len(item.pixels)
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
