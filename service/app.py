"""The BentoML services: ``Classifier`` answers HTTP; the model runs in it or in ``ImageModel``.

Dataflow of one ``POST /classify``::

    API worker (IMGCLS_WORKERS processes)
    read multipart -> decode, orient, resize, statistics -> uint8 [1, S, S, 3]
      -> BentoML adaptive batching -> onnxruntime          (placement "worker": in this process)
      -> .npy ---- bentoml.depends ---> ImageModel           (placement "shared": one model process,
                                        adaptive batching     fed by every worker)
                                        -> onnxruntime
    top-k JSON response; inference-log record; metrics

Decoding runs in parallel in the API workers, never inside the batched call (that would serialize
it). ``IMGCLS_PLACEMENT=auto`` shares one model process on a GPU (one CUDA session, big batches)
and keeps a model in every worker on the CPU (no HTTP hop; see :mod:`service.model`).
``bentoml serve`` and ``bentoml build`` read this module through ``bentofile.yaml``.
Settings: see :mod:`service.settings`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import typing as t
import uuid
from pathlib import Path

import aiohttp
import bentoml
import httpx
import numpy as np
from bentoml._internal.configuration.containers import BentoMLContainer
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse, RedirectResponse

from service import metrics, runtime
from service.artifacts import load_labels
from service.coalesce import Coalescer
from service.errors import RequestGuard, error_response
from service.imagestats import image_stats
from service.inference_log import InferenceLogWriter, make_record
from service.model import InProcessBatching, Model
from service.preprocess import SPEC_FILE, ImageError, PreprocessSpec, preprocess_bytes
from service.settings import Settings
from service.upload import ImageBatchUpload, ImageUpload
from service.wire import NpyArray, from_npy

log = logging.getLogger(__name__)

settings = Settings.from_env()
if bentoml.Tag.from_taglike(settings.model).version in (None, "latest"):
    # Pin "latest" once, here in the process that starts the workers (they inherit the environment), so a
    # model saved while the workers start cannot make them serve different versions.
    try:
        os.environ["IMGCLS_MODEL"] = str(bentoml.models.get(settings.model).tag)
        settings = dataclasses.replace(settings, model=os.environ["IMGCLS_MODEL"])
    except bentoml.exceptions.NotFound:
        pass  # each service says so, with what to do, when it starts
if "IMGCLS_MAX_BATCH_SIZE" not in os.environ and settings.device != "cpu" and runtime.gpu_present():
    settings = dataclasses.replace(settings, max_batch_size=128)  # fp16 on a big GPU peaks near batch 128
# Decided when the service starts (not when the Bento is built: a Bento built here runs on a GPU machine).
SHARED_MODEL = settings.placement == "shared" or (
    settings.placement == "auto" and runtime.choose_device(settings.device) == "cuda"
)
if not SHARED_MODEL and not settings.ort_threads:  # one session per worker: share the cores out
    settings = dataclasses.replace(settings, ort_threads=max(1, settings.intra_op_threads // settings.api_workers))
ImageBatchUpload.max_files = settings.max_files
API_PATHS = ("/classify", "/classify_batch")
# BentoML wraps every request in an OpenTelemetry span, exported only when an exporter is configured; unexported,
# it took about a tenth of an API worker's profile samples (py-spy, demo model, 16 users). So the API routes skip it
# unless IMGCLS_TRACING=1 (set it with BentoML's tracing configuration).
TRACING = {} if settings.tracing else {"tracing": {"excluded_urls": list(API_PATHS)}}
MODEL_BUSY = "The model is saturated; retry after the number of seconds in Retry-After."
MODEL_TIMEOUT = "The model did not answer in time; retry later."
MODEL_FAILED = "The model service failed; it is logged. Retry, or report it."
MODEL_GONE = "The model service is not reachable (restarting?); retry shortly."


def show_info_logs() -> None:
    """Let this package's INFO lines through: BentoML's worker logging passes only warnings from other loggers."""
    logging.getLogger("service").setLevel(logging.INFO)
    for name, logger in logging.root.manager.loggerDict.items():
        if (name == "service" or name.startswith("service.")) and isinstance(logger, logging.Logger):
            logger.disabled = False


async def docs_redirect(scope: dict, receive: t.Any, send: t.Any) -> None:
    """``/docs``: BentoML serves its OpenAPI page (Swagger UI) at ``/``."""
    await RedirectResponse("/")(scope, receive, send)


def stored_model(ref: bentoml.models.BentoModel) -> bentoml.Model:
    """The model behind a class-scope reference, with a clear message when it is not in the store."""
    try:
        return bentoml.models.get(ref.tag)
    except bentoml.exceptions.NotFound:
        home = os.environ.get("BENTOML_HOME", "~/bentoml")
        raise runtime.ModelLoadError(
            f"Model {ref.tag} is not in the BentoML model store (BENTOML_HOME={home}; see `bentoml models list`). "
            "Train and store one with `make train`, or set IMGCLS_MODEL to a stored tag."
        ) from None


class Prediction(BaseModel):
    label: str
    score: float = Field(description="Probability of this label, 0..1")


class ClassifyResult(BaseModel):
    label: str = Field(description="The most likely label")
    score: float = Field(description="Its probability, 0..1")
    top_k: list[Prediction] = Field(description="The top_k most likely labels, most likely first")
    model: str = Field(description="Tag of the model in the BentoML store")
    request_id: str


class BatchItem(BaseModel):
    label: str | None = None
    score: float | None = None
    top_k: list[Prediction] | None = None
    error: str | None = Field(default=None, description="Set instead of label when this image was refused")
    detail: str | None = None


class ClassifyBatchResult(BaseModel):
    results: list[BatchItem] = Field(description="One entry per uploaded image, in upload order")
    model: str
    request_id: str


@bentoml.service(
    name="image_model",
    workers=1,
    threads=1,  # one batch at a time; onnxruntime itself uses every core (IMGCLS_ORT_THREADS)
    traffic={"timeout": settings.timeout_s + 5},
    logging={"access": {"enabled": False}},  # one line per internal batch call is noise
    # BentoML's client replaces its connection pool every 100 requests (default) by closing the old one,
    # which cuts the calls still in flight on it ("Server disconnected"); a local socket needs no refresh.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 365 * 86400.0},
    resources={"gpu": 1} if settings.device != "cpu" and runtime.gpu_present() else None,
)
class ImageModel:
    """Placement "shared": one onnxruntime session fed by every API worker through BentoML's adaptive batching.

    With placement "worker" this process stays idle and loads nothing: a built Bento's service graph is fixed,
    so the dependency is declared either way.
    """

    model_ref = bentoml.models.BentoModel(settings.model)

    def __init__(self) -> None:
        show_info_logs()
        self.model = None
        if SHARED_MODEL:
            stored = stored_model(self.model_ref)
            self.model = Model(runtime.load(stored.path, settings), str(stored.tag))
        else:
            log.info("idle: IMGCLS_PLACEMENT=%s runs the model in the API workers", settings.placement)

    def __is_ready__(self) -> bool:
        return True  # __init__ returns only after loading, verifying and warming up the model

    @bentoml.api(
        batchable=True,
        max_batch_size=settings.max_batch_size,
        max_latency_ms=settings.max_latency_ms,
        input_spec=NpyArray,
        output_spec=NpyArray,
    )
    def infer(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> float32 [N, classes + embedding]: probabilities, then the embedding."""
        if self.model is None:
            raise bentoml.exceptions.ServiceUnavailable("no model here: IMGCLS_PLACEMENT puts it in the API workers")
        return self.model.infer(pixels)


