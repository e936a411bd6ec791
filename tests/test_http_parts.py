"""The HTTP edge and the service's parts that need no server: receiving and parsing uploads, error shapes, the API
key, the connection census, the model hop's wire format, settings, the model session."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time
from dataclasses import fields

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from imgcls.errors import ApiError
from imgcls.model_files import ModelFilesError, open_model
from service import adaptations, session, wire
from service.http import ApiKeyAuth, ErrorShape, error_response
from service.settings import Plan, Settings, SettingsError, cpu_count, help_text, main, resolve
from service.upload import BodyBudget, UploadLimits, parse_upload, receive_body


def _app(delay: float = 0.0, status: int = 200, body: object = None) -> Starlette:
    async def handler(request):
        await request.body()
        await asyncio.sleep(delay)
        return JSONResponse(body if body is not None else {"ok": True}, status_code=status)

    routes = [Route("/classify", handler, methods=["POST", "GET"]), Route("/other", handler, methods=["POST"])]
    return Starlette(routes=routes)


LIMITS = UploadLimits("image", 1, max_image_bytes=800, max_body_bytes=1000, body_timeout_s=5.0, raw_body=True,
                      sources=frozenset({"production", "loadtest"}))  # fmt: skip


def _upload_app(limits: UploadLimits = LIMITS, budget: BodyBudget | None = None) -> Starlette:
    """What an IO descriptor does for each request: receive the body, then parse it."""
    budget = budget or BodyBudget(10_000)

    async def handler(request: Request):
        try:
            body = await receive_body(request, limits, budget)
            upload = await parse_upload(limits, request.headers, request.scope["query_string"], request.url.path, body)
        except ApiError as err:
            return error_response(err)
        return JSONResponse({"files": len(upload.files), "top_k": upload.top_k, "source": upload.source})

    return Starlette(routes=[Route("/classify", handler, methods=["POST"])])


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def run(coro):
    return asyncio.run(coro)


def post_raw(client, content, **kw):
    return client.post("/classify", content=content, headers={"Content-Type": "image/jpeg"}, **kw)


def test_body_over_the_limit_is_refused_from_content_length():
    async def go():
        async with _client(_upload_app()) as client:
            return await post_raw(client, b"x" * 1001)

    resp = run(go())
    assert resp.status_code == 413 and resp.json()["error"] == "body_too_large"
    assert "1000 bytes (IMGCLS_MAX_BODY_BYTES)" in resp.json()["detail"]


def test_chunked_body_over_the_limit_is_refused_and_a_small_one_passes_parsed():
    async def chunks(n):
        for _ in range(n):
            yield b"x" * 300

    async def go():
        async with _client(_upload_app()) as client:
            return await post_raw(client, chunks(4)), await post_raw(client, chunks(2))

    big, small = run(go())
    assert big.status_code == 413 and big.json()["error"] == "body_too_large"
    assert small.status_code == 200 and small.json() == {"files": 1, "top_k": 5, "source": "production"}


def test_a_single_image_over_its_own_limit_is_refused_with_readable_sizes():
    async def go():
        async with _client(_upload_app(UploadLimits("image", 1, 800, 4 << 20, 5.0))) as client:
            files = {"image": ("a.jpg", b"y" * 1536, "image/jpeg")}
            return await client.post("/classify", files=files)

    resp = run(go())
    assert resp.status_code == 413 and resp.json()["error"] == "image_too_large"
    assert "File 1 is 1.5 KiB; each image may be at most 800 bytes (IMGCLS_MAX_IMAGE_BYTES)" in resp.json()["detail"]


def test_a_body_that_does_not_arrive_in_time_gets_408():
    async def slow():
        yield b"x"
        await asyncio.sleep(2)
        yield b"y"

    async def go():
        limits = UploadLimits("image", 1, 800, 1000, body_timeout_s=0.3, raw_body=True)
        async with _client(_upload_app(limits)) as client:
            return await post_raw(client, slow())

    resp = run(go())
    assert resp.status_code == 408 and resp.json()["error"] == "body_timeout"


def test_bodies_that_only_announce_a_size_reserve_nothing_and_a_hog_cannot_refuse_others():
    """The receive budget counts bytes that arrived: headers promising large bodies hold nothing, and when the
    budget runs out the body holding more than its share is the one refused, not a small photo."""
    budget = BodyBudget(6000, retry_after_s=2)
    limits = UploadLimits("image", 1, 10_000, 10_000, 5.0, raw_body=True)

    async def trickle(first: int, wait: float):
        yield b"x" * first
        await asyncio.sleep(wait)
        yield b"y"

    async def go():
        async with _client(_upload_app(limits, budget)) as client:
            announced = {"Content-Type": "image/jpeg", "Content-Length": "9000"}
            promises = [asyncio.ensure_future(client.post("/classify", content=trickle(1, 0.6), headers=announced))
                        for _ in range(5)]  # fmt: skip
            hog = asyncio.ensure_future(post_raw(client, trickle(5900, 0.3)))
            await asyncio.sleep(0.1)
            small = await post_raw(client, b"z" * 300)  # within its share (6000 / 7) of a nearly full budget
            second_hog = await post_raw(client, b"w" * 2000)  # over its share of a full budget
            return small, second_hog, await hog, await asyncio.gather(*promises)

    small, second_hog, hog, promises = run(go())
    assert small.status_code == 200 and hog.status_code == 200
    assert second_hog.status_code == 503 and second_hog.json()["error"] == "overloaded"
    assert second_hog.headers["retry-after"] == "2"
    assert all(r.status_code != 503 for r in promises)
    assert budget.used == 0 and budget.receiving == 0


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
        (
            {"files": {"image": ("a.jpg", b"\xff")}, "data": {"source": "loadtset"}},
            400,
            "invalid_traffic_source",
            "loadtest, production (IMGCLS_TRAFFIC_SOURCES)",
        ),
        (
            {"files": [("image", ("a.jpg", b"\xff")), ("image", ("b.jpg", b"\xff"))]},
            413,
            "too_many_files",
            "2 files sent; at most 1 per request (IMGCLS_MAX_FILES)",
        ),
    ],
    ids=["text_body", "wrong_field", "bad_top_k", "url_not_file", "bad_source", "unknown_source", "two_files"],
)
def test_parse_errors_name_what_was_wrong_and_how_to_send_it(kwargs, status, code, named):
    async def go():
        async with _client(_upload_app()) as client:
            return await client.post("/classify", **kwargs)

    resp = run(go())
    assert resp.status_code == status and resp.json()["error"] == code, resp.text
    assert named in resp.json()["detail"]
    if code in ("not_multipart", "missing_field"):
        assert "http://test/classify" in resp.json()["detail"]  # the host and path the client used


def test_a_known_traffic_source_is_taken_from_the_header_or_the_form():
    async def go():
        async with _client(_upload_app()) as client:
            by_header = await client.post("/classify", files={"image": ("a.jpg", b"\xff")},
                                          headers={"X-Traffic-Source": "LoadTest"})  # fmt: skip
            by_form = await client.post("/classify", files={"image": ("a.jpg", b"\xff")}, data={"source": "loadtest"})
            return by_header.json()["source"], by_form.json()["source"]

    assert run(go()) == ("loadtest", "loadtest")


def test_the_census_says_crowded_only_when_clearly_above_the_least_loaded_worker(tmp_path, monkeypatch):
    monkeypatch.setattr(adaptations.tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(adaptations.CENSUS_FILE, raising=False)
    adaptations.Census.create(3)
    workers = [adaptations.Census.join(index) for index in (1, 2, 3)]  # as three API worker processes see the file

    def crowded(*counts: int) -> list[bool]:
        for census, count in zip(workers, counts, strict=True):
            census.add(count - census.counts[census.slot])
        return [census.crowded() for census in workers]

    assert crowded(4, 4, 3) == [False, False, False]
    assert crowded(5, 3, 4) == [True, False, False]  # two more than the least loaded
    assert crowded(40, 37, 36) == [False, False, False]  # within an eighth
    assert crowded(40, 37, 35) == [True, False, False]
    now = time.monotonic()
    assert workers[0].close_one(now) and not workers[0].close_one(now + 0.01)  # one close at a time
    assert workers[0].close_one(now + adaptations.Census.CLOSE_INTERVAL_S + 0.01)
    assert adaptations.Census.join(1).counts[0] == 0  # a replacement worker starts its slot afresh
    assert adaptations.Census.join(4) is None  # outside the census: serves, unbalanced


def test_the_adaptations_refuse_versions_they_were_not_written_for():
    adaptations.check_versions()  # the installed ones
    for package, version in [("bentoml", "1.5.0"), ("uvicorn", "0.30.0")]:
        with pytest.raises(adaptations.VersionError, match=f"{package} {version} is installed"):
            adaptations.check_versions(
                lambda name, p=package, v=version: v if name == p else {"bentoml": "1.4.39", "uvicorn": "0.55.0"}[name]
            )


def test_importing_the_service_changes_nothing_outside_bentoml_serve():
    from uvicorn import config

    before = dict(config.HTTP_PROTOCOLS)
    import service.service  # noqa: F401

    assert config.HTTP_PROTOCOLS == before


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


def test_every_setting_is_listed_with_its_default_and_meaning():
    listed = help_text()
    for f in fields(Settings):
        assert f"IMGCLS_{f.name.upper()} " in listed and f.metadata["help"] in listed


def test_python_m_service_settings_shows_this_environments_values_and_refuses_bad_ones(monkeypatch, capsys):
    monkeypatch.setenv("IMGCLS_MAX_FILES", "12")
    monkeypatch.setenv("IMGCLS_API_KEY", "k3y-v4lue")
    assert main([]) == 0
    shown = capsys.readouterr().out
    assert "IMGCLS_MAX_FILES              *12" in shown and "k3y-v4lue" not in shown
    monkeypatch.setenv("IMGCLS_MAX_FILES", "abc")
    assert main([]) == 2
    assert "IMGCLS_MAX_FILES='abc' is not a valid int" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0 and "Exit status" in capsys.readouterr().out
