"""A loaded model as the service runs it: one batch at a time, with metrics, batched by BentoML.

Two placements (``IMGCLS_PLACEMENT``, chosen in :mod:`service.app`):

- ``shared`` (the GPU default): one model service process; its batchable API calls :meth:`Model.infer`
  with the batches BentoML's adaptive batching formed from every API worker's calls.
- ``worker`` (the CPU default): every API worker holds a model, and :class:`InProcessBatching` batches
  that worker's concurrent requests with BentoML's own adaptive batching dispatcher (``CorkDispatcher``,
  the one behind ``@bentoml.api(batchable=True)``: same max batch size, max latency and load
  shedding), without the HTTP hop. On the 2-core box the hop cost about 1.6 ms of CPU per image
  (BentoML's HTTP stack at both ends, of ~13.6 ms per request in all). ResNet-18 int8, 500x375 JPEGs,
  back-to-back runs of ``python -m loadtest.run --scenario compare``: 192 req/s within the SLO
  (p99 100 ms) in the workers against 150 req/s (p99 170 ms) shared.

A slow batch runs in a thread, so the worker's event loop keeps reading and decoding uploads meanwhile
(onnxruntime and Pillow release the GIL); a fast one runs inline (see ``INLINE_BELOW_S``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import typing as t

import bentoml
import numpy as np

# Internal module, but the very dispatcher BentoML's batchable APIs use; bentoml is pinned in pyproject.toml.
from bentoml._internal.marshal.dispatcher import CorkDispatcher

from service import metrics
from service.runtime import Runtime

log = logging.getLogger(__name__)

#: A batch whose predecessor ran faster than this runs on the event loop itself: for a small model the thread
#: hand-off costs more than the overlap it buys (demo model on the 2-core box: 8% less CPU per request, 12% more
#: req/s). Slower batches run in a thread, so the worker keeps reading and decoding uploads meanwhile.
INLINE_BELOW_S = 0.002


def _overloaded() -> t.NoReturn:
    # What BentoML's server does when its dispatcher sheds a request: the API answers 503 + Retry-After.
    raise bentoml.exceptions.ServiceUnavailable("process is overloaded")


class Model:
    """``infer(batch)``: one batch through the session, counted in the metrics."""

    def __init__(self, runtime: Runtime, tag: str):
        self.runtime = runtime
        self.metrics = metrics.get()
        info = {"model": tag, "variant": runtime.variant, "provider": runtime.provider}
        self.metrics.model_info.labels(**info).set(1)
        log.info("serving %s: %s on %s", tag, runtime.model_file.name, runtime.provider)
        self.last_seconds = 0.0  # how long the last batch took in the session

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> float32 [N, classes + embedding]: probabilities, then the embedding."""
        start = time.perf_counter()
        probs, embedding = self.runtime.run(pixels)
        self.last_seconds = time.perf_counter() - start
        self.metrics.model_seconds.observe(self.last_seconds)
        self.metrics.batch_size.observe(len(pixels))
        return np.concatenate([probs, embedding], axis=1)


class InProcessBatching:
    """``await batching(pixels)``: ``model.infer`` for ``pixels``, batched with this process's concurrent calls."""

    def __init__(self, model: Model, max_batch_size: int, max_latency_ms: int):
        self.model = model
        self._dispatcher = CorkDispatcher(
            max_latency_ms, max_batch_size, fallback=_overloaded, get_batch_size=len, batch_dim=(0, 0)
        )
        self._batched = self._dispatcher(self._run_batches)

    async def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return await self._batched(pixels)

    async def _run_batches(self, batches: t.Sequence[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(b) for b in batches]
        pixels = np.concatenate(batches)
        # The batch's own time, not the await's: that would count the wait for a busy event loop to pick the
        # result up, and keep a loaded worker choosing the thread.
        if self.model.last_seconds < INLINE_BELOW_S:
            out = self.model.infer(pixels)
        else:
            out = await asyncio.to_thread(self.model.infer, pixels)
        return np.split(out, np.cumsum(sizes)[:-1])
