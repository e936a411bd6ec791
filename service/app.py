"""The BentoML services: ``ImageClassifier`` answers HTTP; the model runs in it, or in ``SharedModel``.

Where a ``POST /classify`` goes, by file:

- ``service/middleware.py``: received within size and time bounds (and the API key), given a processing slot
  and a deadline;
- ``service/parse.py``: the multipart body (or the raw image) parsed into files, ``top_k`` and ``source``;
- ``service/decoding.py``: decoded in a thread of this worker (a slower lane for costly images) by
  ``imgcls/preprocess.py``: oriented, resized; ``imgcls/imagestats.py`` measures it for the drift job;
- ``service/batching.py``: batched with the concurrent requests, never waiting for company;
- ``service/session.py``: run by onnxruntime, in this worker (the CPU default) or in ``SharedModel``, one
  process fed by every worker (the GPU default), over ``.npy`` bodies (``service/wire.py``);
- ``service/answers.py``: top-k labels and the unfamiliarity score (``imgcls/ood.py``) answered, counted
  (``service/metrics.py``) and logged (``imgcls/inference_log.py``).

The pages for people (``/ui``, ``/info``, ``/docs``) are ``service/pages.py``, mounted beside the API.

Settings are read and resolved once (``service/settings.py``). ``bentoml serve`` and ``bentoml build`` read
this module through ``bentofile.yaml``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import uuid

import aiohttp
import bentoml
import httpx
import numpy as np
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from imgcls.errors import ApiError
from imgcls.inference_log import PRODUCTION, InferenceLogWriter, ensure_writable
from imgcls.model_files import ModelFiles, ModelFilesError, open_model
from imgcls.onnx_run import CPU, CUDA, cuda_usable
from service import balance, http_protocol, metrics, pages, self_test, session, supervision
from service.answers import Answerer, error_response
from service.batching import Batcher, ThreadBatcher, in_process
from service.decoding import Decoder
from service.middleware import (
    ApiKeyAuth,
    ConcurrencyLimit,
    Deadline,
    DirectRoute,
    ErrorShape,
    KeepAliveLimit,
    UploadReceiver,
)
from service.parse import ImageBatchUpload, ImageUpload, UploadSpec
from service.settings import Settings, SettingsError, cpu_count, resolve
from service.wire import NpyArray, from_npy

log = logging.getLogger(__name__)

try:
    SETTINGS = Settings.from_env()
    PLAN = resolve(SETTINGS, gpu_usable=SETTINGS.device != "cpu" and cuda_usable(), cpus=cpu_count())
    API_KEY = SETTINGS.read_api_key()
except SettingsError as exc:
    sys.exit(f"imgcls: {exc}")
if not supervision.in_worker():  # where bentoml serve imports this module, before it builds its supervisor
    supervision.protect_control_socket()
# Before this worker's uvicorn loads its configuration (see service/http_protocol.py).
http_protocol.install(SETTINGS.max_header_bytes, SETTINGS.max_headers, SETTINGS.header_timeout_s)
UPLOADS = {
    "/classify": UploadSpec("image", 1, SETTINGS.max_image_bytes, raw_body=True),
    "/classify_batch": UploadSpec("images", SETTINGS.max_files, SETTINGS.max_image_bytes),
}
PROTECTED = [*UPLOADS, "/info", "/ui/", *(["/metrics"] if SETTINGS.protect_metrics else [])]
# BentoML wraps every request in an OpenTelemetry span, exported only when an exporter is configured; unexported
# it costs about a tenth of an API worker's CPU per request. So the API routes skip it unless IMGCLS_TRACING=1.
TRACING = {} if SETTINGS.tracing else {"tracing": {"excluded_urls": list(UPLOADS)}}
# BentoML's request-duration histogram, with edges around the 200 ms p99 objective the alerts and load tests use
# (its default buckets jump from 100 to 250 ms).
#: The shared model process stops this much later than the API workers, which may still send it requests while
#: they finish theirs.
SHARED_MODEL_EXTRA_DRAIN_S = 5.0
REQUEST_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0]


def show_info_logs() -> None:
    """Let this package's INFO lines through: BentoML's worker logging passes only warnings from other loggers."""
    for name in ("service", "imgcls"):
        logging.getLogger(name).setLevel(logging.INFO)
    for name, logger in logging.root.manager.loggerDict.items():
        if name.split(".")[0] in ("service", "imgcls") and isinstance(logger, logging.Logger):
            logger.disabled = False


#: Allocations between two collections of the youngest generation (Python's default: 700). A request allocates a few
#: thousand objects that live until it is answered; at 700 the collector scanned the live ones several times per
#: request and promoted them to older generations, to be scanned again. Garbage in reference cycles waits at most
#: this many allocations (a few MB). ResNet-18, 4 clients, interleaved A/B: 0.8-2.7% more requests per second.
YOUNG_GC_THRESHOLD = 50_000


def tune_garbage_collector() -> None:
    """Once start-up is done: keep what it created (imports, the model, some 120,000 objects) out of the garbage
    collector's scans, as it lives as long as the process (demo model, one client: p99 3.0-3.6 ms against 3.9-4.6
    without), and collect the youngest generation less often (``YOUNG_GC_THRESHOLD``; docs/benchmarks.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])


