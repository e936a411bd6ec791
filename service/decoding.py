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
        pixels, stats, _ = await self.decode(self.open(data))
        return pixels, stats

    def open(self, data: bytes) -> Opened:
        """Read the header (on the event loop: nothing is decoded yet) and tell the lane; 4xx for a bad upload."""
        img = open_image(data, self.limits)
        size = upright_size(img)  # before draft shrinks img.size
        return Opened(data, img, size, plan_decode(img, self.spec, self.limits) > self.costly_pixels)

    async def decode(
        self, opened: Opened, then: t.Callable[[np.ndarray], np.ndarray] | None = None
    ) -> tuple[np.ndarray, dict[str, float], np.ndarray | None]:
        """The pixels and statistics of an opened upload; an ordinary image with ``then`` also has
        ``then(pixels[None])`` run right after in the same thread (one hand-off instead of two), and the third item
        is what it returned (None otherwise: a costly image is decoded in its own lane, ``then`` is not run)."""
        loop = asyncio.get_running_loop()
        if opened.costly:
            start = time.perf_counter()
            async with self._costly_turn:
                pixels, stats, cpu = await loop.run_in_executor(
                    self.costly, decode, opened.data, self.spec, self.limits
                )
                if time.monotonic() - self._last_ordinary < RECENT_S:
                    await asyncio.sleep(cpu * (1 / COSTLY_CPU_SHARE - 1))
            seconds, out = time.perf_counter() - start, None
        else:
            self._last_ordinary = time.monotonic()
            pixels, stats, seconds, out = await loop.run_in_executor(
                self.fast, self._decode, opened.img, opened.size, then
            )
        metrics.get().preprocess_seconds.observe(seconds)
        return pixels, stats, out

    def _decode(
        self, img: Image.Image, size: tuple[int, int], then: t.Callable[[np.ndarray], np.ndarray] | None
    ) -> tuple[np.ndarray, dict[str, float], float, np.ndarray | None]:
        start = time.perf_counter()
        pixels = resize(to_rgb(img, self.spec), self.spec)
        stats = image_stats(pixels, size)
        seconds = time.perf_counter() - start
        return pixels, stats, seconds, None if then is None else then(pixels[None])

    def close(self) -> None:
        self.fast.shutdown(wait=False)
        self.costly.shutdown(wait=False, cancel_futures=True)