class ModelCallError(Exception):
    """The model service did not answer; carries the HTTP error to give the client."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


@bentoml.service(
    name="image_classifier",
    workers=settings.api_workers,  # one preprocessing worker per core unless IMGCLS_WORKERS
    traffic={"timeout": settings.timeout_s + 10},  # RequestGuard answers 504 first, in our error format
    logging={"access": {"enabled": settings.access_log}},
    **TRACING,
)
class Classifier:
    """HTTP API: upload photos, get labels. Preprocessing runs here, in every worker."""

    model_ref = bentoml.models.BentoModel(settings.model)
    model = bentoml.depends(ImageModel)  # used with placement "shared" only

    def __init__(self) -> None:
        show_info_logs()
        stored = stored_model(self.model_ref)
        self.tag = str(stored.tag)
        folder = Path(stored.path)
        self.spec = PreprocessSpec.load(folder / SPEC_FILE)
        self.labels = load_labels(folder)
        self.metrics = metrics.get()
        if not settings.tracing and BentoMLContainer.config.tracing.exporter_type.get():
            log.warning("a tracing exporter is configured, but the API routes are traced only with IMGCLS_TRACING=1")
        self.inference_log = InferenceLogWriter(settings.log_dir, max_bytes=settings.log_max_bytes)
        if SHARED_MODEL:
            self.predict = Coalescer(self._call_model, settings.max_batch_size, settings.hop_in_flight)
        else:
            model = Model(runtime.load(folder, settings), self.tag)
            self.predict = InProcessBatching(model, settings.max_batch_size, settings.max_latency_ms)

    @bentoml.on_shutdown
    def close_inference_log(self) -> None:
        """Flush the inference log on graceful shutdown."""
        self.inference_log.close()

    @bentoml.api(route="/classify", input_spec=ImageUpload, output_spec=ClassifyResult)
    async def classify(self, image: bytes | ImageError, top_k: int = 5) -> JSONResponse:
        """Classify one photo (multipart field `image`); returns the top label and the `top_k` most likely."""
        if isinstance(image, ImageError):
            return error_response(image.status, image.code, image.detail)
        request_id = uuid.uuid4().hex
        try:
            pixels, stats = self._prepare(image)
            outputs = await self._infer(pixels[None])
        except (ImageError, ModelCallError) as exc:
            return error_response(exc.status, exc.code, exc.detail, retry_after=_retry_after(exc.status))
        result = self._result(outputs[0], stats, top_k, request_id)
        return JSONResponse({**result, "model": self.tag, "request_id": request_id})

    @bentoml.api(route="/classify_batch", input_spec=ImageBatchUpload, output_spec=ClassifyBatchResult)
    async def classify_batch(self, images: list[bytes] | ImageError, top_k: int = 5) -> JSONResponse:
        """Classify several photos (repeated multipart field `images`) in one request; results in upload order."""
        if isinstance(images, ImageError):
            return error_response(images.status, images.code, images.detail)
        request_id = uuid.uuid4().hex
        results: list[dict | None] = [None] * len(images)
        prepared: list[tuple[int, np.ndarray, dict]] = []
        for i, data in enumerate(images):
            try:
                pixels, stats = self._prepare(data)
                prepared.append((i, pixels, stats))
            except ImageError as exc:
                metrics.reject(exc.code)
                results[i] = {"error": exc.code, "detail": f"Image {i + 1}: {exc.detail}"}
        if prepared:
            try:
                outputs = await self._infer(np.stack([p for _, p, _ in prepared]))
            except ModelCallError as exc:
                return error_response(exc.status, exc.code, exc.detail, retry_after=_retry_after(exc.status))
            for row, (i, _, stats) in zip(outputs, prepared, strict=True):
                results[i] = self._result(row, stats, top_k, f"{request_id}/{i}")
        return JSONResponse({"results": results, "model": self.tag, "request_id": request_id})

    def _prepare(self, data: bytes) -> tuple[np.ndarray, dict[str, float]]:
        """Decode and resize one upload (in this worker, not in the batch) plus its drift statistics."""
        start = time.perf_counter()
        pixels, size = preprocess_bytes(data, self.spec, settings.max_pixels)
        stats = image_stats(pixels, size)
        self.metrics.preprocess_seconds.observe(time.perf_counter() - start)
        return pixels, stats

    async def _call_model(self, pixels: np.ndarray) -> np.ndarray:
        """One hop request to the model service (raw .npy both ways); retried once if the connection drops."""
        try:
            out = await self.model.to_async.infer(pixels)
        except (aiohttp.ClientConnectionError, httpx.TransportError) as exc:
            if isinstance(exc, (aiohttp.ServerTimeoutError, httpx.TimeoutException)):
                raise
            log.warning("model service connection dropped (%r); retrying once", exc)
            out = await self.model.to_async.infer(pixels)  # inference is idempotent
        return from_npy(out) if isinstance(out, (bytes, bytearray, memoryview)) else np.asarray(out)

    async def _infer(self, pixels: np.ndarray) -> np.ndarray:
        """Model outputs for a batch, batched with concurrent ones; failures become 503/504."""
        try:
            return await self.predict(pixels)
        except bentoml.exceptions.BentoMLException as exc:
            status = getattr(exc.error_code, "value", 500)
            if status in (429, 503):
                raise ModelCallError(503, "overloaded", MODEL_BUSY) from exc
            if status == 504:
                raise ModelCallError(504, "timeout", MODEL_TIMEOUT) from exc
            log.error("model service failed: %s", exc)
            raise ModelCallError(500, "model_error", MODEL_FAILED) from exc
        except (TimeoutError, httpx.TimeoutException, aiohttp.ServerTimeoutError) as exc:
            raise ModelCallError(504, "timeout", MODEL_TIMEOUT) from exc
        except (httpx.TransportError, aiohttp.ClientError) as exc:  # the model process is restarting or gone
            log.error("model service unreachable: %r", exc)
            raise ModelCallError(503, "model_unavailable", MODEL_GONE) from exc

    def _result(self, row: np.ndarray, stats: dict[str, float], top_k: int, request_id: str) -> dict:
        """Top-k for one image; also logs it and counts it."""
        n = len(self.labels)
        probs, embedding = row[:n], row[n:]
        order = np.argsort(-probs, kind="stable")[: min(top_k, n)]
        top = [{"label": self.labels[j], "score": round(float(probs[j]), 6)} for j in order]
        label, score = top[0]["label"], top[0]["score"]
        self.metrics.predictions.labels(label=label).inc()
        self.metrics.confidence.observe(score)
        self.inference_log.write(make_record(request_id, self.tag, label, score, stats, embedding.tolist()))
        return {"label": label, "score": score, "top_k": top}


def _retry_after(status: int) -> int | None:
    return settings.retry_after_s if status in (429, 503) else None


Classifier.add_asgi_middleware(
    RequestGuard,
    paths=API_PATHS,
    max_body_bytes=settings.max_body_bytes,
    max_concurrency=settings.max_concurrency,
    timeout_s=settings.timeout_s,
    retry_after_s=settings.retry_after_s,
    keepalive_requests=settings.keepalive_requests,
)
Classifier.mount_asgi_app(docs_redirect, path="/docs", name="docs")
