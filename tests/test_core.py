"""The serving core without a server: admission, the worker threads, decoding and its slow lane, batching, answers.

The model is a stand-in (``FakeModel``: row i of its output echoes input row i) wherever what is tested is the
pipeline around it; the decoders, the slow lane's process and the answers are the real ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from imgcls import ood
from imgcls.errors import ApiError
from imgcls.inference_log import InferenceLogWriter, log_files, parse_line
from imgcls.ood import OodDetector
from imgcls.preprocess import DecodeLimits, PreprocessSpec
from service import decoding
from service.admission import Admission
from service.answers import Answerer
from service.batching import Batcher
from service.core import Classifier
from service.threads import FairPool
from tests.helpers import costly_webp, encode, jpeg, photo, png_bomb

SPEC = PreprocessSpec(size=16)
LABELS = ["a", "b", "c"]
EMBEDDING = 4


def run(coro):
    return asyncio.run(coro)


class FakeModel:
    """Stands in for a session: [N, 3 probabilities + 4 embedding] from the first pixels of each image; each run
    takes ``delay`` s and is recorded."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.batches = delay, []

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        self.batches.append(len(pixels))
        time.sleep(self.delay)
        flat = pixels.reshape(len(pixels), -1)[:, : len(LABELS) + EMBEDDING].astype(np.float32) + 1
        flat[:, : len(LABELS)] /= flat[:, : len(LABELS)].sum(axis=1, keepdims=True)
        return flat


def detector() -> OodDetector:
    rng = np.random.default_rng(0)
    train, heldout = rng.normal(size=(200, EMBEDDING)), rng.normal(size=(50, EMBEDDING))
    alone = ood.CANDIDATES[0]  # the embedding alone: the fake model's statistics mean nothing
    return ood.fit(train, np.zeros((200, 0)), rng.integers(0, 3, 200), heldout, np.zeros((50, 0)), candidate=alone)


def classifier(tmp_path: Path, model: FakeModel, **options) -> Classifier:
    opts = dict(max_concurrency=64, max_wait_s=10.0, threads=2, timeout_s=10.0, limits=DecodeLimits()) | options
    log = InferenceLogWriter(tmp_path / "log", flush_interval=0.05)
    answerer = Answerer("tag:1", "int8", LABELS, detector(), log)
    return Classifier(
        SPEC,
        opts["limits"],
        Admission(opts["max_concurrency"], opts["max_wait_s"], 1.0, retry_after_s=2),
        Batcher(model.infer, max_batch_size=8, max_wait_s=opts["max_wait_s"]),
        answerer,
        opts["threads"],
        opts["timeout_s"],
    )


def test_an_upload_goes_through_every_stage_and_is_answered_and_logged(tmp_path):
    core = classifier(tmp_path, FakeModel())
    result = run(core.classify(jpeg(), top_k=2, source="production"))
    assert result["label"] in LABELS and len(result["top_k"]) == 2 and result["model"] == "tag:1"
    assert isinstance(result["unfamiliar"], bool) and len(result["request_id"]) == 32
    core.answerer.inference_log.close()
    [record] = [parse_line(line) for f in log_files(tmp_path / "log") for line in f.read_text().splitlines()]
    assert record["request_id"] == result["request_id"] and record["label"] == result["label"]


def test_a_batch_answers_in_order_with_refusals_in_place(tmp_path):
    core = classifier(tmp_path, FakeModel())
    images = [jpeg(), b"not an image", encode(photo(40, 30), "PNG"), b""]
    result = run(core.classify_batch(images, top_k=1, source="loadtest"))
    errors = [r.get("error") for r in result["results"]]
    assert errors == [None, "undecodable_image", None, "empty_image"]
    assert result["results"][1]["detail"].startswith("Image 2:")


