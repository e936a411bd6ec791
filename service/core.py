"""The serving core: an upload's bytes in, its answer out, with no web framework in between.

:class:`Classifier` takes each request through its stages, each in a module named after it:

1. **admission** (``service/admission.py``): taken on, or refused with 503 when the worker is full or the wait
   would be too long; then a deadline (504) for everything below.
2. **decoding** (``service/decoding.py``): in one of the worker's threads (``service/threads.py``, which takes the
   requests' images in turn), the header is read and the cost known before anything is decoded; an ordinary image
   is decoded there and then, a costly one in the slow lane.
3. **batching** (``service/batching.py``): the thread that decoded an image hands it to the model with whatever
   other images are waiting; the model (``service/session.py``) runs in this process, or in the model process.
4. **answers** (``service/answers.py``): the top labels, the unfamiliar score, the metrics and the log record.

Every refusal is an :class:`~imgcls.errors.ApiError`; the API methods (``service/service.py``) turn neither
bytes into requests nor answers into responses beyond what BentoML does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import typing as t
import uuid
from dataclasses import dataclass

import numpy as np

from imgcls.errors import ApiError
from imgcls.preprocess import DecodeLimits, PreprocessSpec
from service import decoding, metrics
from service.admission import Admission, Ticket
from service.answers import Answerer
from service.batching import Batcher, Run, settle
from service.settings import Plan, Settings, cpu_count
from service.threads import FairPool

log = logging.getLogger(__name__)

#: What a worker thread answers for an image that must be decoded in the slow lane.
COSTLY = "costly"
INTERNAL = "The server failed to classify this image; it is logged. Retry, or report it."


@dataclass
class _Image:
    """One image of a request, from its bytes to the model's row, as the worker thread fills it in."""

    data: bytes
    done: concurrent.futures.Future  # the model's rows, COSTLY, or the ApiError
    pixels: np.ndarray | None = None
    stats: dict[str, float] | None = None
    decode_seconds: float = 0.0


@dataclass
class Classified:
    """An image through the model: its input pixels, drift statistics and output row."""

    pixels: np.ndarray
    stats: dict[str, float]
    rows: np.ndarray


