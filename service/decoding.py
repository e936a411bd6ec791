"""Decoding uploads off the event loop, in two lanes, so a few costly images cannot starve everyone else.

The header is read on the event loop (microseconds: nothing is decoded) and tells what the decode will cost:
the pixels it must produce (JPEG at a reduced scale). Ordinary images go to the fast lane, ``threads`` decodes
at a time in this process. An image over ``costly_pixels`` goes to the costly lane: one decode at a time per
worker, in a process of its own that Linux runs only on CPU time nothing else wants (SCHED_IDLE), and while
ordinary images are being decoded too, the lane rests after each costly decode nine times as long as the decode
took: a tenth of a core per worker. Priority alone was not enough, as a costly decode floods the caches
ordinary requests run in and, on virtual CPUs that are hyperthreads of one core, its execution units (a normal
client kept 73-89% of its throughput beside four clients of costly images, with a quarter of a core). A
process, not a thread: a low-priority thread holding the interpreter's lock while it waits for the CPU stalls
the event loop behind it. Each lane bounds the decoded images held in memory at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import time
import typing as t
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from imgcls.imagestats import image_stats
from imgcls.preprocess import (
    DecodeLimits,
    PreprocessSpec,
    open_image,
    plan_decode,
    preprocess_bytes,
    resize,
    to_rgb,
    upright_size,
)
from service import metrics, supervision

log = logging.getLogger(__name__)

#: The share of one core the costly lane may use while ordinary images are decoded too.
COSTLY_CPU_SHARE = 0.1
#: Ordinary traffic is "there" when an ordinary image was decoded within this many seconds.
RECENT_S = 1.0
#: Decodes producing more pixels than this take the costly lane: a 12 MP phone JPEG decodes at 1/8 scale
#: (0.2 MP) and a 1024x768 WebP in full (0.8 MP); a 4000x4000 PNG (16 MP) takes about 0.25 s of CPU.
COSTLY_PIXELS = 4_000_000


def _start_costly_lane() -> None:
    """In the costly lane's process: die with the worker, and run only on CPU time nothing else wants (Linux's
    SCHED_IDLE policy, else nice 19)."""
    supervision.exit_with_supervisor(parent=os.getppid())
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.nice(19)
        except OSError as exc:
            log.warning("could not lower the costly decode lane's priority: %s", exc)


def decode(data: bytes, spec: PreprocessSpec, limits: DecodeLimits) -> tuple[np.ndarray, dict[str, float], float]:
    """The model input and statistics of one upload, and the CPU seconds they took (the costly lane's job)."""
    started = time.process_time()
    pixels, size = preprocess_bytes(data, spec, limits)
    return pixels, image_stats(pixels, size), time.process_time() - started


@dataclass
class Opened:
    """An upload whose header has been read: what :meth:`Decoder.decode` needs, and its lane."""

    data: bytes
    img: Image.Image
    size: tuple[int, int]  # upright, before any reduced-scale decoding
    costly: bool  # decoded in the costly lane


#: ``then(pixels, done)``, in the decoding thread: settles ``done`` with the model's rows for uint8 [1, S, S, 3].
Then = t.Callable[[np.ndarray, concurrent.futures.Future], None]


class Decoder:
    """``await decoder(data)``: the model input (uint8 HWC) and drift statistics of one upload."""

    def __init__(self, spec: PreprocessSpec, limits: DecodeLimits, threads: int, costly_pixels: int = COSTLY_PIXELS):
        self.spec, self.limits, self.costly_pixels = spec, limits, costly_pixels
        self.fast = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        # spawn, not fork: this worker runs threads (onnxruntime's, the log writer's) that a fork would copy mid-step
        self.costly = ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_costly_lane
        )
        self._costly_turn = asyncio.Lock()
        self._last_ordinary = float("-inf")

    async def __call__(self, data: bytes) -> tuple[np.ndarray, dict[str, float]]:
        return await self.decode(self.open(data))

    def open(self, data: bytes) -> Opened:
        """Read the header (on the event loop: nothing is decoded yet) and tell the lane; 4xx for a bad upload."""
        img = open_image(data, self.limits)
        size = upright_size(img)  # before draft shrinks img.size
        return Opened(data, img, size, plan_decode(img, self.spec, self.limits) > self.costly_pixels)

    async def decode(self, opened: Opened) -> tuple[np.ndarray, dict[str, float]]:
        """The pixels and statistics of an opened upload, from its lane."""
        if not opened.costly:
            self._last_ordinary = time.monotonic()
            pixels, stats, seconds = await asyncio.get_running_loop().run_in_executor(
                self.fast, self._decode, opened.img, opened.size
            )
            metrics.get().preprocess_seconds.observe(seconds)
            return pixels, stats
        start = time.perf_counter()
        async with self._costly_turn:
            pixels, stats, cpu = await asyncio.get_running_loop().run_in_executor(
                self.costly, decode, opened.data, self.spec, self.limits
            )
            if time.monotonic() - self._last_ordinary < RECENT_S:
                await asyncio.sleep(cpu * (1 / COSTLY_CPU_SHARE - 1))
        metrics.get().preprocess_seconds.observe(time.perf_counter() - start)
        return pixels, stats

    async def decode_then(self, opened: Opened, then: Then) -> tuple[np.ndarray, dict[str, float], np.ndarray]:
        """The pixels and statistics of an ordinary upload, and what ``then`` makes of its pixels in the thread
        that decoded them (the model's rows: :class:`service.batching.ThreadBatcher`), with one hand-off to the
        thread and one back."""
        if opened.costly:
            raise ValueError("a costly image is decoded in its own lane: use decode()")
        self._last_ordinary = time.monotonic()
        done: concurrent.futures.Future = concurrent.futures.Future()
        decoded: list = []
        self.fast.submit(self._decode_then, opened, then, done, decoded)
        rows = await asyncio.wrap_future(done)
        pixels, stats = decoded
        return pixels, stats, rows

    def _decode_then(self, opened: Opened, then: Then, done: concurrent.futures.Future, decoded: list) -> None:
        if done.cancelled():  # the caller gave up (its deadline) while this waited for a thread
            return
        try:
            pixels, stats, seconds = self._decode(opened.img, opened.size)
        except Exception as exc:  # ApiError for an image that turns out undecodable
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # given up on meanwhile
                done.set_exception(exc)
            return
        metrics.get().preprocess_seconds.observe(seconds)
        decoded += [pixels, stats]  # read by the event loop once ``done`` is settled
        then(pixels[None], done)

    def _decode(self, img: Image.Image, size: tuple[int, int]) -> tuple[np.ndarray, dict[str, float], float]:
        start = time.perf_counter()
        pixels = resize(to_rgb(img, self.spec), self.spec)
        return pixels, image_stats(pixels, size), time.perf_counter() - start

    def close(self) -> None:
        self.fast.shutdown(wait=False)
        self.costly.shutdown(wait=False, cancel_futures=True)
