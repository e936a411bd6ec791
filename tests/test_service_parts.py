"""Fast, in-process checks of the service's parts: the request guard, the hop's wire format, settings, model loading,
batching."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from service import runtime, wire
from service.coalesce import Coalescer
from service.errors import RequestGuard
from service.model import InProcessBatching, Model
from service.settings import Settings, SettingsError


def _app(delay: float = 0.0, status: int = 200, body: object = None) -> Starlette:
    async def handler(request):
        await request.body()
        await asyncio.sleep(delay)
        return JSONResponse(body if body is not None else {"ok": True}, status_code=status)

    return Starlette(routes=[Route("/classify", handler, methods=["POST"]), Route("/other", handler, methods=["POST"])])


def _guarded(app, **kw) -> httpx.AsyncClient:
    opts = dict(paths=["/classify"], max_body_bytes=1000, max_concurrency=4, timeout_s=5.0, retry_after_s=2) | kw
    transport = httpx.ASGITransport(app=RequestGuard(app, **opts))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def run(coro):
    return asyncio.run(coro)


def test_body_over_the_limit_is_refused_from_content_length():
    async def go():
        async with _guarded(_app()) as client:
            return await client.post("/classify", content=b"x" * 1001)

    resp = run(go())
    assert resp.status_code == 413
    assert resp.json()["error"] == "body_too_large"
    assert "IMGCLS_MAX_BODY_BYTES" in resp.json()["detail"]


def test_chunked_body_over_the_limit_is_refused_and_a_small_one_passes():
    async def chunks(n):
        for _ in range(n):
            yield b"x" * 300

    async def go():
        async with _guarded(_app()) as client:
            return await client.post("/classify", content=chunks(4)), await client.post("/classify", content=chunks(2))

    big, small = run(go())
    assert big.status_code == 413 and big.json()["error"] == "body_too_large"
    assert small.status_code == 200


def test_too_many_requests_in_flight_get_503_with_retry_after():
    async def go():
        async with _guarded(_app(delay=0.3), max_concurrency=2) as client:
            return await asyncio.gather(*(client.post("/classify", content=b"x") for _ in range(5)))

    responses = run(go())
    assert sorted(r.status_code for r in responses) == [200, 200, 503, 503, 503]
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "2"
    assert refused.json()["error"] == "overloaded"


def test_slow_request_gets_504_in_our_shape():
    async def go():
        async with _guarded(_app(delay=2.0), timeout_s=0.2) as client:
            return await client.post("/classify", content=b"x")

    resp = run(go())
    assert resp.status_code == 504
    assert resp.json()["error"] == "timeout" and "IMGCLS_TIMEOUT_S" in resp.json()["detail"]


def test_keepalive_connection_is_closed_after_its_request_quota():
    async def go():
        async with _guarded(_app(), keepalive_requests=3) as client:  # one client address: one connection
            return [await client.post("/classify", content=b"x") for _ in range(6)]

    closing = [r.headers.get("connection") == "close" for r in run(go())]
    assert closing == [False, False, True, False, False, True]


def test_foreign_error_bodies_are_rewritten_ours_pass_unchanged():
    validation = {"error": "1 validation error", "detail": [{"type": "missing", "loc": ["image"], "msg": "required"}]}

    async def go():
        async with _guarded(_app(status=400, body=validation)) as client:
            foreign = await client.post("/classify", content=b"x")
        async with _guarded(_app(status=400, body={"error": "empty_image", "detail": "d"})) as client:
            ours = await client.post("/classify", content=b"x")
        async with _guarded(_app(status=500, body={"error": "An unexpected error"})) as client:
            crash = await client.post("/classify", content=b"x")
        async with _guarded(_app(status=400, body=validation)) as client:
            unguarded = await client.post("/other", content=b"x")
        return foreign, ours, crash, unguarded

    foreign, ours, crash, unguarded = run(go())
    assert foreign.status_code == 400
    assert foreign.json()["error"] == "missing_field" and "`image`" in foreign.json()["detail"]
    assert ours.json() == {"error": "empty_image", "detail": "d"}
    assert crash.status_code == 500 and crash.json()["error"] == "internal_error"
    assert unguarded.json() == validation  # other routes are left alone


def test_wire_round_trip_is_exact_and_never_unpickles():
    batch = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    data = wire.to_npy(batch)
    assert len(data) < batch.nbytes + 200  # raw bytes plus a small header, not JSON numbers
    back = wire.from_npy(data)
    assert back.dtype == np.uint8 and np.array_equal(back, batch)
    with pytest.raises(wire.WireError):
        wire.to_npy(np.array([{"a": 1}], dtype=object))
    object_header = wire.to_npy(np.zeros(2, dtype=np.int64)).replace(b"'<i8'", b"'|O' ", 1)
    with pytest.raises(wire.WireError):  # an object array would need pickle to load
        wire.from_npy(object_header)
    with pytest.raises(wire.WireError):
        wire.from_npy(data[:-1])  # truncated body


def test_settings_from_env_and_clear_refusals():
    s = Settings.from_env({"IMGCLS_MAX_PIXELS": "50e6", "IMGCLS_DEVICE": "cpu", "IMGCLS_ORT_SPIN": "yes"})
    assert s.max_pixels == 50_000_000 and s.device == "cpu" and s.ort_spin is True
    assert Settings.from_env({}).model == "image-classifier:latest"
    with pytest.raises(SettingsError, match="IMGCLS_DEVICE"):
        Settings.from_env({"IMGCLS_DEVICE": "tpu"})
    with pytest.raises(SettingsError, match="IMGCLS_MAX_FILES"):
        Settings.from_env({"IMGCLS_MAX_FILES": "many"})
    with pytest.raises(SettingsError, match="IMGCLS_PLACEMENT"):
        Settings.from_env({"IMGCLS_PLACEMENT": "gpu"})
    with pytest.raises(SettingsError, match="IMGCLS_KEEPALIVE_REQUESTS"):
        Settings.from_env({"IMGCLS_KEEPALIVE_REQUESTS": "-1"})


def test_variant_choice_follows_device_and_respects_the_override():
    all_three = {"fp32": "a", "fp16": "b", "int8": "c"}
    assert runtime.choose_variant("", "cpu", all_three) == "int8"
    assert runtime.choose_variant("", "cuda", all_three) == "fp16"
    assert runtime.choose_variant("fp32", "cuda", all_three) == "fp32"
    assert runtime.choose_variant("", "cpu", {"fp32": "a"}) == "fp32"
    with pytest.raises(runtime.ModelLoadError, match="IMGCLS_VARIANT"):
        runtime.choose_variant("int8", "cpu", {"fp32": "a"})
    assert runtime.choose_device("cpu") == "cpu"


@pytest.mark.slow
def test_model_loads_on_cpu_and_a_tampered_file_is_refused(tiny_model, tmp_path):
    import bentoml

    folder = tmp_path / "model"
    shutil.copytree(bentoml.models.get(tiny_model).path, folder)
    rt = runtime.load(folder, Settings(device="cpu", max_batch_size=4))
    assert (rt.provider, rt.variant) == ("CPUExecutionProvider", "int8")
    probs, emb = rt.run(np.zeros((3, rt.spec.size, rt.spec.size, 3), dtype=np.uint8))
    assert probs.shape == (3, len(rt.labels)) and np.allclose(probs.sum(axis=1), 1, atol=1e-3)
    assert emb.shape[0] == 3 and emb.dtype == np.float32

    manifest = json.loads((folder / "manifest.json").read_text())
    victim = folder / manifest["variants"]["fp32"]
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(runtime.ModelLoadError, match="checksum"):
        runtime.load(folder, Settings(device="cpu"))


def test_coalescer_shares_hop_calls_under_load_and_returns_each_callers_rows():
    calls = []

    async def model(batch):
        calls.append(len(batch))
        await asyncio.sleep(0.05)
        return batch[:, :1].astype(np.float32) * 2  # row i answers input row i

    async def go():
        hop = Coalescer(model, max_batch_size=8, max_in_flight=1)
        inputs = [np.full((1 + i % 2, 1), i, dtype=np.uint8) for i in range(10)]
        return inputs, await asyncio.gather(*(hop(x) for x in inputs))

    inputs, outputs = run(go())
    for x, out in zip(inputs, outputs, strict=True):
        assert out.shape == (len(x), 1) and np.all(out == 2 * x)
    assert calls[0] == 1  # the first caller did not wait for company
    assert len(calls) < 10 and max(calls) <= 8 and sum(calls) == sum(len(x) for x in inputs)


def test_coalescer_passes_the_hop_error_to_every_caller_in_the_call():
    async def broken(batch):
        await asyncio.sleep(0.01)
        raise httpx.ConnectError("model service gone")

    async def go():
        hop = Coalescer(broken, max_batch_size=8, max_in_flight=1)
        return await asyncio.gather(*(hop(np.zeros((1, 1))) for _ in range(3)), return_exceptions=True)

    assert all(isinstance(r, httpx.ConnectError) for r in run(go()))


class FakeRuntime:
    """Stands in for an onnxruntime session: row i of the output echoes input row i; each run takes ``delay`` s."""

    variant, provider, model_file = "int8", "CPUExecutionProvider", Path("model_int8.onnx")

    def __init__(self, delay: float):
        self.delay, self.batches = delay, []

    def run(self, pixels):
        self.batches.append(len(pixels))
        time.sleep(self.delay)
        probs = pixels.reshape(len(pixels), -1)[:, :2].astype(np.float32)
        return probs, np.zeros((len(pixels), 3), dtype=np.float32)


def test_in_process_batching_merges_concurrent_calls_and_returns_each_callers_rows():
    rt = FakeRuntime(delay=0.02)

    async def go():
        batching = InProcessBatching(Model(rt, "m:1"), max_batch_size=8, max_latency_ms=10_000)
        inputs = [np.full((1 + i % 3, 2), i, dtype=np.uint8) for i in range(40)]
        return inputs, await asyncio.gather(*(batching(x) for x in inputs))

    inputs, outputs = run(go())
    for x, out in zip(inputs, outputs, strict=True):
        assert out.shape == (len(x), 5) and np.all(out[:, :2] == x)
    assert max(rt.batches) <= 8 and sum(rt.batches) == sum(len(x) for x in inputs)
    assert len(rt.batches) < len(inputs)  # batches were formed


def test_in_process_batching_sheds_load_past_max_latency_as_service_unavailable():
    rt = FakeRuntime(delay=0.1)

    async def go():
        batching = InProcessBatching(Model(rt, "m:1"), max_batch_size=2, max_latency_ms=150)
        return await asyncio.gather(*(batching(np.zeros((1, 2), np.uint8)) for _ in range(30)), return_exceptions=True)

    results = run(go())
    shed = [r for r in results if isinstance(r, bentoml.exceptions.ServiceUnavailable)]
    assert shed and all(isinstance(r, np.ndarray) or r in shed for r in results)
    assert shed[0].error_code.value == 503  # the API answers 503 + Retry-After