def stored_model(tag: bentoml.Tag | str) -> bentoml.Model:
    """The stored model of ``tag``, with a clear message when it is not in the store."""
    try:
        return bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        home = os.environ.get("BENTOML_HOME", "~/bentoml")
        raise ModelFilesError(
            f"Model {tag} is not in the BentoML model store (BENTOML_HOME={home}; see `bentoml models list`). "
            "Train and store one with `make train`, or set IMGCLS_MODEL to a stored tag."
        ) from None


def open_session(files: ModelFiles, tag: str, strict_device: bool) -> session.ModelSession:
    """The warmed-up session this plan runs, shown in the model-info metric and the log."""
    model = session.open_session(
        files, PLAN.device, SETTINGS.variant, PLAN.ort_threads, SETTINGS.ort_spin, strict_device=strict_device
    )
    session.warm_up(model, files.spec.size, PLAN.max_batch_size, SETTINGS.warmup_runs)
    metrics.get().model_info.labels(model=tag, variant=model.variant, provider=model.provider).set(1)
    threads = f" with {PLAN.ort_threads} threads" if model.device == "cpu" else ""
    log.info("serving %s: %s (%s) on %s%s", tag, model.model_file.name, model.variant, model.provider, threads)
    return model


def open_lone_session(files: ModelFiles, model: session.ModelSession) -> session.ModelSession | None:
    """A second session of ``model``'s variant with ``PLAN.lone_threads`` threads, for one image alone in the
    server (None when the plan has none, or the model runs on a GPU)."""
    if not PLAN.lone_threads or model.device != "cpu":
        return None
    lone = session.open_session(files, "cpu", model.variant, PLAN.lone_threads, SETTINGS.ort_spin)
    session.warm_up(lone, files.spec.size, 1, SETTINGS.warmup_runs)
    log.info("a request alone in the server runs with %d threads", PLAN.lone_threads)
    return lone


class Prediction(BaseModel):
    label: str
    score: float = Field(description="Probability of this label, 0..1")


class ClassifyResult(BaseModel):
    label: str = Field(description="The most likely label")
    score: float = Field(description="Its probability, 0..1")
    top_k: list[Prediction] = Field(description="The top_k most likely labels, most likely first")
    unfamiliar: bool = Field(description="True when the image is unlike anything the model was trained on")
    ood_score: float = Field(description="How unlike the training images it is; unfamiliar above the threshold")
    model: str = Field(description="Tag of the model in the BentoML store")
    request_id: str