def test_bad_uploads_are_refused_with_the_error_the_client_can_act_on(tmp_path):
    core = classifier(tmp_path, FakeModel(), limits=DecodeLimits(max_pixels=1_000_000, max_decode_pixels=500_000))
    truncated = jpeg(900, 900)[:1500] + b"\xff\xd9"  # declares 900x900, holds a strip of it
    for data, status, code in [
        (b"", 400, "empty_image"),
        (b"\x89PNG\r\n\x1a\n garbage", 400, "undecodable_image"),
        (png_bomb(), 413, "too_many_pixels"),
        (costly_webp(800), 413, "too_costly_to_decode"),
        (truncated, 400, "undecodable_image"),
    ]:
        with pytest.raises(ApiError) as caught:
            run(core.classify(data, 1, "production"))
        assert (caught.value.status, caught.value.code) == (status, code), caught.value.detail


def test_a_full_worker_and_a_long_wait_are_refused_at_once_with_retry_after(tmp_path):
    core = classifier(tmp_path, FakeModel(delay=0.2), max_concurrency=2, threads=1)

    async def go():
        return await asyncio.gather(*(core.classify(jpeg(), 1, "production") for _ in range(5)), return_exceptions=True)

    results = run(go())
    refused = [r for r in results if isinstance(r, ApiError)]
    assert len(refused) == 3 and all((r.status, r.code, r.retry_after) == (503, "overloaded", 2) for r in refused)
    assert "IMGCLS_MAX_CONCURRENCY" in refused[0].detail

    admission = Admission(64, max_wait_s=0.5, retry_after_s=1)
    admission.seconds_per_image = 0.1
    held = admission.admit(4)  # 0.4 s of images ahead of the next one
    assert admission.admit(1).remaining == 1  # 0.5 s: just within
    with pytest.raises(ApiError, match="IMGCLS_MAX_LATENCY_MS") as caught:
        admission.admit(3)  # three images of the first and the one of the second ahead of its last: 0.7 s
    assert caught.value.retry_after >= 1
    held.close()


def test_a_request_past_its_deadline_gets_504_and_leaves_nothing_running(tmp_path):
    model = FakeModel(delay=0.3)
    core = classifier(tmp_path, model, timeout_s=0.2, threads=1)

    async def go():
        return await asyncio.gather(*(core.classify(jpeg(), 1, "production") for _ in range(4)), return_exceptions=True)

    results = run(go())
    assert all(isinstance(r, ApiError) and (r.status, r.code) == (504, "timeout") for r in results)
    time.sleep(0.5)
    assert model.batches == [1]  # the images still waiting when the deadline passed were never run
    assert not core.admission.admitted


def test_the_images_of_a_big_batch_do_not_queue_ahead_of_a_single_photo(tmp_path):
    model = FakeModel(delay=0.005)
    core = classifier(tmp_path, model, threads=1)

    async def go():
        batch = asyncio.ensure_future(core.classify_batch([jpeg()] * 64, 1, "production"))
        await asyncio.sleep(0.02)
        started = time.monotonic()
        await core.classify(jpeg(), 1, "production")
        single = time.monotonic() - started
        await batch
        return single, time.monotonic() - started

    single, batch_done = run(go())
    assert single < batch_done / 4  # taken in turn, not after the 64 images queued before it


def test_the_worker_threads_take_the_requests_jobs_in_turn():
    pool = FairPool(1)
    order, gate = [], threading.Event()
    pool.submit("first", gate.wait)  # holds the only thread while the rest is queued
    for i in range(3):
        pool.submit("batch", order.append, f"batch-{i}")
    pool.submit("single", order.append, "single")
    pool.submit("batch", order.append, "batch-3")
    gate.set()
    deadline = time.monotonic() + 5
    while len(order) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert order == ["batch-0", "single", "batch-1", "batch-2", "batch-3"]
    pool.close()


def test_a_costly_image_is_decoded_in_the_slow_lane_with_the_same_result(tmp_path):
    core = classifier(tmp_path, FakeModel())
    core.costly_units = 100  # every image is costly
    image = encode(photo(120, 90), "PNG")
    slow = run(core.infer([image]))[0]
    core.costly_units = 10**9
    fast = run(core.infer([image]))[0]
    assert np.array_equal(slow.pixels, fast.pixels) and slow.stats == fast.stats
    lane = core.slow_lane._process
    assert lane is not None and lane.is_alive() and psutil.Process(lane.pid).ppid() != 0
    core.close()
    assert not lane.is_alive()