class Classifier:
    """``await classifier.classify(image, top_k, source)``: the answer for one upload (see the module)."""

    def __init__(
        self,
        spec: PreprocessSpec,
        limits: DecodeLimits,
        admission: Admission,
        batcher: Batcher,
        answerer: Answerer,
        threads: int,
        timeout_s: float,
        costly_units: int = decoding.COSTLY_UNITS,
        new_id: t.Callable[[], str] = lambda: uuid.uuid4().hex,
    ):
        self.spec, self.limits, self.costly_units, self.new_id = spec, limits, costly_units, new_id
        self.admission, self.batcher, self.answerer = admission, batcher, answerer
        self.timeout_s = timeout_s
        self.threads = FairPool(threads, "decode")
        self.slow_lane = decoding.SlowLane(spec, limits)

    @classmethod
    def for_settings(
        cls, spec: PreprocessSpec, run: Run, answerer: Answerer, settings: Settings, plan: Plan, new_id: t.Callable
    ) -> Classifier:
        """The core of an API worker: ``run`` is the model in this process, or the hop to the model process;
        ``new_id`` makes request ids."""
        wait_s = settings.max_latency_ms / 1000
        threads, in_flight = settings.decode_threads, 1
        if plan.shared_model:
            in_flight = settings.hop_in_flight
            threads += in_flight  # a thread waits on each hop in flight
        return cls(
            spec,
            settings.decode_limits,
            Admission(
                settings.max_concurrency, wait_s, max(1.0, cpu_count() / plan.api_workers), settings.retry_after_s
            ),
            Batcher(run, plan.max_batch_size, in_flight, wait_s, settings.retry_after_s),
            answerer,
            threads,
            settings.timeout_s,
            new_id=new_id,
        )

    async def classify(self, image: bytes, top_k: int, source: str) -> dict:
        """The answer for one upload: labels, scores, unfamiliar, model, request id; ApiError when refused."""
        request_id = self.new_id()
        [outcome] = await self.infer([image])
        if isinstance(outcome, ApiError):
            raise outcome
        [result] = self.answerer.answer(outcome.rows, [outcome.stats], [outcome.pixels], top_k, [request_id], source)
        return {**result, "model": self.answerer.tag, "request_id": request_id}

    async def classify_batch(self, images: list[bytes], top_k: int, source: str) -> dict:
        """The answers for several uploads, in order; an image refused for what it is (4xx) gets its error in its
        place, while a refusal of the request (overloaded, deadline) is raised."""
        request_id = self.new_id()
        outcomes = await self.infer(images)
        for outcome in outcomes:
            if isinstance(outcome, ApiError) and outcome.status >= 500:
                raise outcome
        ok = [i for i, o in enumerate(outcomes) if isinstance(o, Classified)]
        results: list[dict | None] = [None] * len(images)
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, ApiError):
                metrics.reject(outcome.code)
                results[i] = {"error": outcome.code, "detail": f"Image {i + 1}: {outcome.detail}"}
        if ok:
            done = [outcomes[i] for i in ok]
            answers = self.answerer.answer(
                np.concatenate([c.rows for c in done]), [c.stats for c in done], [c.pixels for c in done], top_k,
                [f"{request_id}/{i}" for i in ok], source,
            )  # fmt: skip
            for i, answer in zip(ok, answers, strict=True):
                results[i] = answer
        return {"results": results, "model": self.answerer.tag, "request_id": request_id}

    async def infer(self, images: list[bytes]) -> list[Classified | ApiError]:
        """Each upload admitted, decoded and through the model within the deadline; what went wrong with an image
        in its place. ApiError (503, 504) when the request as a whole is refused."""
        ticket = self.admission.admit(len(images))
        owner = object()  # this request's turn among the worker threads
        try:
            async with asyncio.timeout(self.timeout_s):
                if len(images) == 1:  # no task of its own
                    return [await self._one(images[0], owner, ticket)]
                outcomes = await asyncio.gather(*(self._one(data, owner, ticket) for data in images))
        except TimeoutError:
            raise ApiError(
                504,
                "timeout",
                f"The request was not processed within {self.timeout_s:g} s (IMGCLS_TIMEOUT_S); retry later.",
            ) from None
        finally:
            ticket.close()
        return outcomes

    async def _one(self, data: bytes, owner: object, ticket: Ticket) -> Classified | ApiError:
        image = _Image(data, concurrent.futures.Future())
        try:
            self.threads.submit(owner, self._decode_and_run, image)
            rows = await asyncio.wrap_future(image.done)  # cancelled with the request: the thread skips it
            if isinstance(rows, str):  # COSTLY: the slow lane's time is its own, not the worker threads'
                start = time.perf_counter()
                image.pixels, image.stats = await self.slow_lane.decode(data)
                metrics.get().preprocess_seconds.observe(time.perf_counter() - start)
                ran: concurrent.futures.Future = concurrent.futures.Future()
                self.threads.submit(owner, self.batcher.submit, image.pixels[None], ran)
                rows = await asyncio.wrap_future(ran)
            return Classified(image.pixels, image.stats, rows)
        except ApiError as err:
            return err
        except Exception:  # a failure no input explains (the model's, or a decoder's): logged, answered 500
            log.exception("classifying an image failed")
            return ApiError(500, "internal_error", INTERNAL)
        finally:
            ticket.done_one(image.decode_seconds + self.batcher.seconds_per_image)

    def _decode_and_run(self, image: _Image) -> None:
        """In a worker thread: decode an ordinary image and hand it to the model; leave a costly one to the slow
        lane."""
        if image.done.done():  # the request gave up while this waited for a thread
            return
        start = time.perf_counter()
        try:
            probed = decoding.probe(image.data, self.spec, self.limits)
            if probed.cost.units > self.costly_units:
                settle(image.done, COSTLY)
                return
            self.slow_lane.last_ordinary = time.monotonic()
            image.pixels, image.stats = decoding.decode(probed, self.spec)
        except Exception as exc:  # ApiError for a bad upload; anything else is logged where it is awaited
            settle(image.done, exc=exc)
            return
        image.decode_seconds = time.perf_counter() - start
        metrics.get().preprocess_seconds.observe(image.decode_seconds)
        self.batcher.submit(image.pixels[None], image.done)

    def close(self) -> None:
        self.threads.close()
        self.slow_lane.close()
