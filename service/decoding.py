"""Decoding uploads off the event loop, in two lanes, so a few costly images cannot starve everyone else.

The header is read on the event loop (microseconds: nothing is decoded) and tells what the decode will cost:
the pixels it must produce (JPEG at a reduced scale). Ordinary images go to the fast lane, ``threads`` decodes
at a time. An image over ``costly_pixels`` goes to the costly lane: one decode at a time per worker, in a
thread at a lower CPU priority (nice +10), so it runs on what ordinary requests leave free instead of taking
their share. Each lane bounds the decoded images held in memory at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from imgcls.imagestats import image_stats
from imgcls.preprocess import DecodeLimits, PreprocessSpec, open_image, plan_decode, resize, to_rgb, upright_size
from service import metrics

log = logging.getLogger(__name__)

#: Decodes producing more pixels than this take the costly lane: a 12 MP phone JPEG decodes at 1/8 scale
#: (0.2 MP) and a 1024x768 WebP in full (0.8 MP); a 4000x4000 PNG (16 MP) takes about 0.25 s of CPU.
COSTLY_PIXELS = 4_000_000
#: How much lower the costly lane's priority is (Linux nice).
COSTLY_NICENESS = 10


def _lower_priority() -> None:
    """Run this thread at a lower CPU priority (Linux schedules threads one by one; elsewhere: no change)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), COSTLY_NICENESS)
    except (AttributeError, OSError) as exc:
        log.warning("could not lower the costly decode lane's priority: %s", exc)


class Decoder:
    """``await decoder(data)``: the model input (uint8 HWC) and drift statistics of one upload."""

    def __init__(self, spec: PreprocessSpec, limits: DecodeLimits, threads: int, costly_pixels: int = COSTLY_PIXELS):
        self.spec, self.limits, self.costly_pixels = spec, limits, costly_pixels
        self.fast = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.costly = ThreadPoolExecutor(1, thread_name_prefix="decode-costly", initializer=_lower_priority)

    async def __call__(self, data: bytes) -> tuple[np.ndarray, dict[str, float]]:
        start = time.perf_counter()
        img = open_image(data, self.limits)
        size = upright_size(img)  # before draft shrinks img.size
        pixels = plan_decode(img, self.spec, self.limits)
        lane = self.costly if pixels > self.costly_pixels else self.fast
        decoded = await asyncio.get_running_loop().run_in_executor(lane, self._decode, img, size)
        metrics.get().preprocess_seconds.observe(time.perf_counter() - start)
        return decoded

    def _decode(self, img: Image.Image, size: tuple[int, int]) -> tuple[np.ndarray, dict[str, float]]:
        pixels = resize(to_rgb(img, self.spec), self.spec)
        return pixels, image_stats(pixels, size)

    def close(self) -> None:
        self.fast.shutdown(wait=False)
        self.costly.shutdown(wait=False)