def test_a_slow_lane_decode_stops_when_its_request_gives_up(tmp_path):
    """The lane's process is killed at the deadline, so its CPU is free at once, not when the decode would end."""
    core = classifier(tmp_path, FakeModel(), timeout_s=0.5, limits=DecodeLimits(10**9, 10**9))
    core.costly_units = 100
    bomb = costly_webp(9000)  # seconds of CPU to decode

    async def go():
        with pytest.raises(ApiError) as caught:
            await core.classify(bomb, 1, "production")
        return caught.value

    started = time.monotonic()
    err = run(go())
    assert (err.status, err.code) == (504, "timeout") and time.monotonic() - started < 2
    assert core.slow_lane._process is None  # killed, not left decoding
    result = run(core.classify(jpeg(), 1, "production"))  # the next costly image starts a new lane
    assert result["label"] in LABELS
    core.close()


def test_batcher_runs_a_lone_call_at_once_and_batches_what_arrives_meanwhile():
    model = FakeModel(delay=0.1)
    batcher = Batcher(model.infer, max_batch_size=8, max_wait_s=10)
    first = concurrent.futures.Future()
    leader = threading.Thread(target=batcher.submit, args=(np.zeros((1, 2, 2, 3), np.uint8), first))
    leader.start()
    time.sleep(0.03)  # the first call is running in the leader's thread
    later = [concurrent.futures.Future() for _ in range(3)]
    for i, done in enumerate(later):
        started = time.monotonic()
        batcher.submit(np.full((1, 2, 2, 3), i + 1, np.uint8), done)
        assert time.monotonic() - started < 0.05 and not done.done()  # queued, not waited for
    leader.join(5)
    assert model.batches == [1, 3] and first.result().shape == (1, len(LABELS) + EMBEDDING)
    assert [done.result().shape[0] for done in later] == [1, 1, 1]
    assert batcher._in_flight == 0 and batcher.seconds_per_image > 0


def test_batcher_gives_a_model_error_to_every_caller_in_the_call_and_keeps_serving():
    calls = []

    def broken(pixels):
        calls.append(len(pixels))
        time.sleep(0.02)
        if len(calls) <= 2:
            raise RuntimeError("onnxruntime failed")
        return np.zeros((len(pixels), 2), np.float32)

    batcher = Batcher(broken, max_batch_size=8, max_wait_s=10)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [concurrent.futures.Future() for _ in range(4)]
        for done in futures:
            pool.submit(batcher.submit, np.zeros((1, 2), np.uint8), done)
        concurrent.futures.wait(futures, 5)
        assert all(isinstance(done.exception(), RuntimeError) for done in futures)
        after = concurrent.futures.Future()
        batcher.submit(np.zeros((1, 2), np.uint8), after)
    assert after.result().shape == (1, 2)


def test_batcher_sheds_past_max_wait_and_is_back_to_idle_after_a_burst():
    model = FakeModel(delay=0.02)
    batcher = Batcher(model.infer, max_batch_size=2, max_wait_s=0.1, retry_after_s=3)
    futures = [concurrent.futures.Future() for _ in range(60)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for done in futures:
            pool.submit(batcher.submit, np.zeros((1, 2, 2, 3), np.uint8), done)
    concurrent.futures.wait(futures, 10)
    shed = [f.exception() for f in futures if f.exception() is not None]
    assert shed and all((e.status, e.code, e.retry_after) == (503, "overloaded", 3) for e in shed)
    started, done = time.monotonic(), concurrent.futures.Future()
    batcher.submit(np.zeros((1, 2, 2, 3), np.uint8), done)
    assert done.done() and time.monotonic() - started < 0.1  # nothing learned from the burst


def test_decode_cost_counts_scans_and_coefficients_of_a_progressive_jpeg():
    baseline = decoding.probe(jpeg(2000, 1500), SPEC, DecodeLimits())
    progressive = decoding.probe(encode(photo(2000, 1500), "JPEG", progressive=True), SPEC, DecodeLimits())
    assert baseline.cost.pixels == progressive.cost.pixels < 100_000  # both decode at 1/8 scale
    assert progressive.cost.work > 2 * baseline.cost.work and progressive.cost.memory > 2_000_000
    assert baseline.cost.units < decoding.COSTLY_UNITS
