"""Decoding uploads: the header read and the cost known before anything is decoded, costly images in a lane of their
own that a request that gives up can stop.

Everything here runs off the event loop. :func:`probe` reads an upload's header and structure and tells what its
decode will cost (``imgcls/preprocess.py``: pixels, scans, coded bytes, memory): over the budget it is refused with
413, and over ``costly_units`` it is costly. :func:`decode` then produces the model input and the drift statistics;
an ordinary image is decoded by the API worker's thread that probed it.

A costly image goes to the :class:`SlowLane`: one decode at a time per worker, in a child process that Linux runs
only on CPU time nothing else wants (SCHED_IDLE), and that rests, while ordinary images are being decoded too, nine
times as long as each costly decode took: a tenth of a core. Priority alone is not enough, as a costly decode floods
the caches ordinary requests run in and, on virtual CPUs that are hyperthreads of one core, its execution units. A
process, not a thread: a request that reaches its deadline kills its decode there, and a low-priority thread holding
the interpreter's lock while it waits for the CPU would stall the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import time
import typing as t
from dataclasses import dataclass

import numpy as np
from PIL import Image

from imgcls.errors import ApiError
from imgcls.imagestats import image_stats
from imgcls.preprocess import (
    DecodeCost,
    DecodeLimits,
    PreprocessSpec,
    open_image,
    plan_decode,
    resize,
    to_rgb,
    upright_size,
)

log = logging.getLogger(__name__)

#: Decodes costing more than this (in decoded pixels' worth) take the slow lane: a 12 MP phone JPEG costs about
#: 3 million, a 1024x768 WebP under 1 million, a 4000x4000 PNG 16 million (docs/reliability.md).
COSTLY_UNITS = 4_000_000
#: The share of one core the slow lane may use while ordinary images are decoded too.
SLOW_LANE_CPU_SHARE = 0.1
#: Ordinary traffic is "there" when an ordinary image was decoded within this many seconds.
RECENT_S = 1.0

Decoded = tuple[np.ndarray, dict[str, float]]  # the model input (uint8 HWC) and the drift statistics


@dataclass
class Probe:
    """An upload whose header has been read: what :func:`decode` needs, and what it will cost."""

    img: Image.Image
    size: tuple[int, int]  # upright, before any reduced-scale decoding
    cost: DecodeCost


def probe(data: bytes, spec: PreprocessSpec, limits: DecodeLimits) -> Probe:
    """Read the header and structure of an upload and plan its decode; 4xx for a bad or too costly upload."""
    img = open_image(data, limits)
    size = upright_size(img)  # before draft shrinks img.size
    return Probe(img, size, plan_decode(img, spec, limits, data))


def decode(probed: Probe, spec: PreprocessSpec) -> Decoded:
    """The model input and statistics of a probed upload."""
    pixels = resize(to_rgb(probed.img, spec), spec)
    return pixels, image_stats(pixels, probed.size)


def decode_bytes(data: bytes, spec: PreprocessSpec, limits: DecodeLimits) -> Decoded:
    """:func:`probe` then :func:`decode` (the slow lane's job)."""
    return decode(probe(data, spec, limits), spec)


def _lane_main(conn: t.Any, spec: PreprocessSpec, limits: DecodeLimits, worker: int) -> None:
    """The slow lane's process: decode what comes down ``conn`` until it closes; runs only on idle CPU."""
    from service.lifecycle import die_with_parent

    die_with_parent(worker)
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19)
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        start = time.process_time()
        try:
            pixels, stats = decode_bytes(data, spec, limits)
            conn.send((pixels, stats, time.process_time() - start))
        except ApiError as err:
            conn.send(err)


class SlowLane:
    """``await lane.decode(data)``: a costly upload decoded in the lane's process, one at a time (see the module).

    A caller that gives up (its deadline, a disconnect) while its image is being decoded kills the process, so the
    CPU is free within moments; the next costly image starts a new one.
    """

    def __init__(self, spec: PreprocessSpec, limits: DecodeLimits):
        self.spec, self.limits = spec, limits
        self._turn = asyncio.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: t.Any = None
        self.last_ordinary = float("-inf")  # when an ordinary image was last decoded (set by the caller)

    def _start(self) -> None:
        # spawn, not fork: the worker runs threads (onnxruntime's, the log writer's) that a fork would copy mid-step
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        args = (child, self.spec, self.limits, os.getpid())
        self._process = context.Process(target=_lane_main, args=args, daemon=True)
        self._process.start()
        child.close()
        self._conn = parent

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(timeout=5)
            self._conn.close()
        self._process = self._conn = None

    async def decode(self, data: bytes) -> Decoded:
        async with self._turn:
            if self._process is None or not self._process.is_alive():
                self._kill()
                self._start()
            conn, fd = self._conn, self._conn.fileno()
            loop = asyncio.get_running_loop()
            readable = loop.create_future()
            loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
            finished = False
            try:
                await loop.run_in_executor(None, conn.send_bytes, data)  # blocks while a new lane starts
                await readable
                result = conn.recv()
                finished = True
            except (EOFError, OSError):  # the lane died decoding it (a decoder crash, or the kernel's OOM killer)
                result = ApiError(400, "undecodable_image", "Decoding the image failed; send a JPEG, PNG or WebP.")
            finally:
                loop.remove_reader(fd)
                if not finished:  # the lane died, or the request gave up (cancelled): its decode stops now
                    self._kill()
            if isinstance(result, ApiError):
                raise result
            pixels, stats, cpu = result
            if time.monotonic() - self.last_ordinary < RECENT_S:
                await asyncio.sleep(cpu * (1 / SLOW_LANE_CPU_SHARE - 1))
            return pixels, stats

    def close(self) -> None:
        self._kill()
