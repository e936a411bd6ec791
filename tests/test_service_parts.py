"""Fast, in-process checks of the service's parts: the middlewares, the upload parser, the hop's wire format,
settings and their resolution, model loading, batching."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from imgcls.errors import ApiError
from imgcls.model_files import ModelFilesError, open_model
from service import balance, session, wire
from service.batching import Batcher, ThreadBatcher, in_process
from service.middleware import ApiKeyAuth, ConcurrencyLimit, Deadline, ErrorShape, KeepAliveLimit, UploadReceiver
from service.parse import UPLOAD_KEY, UploadSpec
from service.settings import Plan, Settings, SettingsError, cpu_count, help_text, resolve


def _app(delay: float = 0.0, status: int = 200, body: object = None) -> Starlette:
    async def handler(request):
        upload = request.scope.get(UPLOAD_KEY)
        await request.body()
        await asyncio.sleep(delay)
        payload = body if body is not None else {"ok": True, "files": len(upload.files) if upload else None}
        return JSONResponse(payload, status_code=status)

    routes = [Route("/classify", handler, methods=["POST", "GET"]), Route("/other", handler, methods=["POST"])]
    return Starlette(routes=routes)


SPECS = {"/classify": UploadSpec("image", 1, max_image_bytes=800, raw_body=True)}


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _receiver(app, **kw) -> UploadReceiver:
    opts = dict(specs=SPECS, max_body_bytes=1000, timeout_s=5.0, buffer_bytes=10_000) | kw
    return UploadReceiver(app, **opts)


def run(coro):
    return asyncio.run(coro)


def post_raw(client, content, **kw):
    return client.post("/classify", content=content, headers={"Content-Type": "image/jpeg"}, **kw)


def test_body_over_the_limit_is_refused_from_content_length():
    async def go():
        async with _client(_receiver(_app())) as client:
            return await post_raw(client, b"x" * 1001)

    resp = run(go())
    assert resp.status_code == 413 and resp.json()["error"] == "body_too_large"
    assert "IMGCLS_MAX_BODY_BYTES" in resp.json()["detail"]


def test_chunked_body_over_the_limit_is_refused_and_a_small_one_passes_parsed():
    async def chunks(n):
        for _ in range(n):
            yield b"x" * 300

    async def go():
        async with _client(_receiver(_app())) as client:
            return await post_raw(client, chunks(4)), await post_raw(client, chunks(2))

    big, small = run(go())
    assert big.status_code == 413 and big.json()["error"] == "body_too_large"
    assert small.status_code == 200 and small.json()["files"] == 1  # the handler got the parsed upload


def test_a_single_image_over_its_own_limit_is_refused():
    async def go():
        async with _client(_receiver(_app(), max_body_bytes=2000)) as client:
            files = {"image": ("a.jpg", b"y" * 900, "image/jpeg")}
            return await client.post("/classify", files=files)

    resp = run(go())
    assert resp.status_code == 413 and resp.json()["error"] == "image_too_large"
    assert "IMGCLS_MAX_IMAGE_BYTES" in resp.json()["detail"]


def test_a_body_that_does_not_arrive_in_time_gets_408():
    async def slow():
        yield b"x"
        await asyncio.sleep(2)
        yield b"y"

    async def go():
        async with _client(_receiver(_app(), timeout_s=0.3)) as client:
            return await post_raw(client, slow())

    resp = run(go())
    assert resp.status_code == 408 and resp.json()["error"] == "body_timeout"


def test_uploads_being_received_are_bounded_in_bytes_per_worker():
    async def slow():
        yield b"x" * 350
        await asyncio.sleep(0.5)
        yield b"y" * 350

    async def go():
        async with _client(_receiver(_app(), buffer_bytes=1200)) as client:
            headers = {"Content-Type": "image/jpeg", "Content-Length": "700"}
            slow_one = asyncio.ensure_future(client.post("/classify", content=slow(), headers=headers))
            await asyncio.sleep(0.1)
            refused = await post_raw(client, b"z" * 700)
            first = await slow_one
            after = await post_raw(client, b"z" * 700)
            return first, refused, after

    first, refused, after = run(go())
    assert refused.status_code == 503 and refused.json()["error"] == "overloaded" and "retry-after" in refused.headers
    assert first.status_code == after.status_code == 200  # the slow one finished; its reservation was given back


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "named"),
    [
        (
            {"content": b"hi", "headers": {"Content-Type": "text/plain"}},
            400,
            "not_multipart",
            "Content-Type image/jpeg",
        ),
        ({"files": {"picture": ("a.jpg", b"\xff\xd8")}}, 400, "missing_field", "`picture`"),
        ({"files": {"image": ("a.jpg", b"\xff\xd8")}, "data": {"top_k": "zero"}}, 400, "invalid_top_k", "zero"),
        ({"files": {"image": (None, "http://example.com/a.jpg")}}, 400, "not_a_file", "file part"),
        (
            {"files": {"image": ("a.jpg", b"\xff")}, "headers": {"X-Traffic-Source": "a b"}},
            400,
            "invalid_traffic_source",
            "a b",
        ),
    ],
    ids=["text_body", "wrong_field", "bad_top_k", "url_not_file", "bad_source"],
)
def test_parse_errors_name_what_was_wrong_and_how_to_send_it(kwargs, status, code, named):
    async def go():
        async with _client(_receiver(_app())) as client:
            return await client.post("/classify", **kwargs)

    resp = run(go())
    assert resp.status_code == status and resp.json()["error"] == code, resp.text
    assert named in resp.json()["detail"]
    if code in ("not_multipart", "missing_field"):
        assert "http://test/classify" in resp.json()["detail"]  # the host and path the client used


def test_too_many_requests_in_flight_get_503_with_retry_after_and_the_gauge_follows():
    changes = []

    async def go():
        app = ConcurrencyLimit(
            _app(delay=0.3), ["/classify"], max_concurrency=2, retry_after_s=2, on_change=changes.append
        )
        async with _client(app) as client:
            return await asyncio.gather(*(client.post("/classify", content=b"x") for _ in range(5)))

    responses = run(go())
    assert sorted(r.status_code for r in responses) == [200, 200, 503, 503, 503]
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "2" and refused.json()["error"] == "overloaded"
    assert sorted(changes) == [-1, -1, 1, 1] and sum(changes) == 0


def test_slow_request_gets_504_in_our_shape():
    async def go():
        async with _client(Deadline(_app(delay=2.0), ["/classify"], timeout_s=0.2)) as client:
            return await client.post("/classify", content=b"x")

    resp = run(go())
    assert resp.status_code == 504
    assert resp.json()["error"] == "timeout" and "IMGCLS_TIMEOUT_S" in resp.json()["detail"]


def test_keepalive_connection_is_closed_after_its_request_quota():
    async def go():
        async with _client(KeepAliveLimit(_app(), max_requests=3)) as client:  # one client address: one connection
            return [await client.post("/classify", content=b"x") for _ in range(6)]

    closing = [r.headers.get("connection") == "close" for r in run(go())]
    assert closing == [False, False, True, False, False, True]


@pytest.fixture
def census_file(tmp_path, monkeypatch):
    """``census_file(workers)``: the path of a census the supervisor would create for that many API workers."""
    monkeypatch.setattr(balance.tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(balance.CENSUS_FILE, raising=False)

    def create(workers: int) -> str:
        balance.create(workers)
        return balance.os.environ[balance.CENSUS_FILE]

    return create


def test_census_says_crowded_only_when_clearly_above_the_least_loaded_worker(census_file):
    path = census_file(3)
    workers = [balance.Census(path, slot) for slot in range(3)]  # as three API worker processes see the file

    def crowded(*counts: int) -> list[bool]:
        for census, count in zip(workers, counts, strict=True):
            census.add(count - census.counts[census.slot])
        return [census.crowded() for census in workers]

    assert crowded(4, 4, 3) == [False, False, False]
    assert crowded(5, 3, 4) == [True, False, False]  # two more than the least loaded
    assert crowded(40, 37, 36) == [False, False, False]  # within an eighth
    assert crowded(40, 37, 35) == [True, False, False]
    assert balance.Census(path, 0).counts[0] == 0  # a replacement worker starts its slot afresh
    with pytest.raises(ValueError, match="outside"):
        balance.Census(path, 3)


def test_census_tells_a_request_alone_in_the_server_for_a_while(census_file):
    path = census_file(2)
    mine, other = balance.Census(path, 0), balance.Census(path, 1)  # two API worker processes
    mine.add_request(1)
    assert mine.alone(1.0)  # one request in the server, never two so far
    other.add_request(1)  # a second, in the other worker
    assert not mine.alone(1.0) and not other.alone(1.0)
    other.add_request(-1)
    now = time.monotonic()
    assert not mine.alone(1.0, now)  # alone again, but not yet for a second
    assert mine.alone(1.0, now + 1.1)
    assert balance.Census(path, 0).requests[0] == 0  # a replacement worker starts its slot afresh


def test_crowded_worker_closes_a_connection_after_its_response_one_at_a_time(census_file, monkeypatch):
    mine = balance.Census(census_file(2), 0)
    monkeypatch.setattr(balance, "CENSUS", mine)

    async def go():
        async with _client(KeepAliveLimit(_app(), max_requests=0)) as client:
            return (await client.post("/classify", content=b"x")).headers.get("connection")

    mine.add(2)
    assert run(go()) == "close"
    assert run(go()) is None  # one close per CLOSE_INTERVAL_S: the responses in flight do not all close
    time.sleep(balance.CLOSE_INTERVAL_S)
    assert run(go()) == "close"
    mine.add(-1)
    time.sleep(balance.CLOSE_INTERVAL_S)
    assert run(go()) is None


@pytest.mark.parametrize(
    ("cpu_max", "cores"),
    [
        ("max 100000", None),
        ("200000 100000", 2),
        ("150000 100000", 2),
        ("50000 100000", 1),
        ("garbage", None),
        ("a 100000", None),
        ("100000 0", None),
    ],
)
def test_cpu_count_follows_a_cgroup_quota_below_the_cores(tmp_path, cpu_max, cores):
    available = cpu_count(str(tmp_path / "absent"))
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    assert cpu_count(str(tmp_path / "cpu.max")) == (available if cores is None else min(available, cores))


def test_foreign_error_bodies_are_rewritten_ours_and_probes_pass_unchanged():
    validation = {"error": "1 validation error", "detail": [{"type": "missing", "loc": ["image"], "msg": "required"}]}

    async def go():
        async with _client(ErrorShape(_app(status=400, body=validation))) as client:
            foreign = await client.post("/classify", content=b"x")
        async with _client(ErrorShape(_app(status=400, body={"error": "empty_image", "detail": "d"}))) as client:
            ours = await client.post("/classify", content=b"x")
        async with _client(ErrorShape(_app(status=500, body={"error": "An unexpected error"}))) as client:
            crash = await client.post("/classify", content=b"x")
        async with _client(ErrorShape(_app())) as client:
            missing = await client.get("/nothing-here")
            wrong_method = await client.put("/classify")
        return foreign, ours, crash, missing, wrong_method

    foreign, ours, crash, missing, wrong_method = run(go())
    assert foreign.status_code == 400
    assert foreign.json()["error"] == "missing_field" and "`image`" in foreign.json()["detail"]
    assert ours.json() == {"error": "empty_image", "detail": "d"}
    assert crash.status_code == 500 and crash.json()["error"] == "internal_error"
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert wrong_method.status_code == 405 and wrong_method.json()["error"] == "method_not_allowed"


def test_api_key_is_required_on_protected_paths_only_and_compared_whole():
    async def go():
        app = ApiKeyAuth(_app(), key="s3cret", paths=["/classify"])
        async with _client(app) as client:
            basic = base64.b64encode(b"anyone:s3cret").decode()
            return [
                await client.post("/classify", content=b"x"),
                await client.post("/classify", content=b"x", headers={"Authorization": "Bearer s3cre"}),
                await client.post("/classify", content=b"x", headers={"Authorization": "Bearer s3cret"}),
                await client.post("/classify", content=b"x", headers={"X-API-Key": "s3cret"}),
                await client.post("/classify", content=b"x", headers={"Authorization": f"Basic {basic}"}),
                await client.post("/other", content=b"x"),
            ]

    none, wrong, bearer, header, basic, other = run(go())
    assert none.status_code == wrong.status_code == 401 and none.json()["error"] == "unauthorized"
    assert "Basic" in none.headers["www-authenticate"]
    assert [r.status_code for r in (bearer, header, basic, other)] == [200, 200, 200, 200]


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
    refusals = {
        "IMGCLS_DEVICE": "tpu",
        "IMGCLS_MAX_FILES": "many",
        "IMGCLS_PLACEMENT": "gpu",
        "IMGCLS_KEEPALIVE_REQUESTS": "-1",
        "IMGCLS_MAX_BATCH_SIZE": "1",
        "IMGCLS_BODY_TIMEOUT_S": "0",
    }
    for key, value in refusals.items():
        with pytest.raises(SettingsError, match=key):
            Settings.from_env({key: value})
    with pytest.raises(SettingsError, match="IMGCLS_MAX_IMAGE_BYTES"):
        Settings.from_env({"IMGCLS_MAX_IMAGE_BYTES": "100", "IMGCLS_MAX_BODY_BYTES": "50"})


def test_api_key_comes_from_the_variable_or_a_file(tmp_path):
    (tmp_path / "key").write_text("from-file\n")
    assert Settings(api_key="k").read_api_key() == "k"
    assert Settings(api_key_file=str(tmp_path / "key")).read_api_key() == "from-file"
    with pytest.raises(SettingsError, match="IMGCLS_API_KEY_FILE"):
        Settings(api_key_file=str(tmp_path / "missing")).read_api_key()


@pytest.mark.parametrize(
    ("settings", "gpu", "cpus", "plan"),
    [
        (Settings(), False, 2, Plan("cpu", False, 2, 32, 1, 2)),
        (Settings(), True, 16, Plan("cuda", True, 16, 128, 16)),
        (Settings(device="cpu"), True, 16, Plan("cpu", False, 16, 32, 1, 8)),
        (Settings(lone_threads=1), False, 2, Plan("cpu", False, 2, 32, 1, 0)),
        (Settings(workers=1, lone_threads=4), False, 2, Plan("cpu", False, 1, 32, 2, 4)),
        (Settings(placement="shared"), False, 4, Plan("cpu", True, 4, 32, 4)),
        (Settings(workers=1, max_batch_size=8), False, 4, Plan("cpu", False, 1, 8, 4)),
        (Settings(ort_threads=3), False, 2, Plan("cpu", False, 2, 32, 3)),
        (Settings(placement="worker"), True, 8, Plan("cuda", False, 8, 128, 1)),
    ],
    ids=[
        "cpu_default",
        "gpu_default",
        "cpu_forced",
        "lone_off",
        "lone_explicit",
        "shared_on_cpu",
        "one_worker",
        "explicit_threads",
        "gpu_worker",
    ],  # fmt: skip
)
def test_resolve_decides_device_placement_batch_and_threads(settings, gpu, cpus, plan):
    assert resolve(settings, gpu_usable=gpu, cpus=cpus) == plan


def test_resolve_refuses_cuda_without_a_gpu():
    with pytest.raises(SettingsError, match="IMGCLS_DEVICE=cuda"):
        resolve(Settings(device="cuda"), gpu_usable=False, cpus=2)


def test_variant_choice_follows_device_and_respects_the_override():
    all_three = {"fp32": "a", "fp16": "b", "int8": "c"}
    assert session.choose_variant("", "cpu", all_three) == "int8"
    assert session.choose_variant("", "cuda", all_three) == "fp16"
    assert session.choose_variant("fp32", "cuda", all_three) == "fp32"
    assert session.choose_variant("", "cpu", {"fp32": "a"}) == "fp32"
    with pytest.raises(ModelFilesError, match="IMGCLS_VARIANT"):
        session.choose_variant("int8", "cpu", {"fp32": "a"})


@pytest.mark.slow
def test_model_opens_on_cpu_and_a_tampered_or_broken_file_is_refused(tiny_model, tmp_path):
    import bentoml

    folder = tmp_path / "model"
    shutil.copytree(bentoml.models.get(tiny_model).path, folder)
    files = open_model(folder)
    model = session.open_session(files, "cpu", "", threads=1)
    assert (model.provider, model.variant) == ("CPUExecutionProvider", "int8")
    out = model.infer(np.zeros((3, files.spec.size, files.spec.size, 3), dtype=np.uint8))
    probs = out[:, : len(files.labels)]
    assert out.shape[0] == 3 and out.dtype == np.float32 and np.allclose(probs.sum(axis=1), 1, atol=1e-3)

    manifest = json.loads((folder / "manifest.json").read_text())
    victim = folder / manifest["variants"]["fp32"]
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(ModelFilesError, match="sha256"):
        open_model(folder)
    (folder / "labels.json").unlink()
    with pytest.raises(ModelFilesError, match="labels.json"):
        open_model(folder, check_sha256=False)


def test_batcher_runs_a_lone_call_at_once_and_batches_what_arrives_meanwhile():
    calls = []

    async def model(batch):
        calls.append(len(batch))
        await asyncio.sleep(0.05)
        return batch[:, :1].astype(np.float32) * 2  # row i answers input row i

    async def go():
        batcher = Batcher(model, max_batch_size=8, max_in_flight=1)
        started = time.monotonic()
        await batcher(np.zeros((1, 1), np.uint8))
        alone = time.monotonic() - started
        inputs = [np.full((1 + i % 2, 1), i, dtype=np.uint8) for i in range(10)]
        return alone, inputs, await asyncio.gather(*(batcher(x) for x in inputs))

    alone, inputs, outputs = run(go())
    for x, out in zip(inputs, outputs, strict=True):
        assert out.shape == (len(x), 1) and np.all(out == 2 * x)
    assert calls[0] == 1 and alone < 0.2  # nothing waited for company
    assert calls[1] == 1  # the first of the burst went out alone at once; the rest queued behind it
    assert len(calls) < 11 and max(calls) <= 8 and sum(calls) == 1 + sum(len(x) for x in inputs)


def test_batcher_passes_a_call_error_to_every_caller_in_the_call():
    async def broken(batch):
        await asyncio.sleep(0.01)
        raise httpx.ConnectError("model service gone")

    async def go():
        batcher = Batcher(broken, max_batch_size=8, max_in_flight=1)
        return await asyncio.gather(*(batcher(np.zeros((1, 1))) for _ in range(3)), return_exceptions=True)

    assert all(isinstance(r, httpx.ConnectError) for r in run(go()))


class FakeModel:
    """Stands in for a session: row i of the output echoes input row i; each run takes ``delay`` s."""

    def __init__(self, delay: float):
        self.delay, self.batches, self.last_seconds = delay, [], 0.0

    def infer(self, pixels):
        self.batches.append(len(pixels))
        time.sleep(self.delay)
        self.last_seconds = self.delay
        return pixels.reshape(len(pixels), -1)[:, :2].astype(np.float32)


@contextlib.contextmanager
def batcher_for(kind: str, model: FakeModel, **options):
    """A batcher of ``kind`` over ``model``: "thread" as in an API worker (ThreadBatcher, driven by a pool of two
    decode threads), "loop" as in the shared model process (Batcher over in_process)."""
    if kind == "loop":
        yield Batcher(in_process(model), **options)
        return
    with ThreadPoolExecutor(2) as pool:
        yield ThreadBatcher(lambda images: model, pool, **options)


BATCHERS = ["thread", "loop"]


@pytest.mark.parametrize("kind", BATCHERS)
def test_in_process_batches_keep_each_callers_rows(kind):
    model = FakeModel(delay=0.02)

    async def go():
        with batcher_for(kind, model, max_batch_size=8, max_wait_s=10) as batcher:
            inputs = [np.full((1 + i % 3, 2), i, dtype=np.uint8) for i in range(40)]
            return inputs, await asyncio.gather(*(batcher(x) for x in inputs))

    inputs, outputs = run(go())
    for x, out in zip(inputs, outputs, strict=True):
        assert out.shape == (len(x), 2) and np.all(out == x)
    assert max(model.batches) <= 8 and sum(model.batches) == sum(len(x) for x in inputs)
    assert len(model.batches) < len(inputs)  # batches were formed


def test_the_thread_that_finds_the_model_free_runs_it_then_what_queued_meanwhile():
    """ThreadBatcher.run, as a decode thread calls it: the first caller runs the model at once in its own thread;
    three arriving meanwhile queue, return at once, and go together in that same thread as the next batch."""
    model = FakeModel(delay=0.1)
    with ThreadPoolExecutor(1) as pool:
        batcher = ThreadBatcher(lambda images: model, pool, max_batch_size=8, max_wait_s=10)
        first = concurrent.futures.Future()
        leader = threading.Thread(target=batcher.run, args=(np.zeros((1, 2), np.uint8), first))
        leader.start()
        time.sleep(0.03)  # the first call is running
        later = [concurrent.futures.Future() for _ in range(3)]
        for i, done in enumerate(later):
            started = time.monotonic()
            batcher.run(np.full((1, 2), i + 1, np.uint8), done)
            assert time.monotonic() - started < 0.05 and not done.done()  # queued, not waited for
        leader.join(5)
    assert model.batches == [1, 3] and first.result().shape == (1, 2)
    assert [int(done.result()[0, 0]) for done in later] == [1, 2, 3]
    assert batcher._in_flight == 0 and batcher._seconds_per_image > 0


def test_a_thread_batcher_gives_a_model_error_to_every_caller_in_the_call_and_keeps_serving():
    class Broken(FakeModel):
        def infer(self, pixels):
            out = super().infer(pixels)
            if len(self.batches) <= 2:  # the first call, and the one of the three that queued behind it
                raise RuntimeError("onnxruntime failed")
            return out

    model = Broken(delay=0.02)

    async def go():
        with batcher_for("thread", model, max_batch_size=8, max_wait_s=10) as batcher:
            failed = await asyncio.gather(
                *(batcher(np.zeros((1, 2), np.uint8)) for _ in range(4)), return_exceptions=True
            )
            return failed, await batcher(np.zeros((1, 2), np.uint8))

    failed, after = run(go())
    assert all(isinstance(r, RuntimeError) for r in failed) and after.shape == (1, 2)


def test_a_caller_that_gives_up_is_not_run():
    """A request past its deadline while queued (its future cancelled) is skipped when the next batch is taken."""
    model = FakeModel(delay=0.1)

    async def go():
        with batcher_for("thread", model, max_batch_size=8, max_wait_s=10) as batcher:
            first = asyncio.ensure_future(batcher(np.zeros((1, 2), np.uint8)))
            await asyncio.sleep(0.03)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(batcher(np.ones((1, 2), np.uint8)), 0.02)
            await first

    run(go())
    assert model.batches == [1]


@pytest.mark.parametrize("kind", BATCHERS)
def test_batcher_sheds_load_past_max_wait_with_503_and_retry_after(kind):
    model = FakeModel(delay=0.1)

    async def go():
        with batcher_for(kind, model, max_batch_size=2, max_wait_s=0.15, retry_after_s=3) as batcher:
            calls = (batcher(np.zeros((1, 2), np.uint8)) for _ in range(30))
            return await asyncio.gather(*calls, return_exceptions=True)

    results = run(go())
    shed = [r for r in results if isinstance(r, ApiError)]
    assert shed and all(isinstance(r, np.ndarray) or r in shed for r in results)
    assert (shed[0].status, shed[0].code, shed[0].retry_after) == (503, "overloaded", 3)


@pytest.mark.parametrize("kind", BATCHERS)
def test_latency_after_a_burst_is_back_to_idle_at_once(kind):
    """Nothing is learned from a burst: the next lone call goes straight to the model."""
    model = FakeModel(delay=0.01)

    async def go():
        with batcher_for(kind, model, max_batch_size=4, max_wait_s=10) as batcher:
            await asyncio.gather(*(batcher(np.zeros((1, 2), np.uint8)) for _ in range(200)))
            started = time.monotonic()
            await batcher(np.zeros((1, 2), np.uint8))
            return time.monotonic() - started

    assert run(go()) < 0.05


@pytest.mark.parametrize("kind", BATCHERS)
def test_a_slow_model_with_room_for_big_batches_does_not_shed_a_second_caller(kind):
    """The wait a caller would face is counted in images ahead of it, not in full batches: two callers of a
    30 ms-per-image model are far from a 1 s budget, however large a batch could be."""
    model = FakeModel(delay=0.03)

    async def go():
        with batcher_for(kind, model, max_batch_size=64, max_wait_s=1.0) as batcher:
            await batcher(np.zeros((1, 2), np.uint8))  # the time per image is known from here on
            calls = (batcher(np.zeros((1, 2), np.uint8)) for _ in range(3))
            return await asyncio.gather(*calls, return_exceptions=True)

    assert all(isinstance(r, np.ndarray) for r in run(go()))


def test_every_setting_is_listed_with_its_default_and_meaning():
    listed = help_text()
    for f in fields(Settings):
        assert f"IMGCLS_{f.name.upper()} " in listed and f.metadata["help"] in listed