class BatchItem(BaseModel):
    label: str | None = None
    score: float | None = None
    top_k: list[Prediction] | None = None
    unfamiliar: bool | None = None
    ood_score: float | None = None
    error: str | None = Field(default=None, description="Set instead of label when this image was refused")
    detail: str | None = None


class ClassifyBatchResult(BaseModel):
    results: list[BatchItem] = Field(description="One entry per uploaded image, in upload order")
    model: str
    request_id: str


@bentoml.service(
    name="shared_model",
    workers=1,
    traffic={"timeout": SETTINGS.timeout_s + 5},
    logging={"access": {"enabled": False}},  # one line per internal batch call is noise
    # BentoML's client replaces its connection pool every 100 requests (default) by closing the old one,
    # which cuts the calls still in flight on it ("Server disconnected"); a local socket needs no refresh.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 365 * 86400.0},
    resources={"gpu": 1} if PLAN.device == "cuda" else None,
)
class SharedModel:
    """Placement "shared": one onnxruntime session fed by every API worker, batching their calls again.

    With placement "worker" this process stays idle and loads nothing: a built Bento's service graph is fixed,
    so the dependency is declared either way.
    """

    model_ref = bentoml.models.BentoModel(SETTINGS.model)

    def __init__(self) -> None:
        show_info_logs()
        supervision.exit_with_supervisor()
        self.batcher: Batcher | None = None
        if not PLAN.shared_model:
            log.info("idle: IMGCLS_PLACEMENT=%s runs the model in the API workers", SETTINGS.placement)
            return
        stored = stored_model(self.model_ref.tag)
        model = open_session(open_model(stored.path), str(stored.tag), strict_device=True)
        self.batcher = Batcher(
            in_process(model), PLAN.max_batch_size, max_wait_s=SETTINGS.max_latency_ms / 1000, retry_after_s=1
        )

    @bentoml.on_startup
    async def drain_on_stop(self) -> None:
        """Keep answering the API workers while they finish their own requests after SIGTERM."""
        if self.batcher is not None:
            supervision.drain_before_exit(SETTINGS.drain_s + SHARED_MODEL_EXTRA_DRAIN_S, lambda: None)

    @bentoml.api(input_spec=NpyArray, output_spec=NpyArray)
    async def infer(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> float32 [N, classes + embedding]: probabilities, then the embedding."""
        if self.batcher is None:
            raise bentoml.exceptions.ServiceUnavailable("no model here: IMGCLS_PLACEMENT puts it in the API workers")
        try:
            return await self.batcher(pixels)
        except ApiError as err:  # overloaded: the API worker answers its client 503 + Retry-After
            raise bentoml.exceptions.ServiceUnavailable(err.detail) from None


@bentoml.service(
    name="image_classifier",
    workers=PLAN.api_workers,
    traffic={"timeout": SETTINGS.body_timeout_s + SETTINGS.timeout_s + 10},  # ours answer first, in our shape
    logging={"access": {"enabled": SETTINGS.access_log}},
    metrics={"duration": {"buckets": REQUEST_BUCKETS}},
    **TRACING,
)
class ImageClassifier:
    """HTTP API: upload photos, get labels. Decoding and preprocessing run here, in every worker."""

    model_ref = bentoml.models.BentoModel(SETTINGS.model)
    shared_model = bentoml.depends(SharedModel)  # used with placement "shared" only

    @bentoml.on_deployment
    def check_model() -> None:
        """Once, in the supervisor, before any worker starts: pin ``:latest`` to one version and refuse a model that
        cannot be served.

        The workers inherit the pinned tag (and the supervisor's pid, service/supervision.py), so a model saved
        while they start cannot split them across versions.
        """
        show_info_logs()
        supervision.become_supervisor()
        balance.create(PLAN.api_workers)
        try:
            stored = stored_model(SETTINGS.model)
            os.environ["IMGCLS_MODEL"] = str(stored.tag)
            self_test.check_stored_model(stored.path, PLAN, SETTINGS)
            ensure_writable(SETTINGS.inference_log_dir)
        except (ModelFilesError, OSError) as exc:
            log.error("cannot serve: %s", exc)
            sys.exit(f"imgcls: cannot serve: {exc}")

    def __init__(self) -> None:
        show_info_logs()
        supervision.exit_with_supervisor()
        balance.join(bentoml.server_context.worker_index)
        stored = stored_model(self.model_ref.tag)
        self.tag = str(stored.tag)
        files = open_model(stored.path)
        recorded = metrics.get()
        self.inference_log = InferenceLogWriter(
            SETTINGS.inference_log_dir,
            max_bytes=SETTINGS.log_max_bytes,
            max_total_bytes=SETTINGS.log_max_total_bytes,
            max_age_s=SETTINGS.log_max_age_days * 86400,
            thumbnail_bytes=SETTINGS.thumbnail_bytes,
            thumbnails_per_s=SETTINGS.thumbnails_per_s,
            on_error=recorded.log_write_errors.inc,
            on_drop=recorded.log_dropped.inc,
        )
        log.info("inference log: %s", self.inference_log.folder)
        wait_s = SETTINGS.max_latency_ms / 1000
        self.decoder = Decoder(files.spec, SETTINGS.decode_limits, SETTINGS.decode_threads)
        self.model: session.ModelSession | None = None  # the session in this worker (placement "worker")
        self.lone_model: session.ModelSession | None = None  # the same with more threads (service/settings.py)
        self.batcher: Batcher | ThreadBatcher
        if PLAN.shared_model:  # SharedModel starts exactly this variant and provider, or stops
            variant = session.choose_variant(SETTINGS.variant, PLAN.device, files.variants)
            provider = CUDA if PLAN.device == "cuda" else CPU
            self.batcher = Batcher(
                self._hop, PLAN.max_batch_size, SETTINGS.hop_in_flight, wait_s, SETTINGS.retry_after_s
            )
        else:  # what the session runs: a CUDA provider that did not start fell back to the CPU and its variant
            self.model = open_session(files, self.tag, strict_device=False)
            self.lone_model = open_lone_session(files, self.model)
            variant, provider = self.model.variant, self.model.provider
            self.batcher = ThreadBatcher(
                self._model_for, self.decoder.fast, PLAN.max_batch_size, wait_s, SETTINGS.retry_after_s
            )
        self.answerer = Answerer(self.tag, variant, files.labels, files.detectors[variant], self.inference_log)
        self.info = pages.model_info(self.tag, files, variant, provider, SETTINGS.max_files, SETTINGS.max_image_bytes)
        self.serving = False

    @bentoml.on_startup
    async def start_self_test(self) -> None:
        """Readiness means one real image went the whole way: decode, preprocess, model, answer."""
        self._self_test = asyncio.get_running_loop().create_task(self._run_self_test())
        supervision.drain_before_exit(SETTINGS.drain_s, self._stop_serving)

    def _stop_serving(self) -> None:
        self.serving = False
        metrics.get().ready.set(0)

    async def _run_self_test(self) -> None:
        try:
            await self_test.classify_test_image(self)
        except Exception as exc:  # a worker that cannot classify must not sit behind an open port
            log.error("the start-up self-test failed (%s); stopping the server", exc)
            supervision.stop_server(f"the start-up self-test failed: {exc}")
            return
        tune_garbage_collector()
        self.serving = True
        metrics.get().ready.set(1)
        log.info("self-test passed: ready")

    async def __is_ready__(self) -> bool:
        return self.serving

    @bentoml.on_shutdown
    def close(self) -> None:
        """Last step of a graceful stop, after the requests in flight: flush the inference log."""
        self._stop_serving()
        self.inference_log.close()
        self.decoder.close()

    @bentoml.api(route="/classify", input_spec=ImageUpload, output_spec=ClassifyResult)
    async def classify(self, image: bytes, top_k: int = 5, source: str = PRODUCTION) -> JSONResponse:
        """Classify one photo (multipart field `image`); returns the top label and the `top_k` most likely."""
        return await self.classify_one(image, top_k, source)

    @bentoml.api(route="/classify_batch", input_spec=ImageBatchUpload, output_spec=ClassifyBatchResult)
    async def classify_batch(self, images: list[bytes], top_k: int = 5, source: str = PRODUCTION) -> JSONResponse:
        """Classify several photos (repeated multipart field `images`) in one request; results in upload order."""
        return await self.classify_many(images, top_k, source)

    # What the two APIs do. Requests come here from service.middleware.DirectRoute, past BentoML's routing; the
    # API methods above are what BentoML routes, documents and calls otherwise.

    async def classify_one(self, image: bytes, top_k: int, source: str) -> JSONResponse:
        request_id = uuid.uuid4().hex
        try:
            pixels, stats, rows = await self.run_one(image)
        except ApiError as err:
            return error_response(err)
        result = self.answerer.answer(rows, [stats], [pixels], top_k, [request_id], source)[0]
        return JSONResponse({**result, "model": self.tag, "request_id": request_id})

    async def classify_many(self, images: list[bytes], top_k: int, source: str) -> JSONResponse:
        request_id = uuid.uuid4().hex
        prepared = await asyncio.gather(*(self.decoder(data) for data in images), return_exceptions=True)
        results: list[dict | None] = [None] * len(images)
        ok = [i for i, p in enumerate(prepared) if not isinstance(p, BaseException)]
        for i, p in enumerate(prepared):
            if isinstance(p, ApiError):
                metrics.reject(p.code)
                results[i] = {"error": p.code, "detail": f"Image {i + 1}: {p.detail}"}
            elif isinstance(p, BaseException):
                raise p
        if ok:
            try:
                rows = await self.batcher(np.stack([prepared[i][0] for i in ok]))
            except ApiError as err:
                return error_response(err)
            answers = self.answerer.answer(
                rows, [prepared[i][1] for i in ok], [prepared[i][0] for i in ok], top_k,
                [f"{request_id}/{i}" for i in ok], source,
            )  # fmt: skip
            for i, answer in zip(ok, answers, strict=True):
                results[i] = answer
        return JSONResponse({"results": results, "model": self.tag, "request_id": request_id})

    async def run_one(self, data: bytes) -> tuple[np.ndarray, dict[str, float], np.ndarray]:
        """One upload decoded and through the model: its pixels, statistics and output row.

        With the model in this worker, the thread that decodes an ordinary image goes on to the model with it
        (service/batching.py: ThreadBatcher); a costly image comes back from its own lane first."""
        opened = self.decoder.open(data)
        if isinstance(self.batcher, ThreadBatcher) and not opened.costly:
            return await self.decoder.decode_then(opened, self.batcher.run)
        pixels, stats = await self.decoder.decode(opened)
        return pixels, stats, await self.batcher(pixels[None])

    def _model_for(self, images: int) -> session.ModelSession:
        """The session for a batch: the one with a thread per core for a request that has had not only its worker
        but the whole server to itself (``service/balance.py``), as one client at a time would otherwise have one
        core working and the rest idle."""
        if images == 1 and self.lone_model is not None and balance.alone(LONE_FOR_S):
            return self.lone_model
        return self.model

    async def _hop(self, pixels: np.ndarray) -> np.ndarray:
        """One call to the shared model process (raw .npy both ways); its failures become 503/504."""
        try:
            try:
                out = await self.shared_model.to_async.infer(pixels)
            except (aiohttp.ClientConnectionError, httpx.TransportError) as exc:
                if isinstance(exc, (aiohttp.ServerTimeoutError, httpx.TimeoutException)):
                    raise
                log.warning("model service connection dropped (%r); retrying once", exc)
                out = await self.shared_model.to_async.infer(pixels)  # inference is idempotent
        except bentoml.exceptions.BentoMLException as exc:
            status = getattr(exc.error_code, "value", 500)
            if status in (429, 503):
                raise ApiError(503, "overloaded", MODEL_BUSY, SETTINGS.retry_after_s) from exc
            if status == 504:
                raise ApiError(504, "timeout", MODEL_TIMEOUT) from exc
            log.error("model service failed: %s", exc)
            raise ApiError(500, "model_error", MODEL_FAILED) from exc
        except (TimeoutError, httpx.TimeoutException, aiohttp.ServerTimeoutError) as exc:
            raise ApiError(504, "timeout", MODEL_TIMEOUT) from exc
        except (httpx.TransportError, aiohttp.ClientError) as exc:  # the model process is restarting or gone
            log.error("model service unreachable: %r", exc)
            raise ApiError(503, "model_unavailable", MODEL_GONE, SETTINGS.retry_after_s) from exc
        return from_npy(out) if isinstance(out, (bytes, bytearray, memoryview)) else np.asarray(out)


#: A request runs on the session with a thread per core after this long with no other request in the server.
LONE_FOR_S = 1.0

MODEL_BUSY = "The model is saturated; retry after the number of seconds in Retry-After."
MODEL_TIMEOUT = "The model did not answer in time; retry later."
MODEL_FAILED = "The model service failed; it is logged. Retry, or report it."
MODEL_GONE = "The model service is not reachable (restarting?); retry shortly."


def count_in_flight(delta: int) -> None:
    """The in-flight gauge (what the GPU overlay's autoscaler reads) and the workers' census."""
    metrics.get().in_flight.inc(delta)
    balance.count_request(delta)


# The first added is the outermost: each request meets them in this order (see service/middleware.py).
ImageClassifier.add_asgi_middleware(KeepAliveLimit, max_requests=SETTINGS.keepalive_requests)
ImageClassifier.add_asgi_middleware(ErrorShape, retry_after_s=SETTINGS.retry_after_s)
ImageClassifier.add_asgi_middleware(ApiKeyAuth, key=API_KEY, paths=PROTECTED)
ImageClassifier.add_asgi_middleware(
    UploadReceiver,
    specs=UPLOADS,
    max_body_bytes=SETTINGS.max_body_bytes,
    timeout_s=SETTINGS.body_timeout_s,
    buffer_bytes=8 * SETTINGS.max_body_bytes,
    retry_after_s=SETTINGS.retry_after_s,
)
ImageClassifier.add_asgi_middleware(
    ConcurrencyLimit,
    paths=UPLOADS,
    max_concurrency=SETTINGS.max_concurrency,
    retry_after_s=SETTINGS.retry_after_s,
    on_change=count_in_flight,
)
ImageClassifier.add_asgi_middleware(Deadline, paths=UPLOADS, timeout_s=SETTINGS.timeout_s)
ImageClassifier.add_asgi_middleware(
    DirectRoute,
    handlers={
        "/classify": lambda u: bentoml.get_current_service().classify_one(u.files[0], u.top_k, u.source),
        "/classify_batch": lambda u: bentoml.get_current_service().classify_many(u.files, u.top_k, u.source),
    },
)


def worker_model_info() -> pages.ModelInfo | None:
    """This worker's /info: what its ImageClassifier opened (None before it exists).

    Read from the instance rather than the store: the instance has already checked the files, chosen the
    variant and started the provider, so /info cannot describe a model or provider other than the one serving.
    """
    try:
        return bentoml.get_current_service().info
    except bentoml.exceptions.BentoMLException:
        return None


# /ui, /info, /docs, /docs.json and / (to /docs). Mounted apps come after the API routes in BentoML's router and
# match only the paths they declare, so the API routes never run this code.
ImageClassifier.mount_asgi_app(
    pages.create_app(worker_model_info, lambda: ImageClassifier.openapi_spec.asdict(), api_key=bool(API_KEY)),
    path="/",
    name="pages",
)
