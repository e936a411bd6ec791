"""Placement "shared": merging the concurrent model calls of one API worker into fewer hop requests.

Each hop request costs about 2-3 ms of CPU in BentoML's HTTP stack (measured on the 2-core box,
mostly in the model service), whatever its batch size. Under load a worker holds many requests at
once, so it sends at most ``max_in_flight`` hop requests at a time and packs whatever arrived in
the meantime into the next one. Nothing ever waits for company: with capacity free a call goes
out at once, so a lone request pays no extra latency. BentoML's adaptive batching in the model
service still merges the calls of all workers.
"""

from __future__ import annotations

import asyncio
import typing as t

import numpy as np

Call = t.Callable[[np.ndarray], t.Awaitable[np.ndarray]]


class Coalescer:
    """``await coalescer(batch)`` returns ``call(batch)``, sharing hop requests with concurrent callers."""

    def __init__(self, call: Call, max_batch_size: int, max_in_flight: int = 2):
        self.call, self.max_batch_size, self.max_in_flight = call, max_batch_size, max(1, max_in_flight)
        self._pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    async def __call__(self, batch: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((batch, future))
        self._send_what_fits()
        return await future

    def _send_what_fits(self) -> None:
        while self._pending and self._in_flight < self.max_in_flight:
            take, images = 0, 0
            while take < len(self._pending):
                size = len(self._pending[take][0])
                if take and images + size > self.max_batch_size:
                    break
                images += size
                take += 1
            group, self._pending = self._pending[:take], self._pending[take:]
            group = [(b, f) for b, f in group if not f.done()]  # callers that gave up (timeout) are dropped
            if not group:
                continue
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(group))
            self._tasks.add(task)  # keep a reference until done
            task.add_done_callback(self._tasks.discard)

    async def _send(self, group: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        try:
            batches = [b for b, _ in group]
            out = await self.call(batches[0] if len(batches) == 1 else np.concatenate(batches))
            start = 0
            for batch, future in group:
                if not future.done():
                    future.set_result(out[start : start + len(batch)])
                start += len(batch)
        except asyncio.CancelledError:
            for _, future in group:
                future.cancel()
            raise
        except Exception as exc:  # the callers see the hop's error as their own
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self._in_flight -= 1
            self._send_what_fits()
