"""The BentoML service: ``POST /classify`` and ``POST /classify_batch``, the pages for people, a model process.

``bentoml serve`` and ``bentoml build`` read this module through ``bentofile.yaml``. The API methods of
:class:`ImageClassifier` are the handlers BentoML routes, documents on ``/docs`` and calls: their IO descriptors
(``service/upload.py``) receive and parse the upload, and they hand it to the serving core (``service/core.py``),
which admits, decodes, batches, runs the model and answers. What BentoML cannot do itself is set up by one call,
``adaptations.install`` (``service/adaptations.py``). The model runs in every API worker on the CPU, or in
:class:`SharedModel`, one process fed by every worker, on a GPU.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
import sys

import bentoml
import numpy as np
from starlette.responses import JSONResponse

from imgcls.errors import ApiError
from imgcls.inference_log import FEEDBACK, INFERENCE, PRODUCTION, InferenceLogWriter, ensure_writable
from imgcls.model_files import ModelFilesError, open_model
from imgcls.onnx_run import CPU, CUDA, cuda_usable
from service import adaptations, feedback, lifecycle, metrics, pages, self_test, session, upload, wire
from service.answers import Answerer, ClassifyBatchResult, ClassifyResult
from service.batching import Batcher
from service.core import Classifier
from service.feedback import FeedbackResult, Label
from service.http import ApiKeyAuth, ErrorShape
from service.settings import Settings, SettingsError, cpu_count, resolve
from service.threads import FairPool
from service.upload import ImageBatchUpload, ImageUpload

log = logging.getLogger(__name__)

try:
    SETTINGS = Settings.from_env()
    PLAN = resolve(SETTINGS, gpu_usable=SETTINGS.device != "cpu" and cuda_usable(), cpus=cpu_count())
    API_KEY = SETTINGS.read_api_key()
except SettingsError as exc:
    sys.exit(f"imgcls: {exc}")
adaptations.install(SETTINGS, "image_classifier", PLAN.api_workers)

API_PATHS = ("/classify", "/classify_batch")
PROTECTED = [*API_PATHS, "/feedback", "/info", "/ui/", *(["/metrics"] if SETTINGS.protect_metrics else [])]
# BentoML wraps every request in an OpenTelemetry span, exported only when an exporter is configured, and
# unexported it still costs CPU on every request: the API routes skip it unless IMGCLS_TRACING=1.
TRACING = {} if SETTINGS.tracing else {"tracing": {"excluded_urls": list(API_PATHS)}}
# BentoML's request-duration histogram, with edges around the 200 ms p99 objective the alerts and load tests use
# (its default buckets jump from 100 to 250 ms).
REQUEST_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0]
#: The model process stops this much later than the API workers, which may still send it images meanwhile.
SHARED_MODEL_EXTRA_DRAIN_S = 5.0


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
        lifecycle.show_info_logs()
        self.batcher: Batcher | None = None
        if not PLAN.shared_model:
            log.info("idle: IMGCLS_PLACEMENT=%s runs the model in the API workers", SETTINGS.placement)
            return
        stored = self_test.stored_model(self.model_ref.tag)
        model = session.open_served(open_model(stored.path), str(stored.tag), PLAN, SETTINGS, strict_device=True)
        self.batcher = Batcher(model.infer, PLAN.max_batch_size, max_wait_s=SETTINGS.max_latency_ms / 1000)
        self.threads = FairPool(2, "model")  # one runs a batch while the other queues what arrives meanwhile

    @bentoml.on_startup
    async def drain_on_stop(self) -> None:
        """Keep answering the API workers while they finish their own requests after SIGTERM."""
        if self.batcher is not None:
            lifecycle.drain_on_sigterm(SETTINGS.drain_s + SHARED_MODEL_EXTRA_DRAIN_S, lambda: None)

    @bentoml.api(input_spec=wire.NpyArray, output_spec=wire.NpyArray)
    async def infer(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> float32 [N, classes + embedding]: probabilities, then the embedding."""
        if self.batcher is None:
            raise bentoml.exceptions.ServiceUnavailable("no model here: IMGCLS_PLACEMENT puts it in the API workers")
        ran: concurrent.futures.Future = concurrent.futures.Future()
        self.threads.submit(None, self.batcher.submit, pixels, ran)
        try:
            return await asyncio.wrap_future(ran)
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
    """HTTP API: upload photos, get labels. Decoding runs here, in every API worker; the model too on the CPU."""

    model_ref = bentoml.models.BentoModel(SETTINGS.model)
    shared_model = bentoml.depends(SharedModel)  # used with placement "shared" only

    @bentoml.on_deployment
    def check_model() -> None:
        """Once, in the supervisor, before any worker starts: pin ``:latest`` to one version and refuse a model that
        cannot be served, so a model saved while the workers start cannot split them across versions."""
        lifecycle.show_info_logs()
        try:
            stored = self_test.stored_model(SETTINGS.model)
            os.environ["IMGCLS_MODEL"] = str(stored.tag)  # the workers copy the supervisor's environment
            self_test.check_stored_model(stored.path, PLAN, SETTINGS)
            ensure_writable(SETTINGS.inference_log_dir)
            feedback.load_key(SETTINGS.request_id_key_path)
        except (ModelFilesError, OSError) as exc:
            log.error("cannot serve: %s", exc)
            sys.exit(f"imgcls: cannot serve: {exc}")

    def __init__(self) -> None:
        lifecycle.show_info_logs()
        stored = self_test.stored_model(self.model_ref.tag)
        self.tag = str(stored.tag)
        files = open_model(stored.path)
        recorded = metrics.get()
        logs = {
            kind: InferenceLogWriter(
                SETTINGS.inference_log_dir,
                max_bytes=SETTINGS.log_max_bytes,
                max_total_bytes=SETTINGS.log_max_total_bytes,
                max_age_s=SETTINGS.log_max_age_days * 86400,
                thumbnail_bytes=SETTINGS.thumbnail_bytes,
                thumbnails_per_s=SETTINGS.thumbnails_per_s,
                kept_image_bytes=SETTINGS.keep_images_bytes if kind == INFERENCE else 0,
                on_error=recorded.log_write_errors.inc,
                on_drop=recorded.log_dropped.inc,
                kind=kind,
            )
            for kind in (INFERENCE, FEEDBACK)
        }
        self.inference_log, self.feedback_log = logs[INFERENCE], logs[FEEDBACK]
        log.info("inference log: %s", self.inference_log.folder)
        if PLAN.shared_model:  # SharedModel starts exactly this variant and provider, or stops
            variant = session.choose_variant(SETTINGS.variant, PLAN.device, files.variants)
            provider = CUDA if PLAN.device == "cuda" else CPU
            loop = asyncio.get_running_loop()  # BentoML creates the service in its event loop
            run = wire.hop(self.shared_model.to_async, loop, SETTINGS.timeout_s + 5, SETTINGS.retry_after_s)
        else:  # what the session runs: a CUDA provider that did not start fell back to the CPU and its variant
            model = session.open_in_worker(files, self.tag, PLAN, SETTINGS)
            variant, provider, run = model.variant, model.provider, model.infer
        answerer = Answerer(self.tag, variant, files.labels, files.detectors[variant], self.inference_log)
        ids = feedback.RequestIds(feedback.load_key(SETTINGS.request_id_key_path))
        self.classifier = Classifier.for_settings(files.spec, run, answerer, SETTINGS, PLAN, ids.new)
        self.labels_sent = feedback.Feedback(ids, files.labels, self.tag, self.feedback_log)
        upload.configure(SETTINGS)
        self.info = pages.model_info(self.tag, files, variant, provider, SETTINGS.max_files, SETTINGS.max_image_bytes)
        self.serving = False

    @bentoml.on_startup
    async def start_self_test(self) -> None:
        """Readiness means one real image went the whole way: decode, preprocess, model, answer."""
        self._self_test = asyncio.get_running_loop().create_task(self._run_self_test())
        lifecycle.drain_on_sigterm(SETTINGS.drain_s, self._stop_serving)

    def _stop_serving(self) -> None:
        self.serving = False
        metrics.get().ready.set(0)

    async def _run_self_test(self) -> None:
        try:
            await self_test.classify_test_image(self.classifier)
        except Exception as exc:  # a worker that cannot classify must not sit behind an open port
            log.error("the start-up self-test failed (%s); stopping the server", exc)
            lifecycle.stop_server(f"the start-up self-test failed: {exc}")
            return
        # What start-up created (imports, the model) lives as long as the process: out of the collector's scans.
        # A request's objects live until it is answered: collecting the youngest generation every few hundred
        # allocations would scan them several times per request (docs/results/2026-12-05-before-redesign.md).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, *gc.get_threshold()[1:])
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
        self.feedback_log.close()
        self.classifier.close()

    @bentoml.api(route="/classify", input_spec=ImageUpload, output_spec=ClassifyResult)
    async def classify(self, image: bytes, top_k: int = 5, source: str = PRODUCTION) -> JSONResponse:
        """Classify one photo (multipart field `image`); returns the top label and the `top_k` most likely."""
        return JSONResponse(await self.classifier.classify(image, top_k, source))

    @bentoml.api(route="/classify_batch", input_spec=ImageBatchUpload, output_spec=ClassifyBatchResult)
    async def classify_batch(self, images: list[bytes], top_k: int = 5, source: str = PRODUCTION) -> JSONResponse:
        """Classify several photos (repeated multipart field `images`) in one request; results in upload order."""
        return JSONResponse(await self.classifier.classify_batch(images, top_k, source))

    @bentoml.api(route="/feedback", output_spec=FeedbackResult)
    async def feedback(self, request_id: str = "", label: str = "", items: list[Label] | None = None) -> JSONResponse:
        """Send the true label of an answered image (or `items`, several at once); the accuracy job joins the labels
        to the predictions (python -m drift.accuracy)."""
        return JSONResponse(self.labels_sent.record(request_id, label, items or []))


def worker_model_info() -> pages.ModelInfo | None:
    """This worker's /info: what its ImageClassifier opened (None before it exists)."""
    try:
        return bentoml.get_current_service().info
    except bentoml.exceptions.BentoMLException:
        return None


# The first added is the outermost: error bodies of other shapes are reshaped, then the API key checked before a
# body is read.
ImageClassifier.add_asgi_middleware(ErrorShape, retry_after_s=SETTINGS.retry_after_s)
if API_KEY:
    ImageClassifier.add_asgi_middleware(ApiKeyAuth, key=API_KEY, paths=PROTECTED)
# /ui, /info, /docs, /docs.json and / (to /docs). Mounted apps come after the API routes in BentoML's router and
# match only the paths they declare, so the API routes never run this code.
ImageClassifier.mount_asgi_app(
    pages.create_app(worker_model_info, lambda: ImageClassifier.openapi_spec.asdict(), api_key=bool(API_KEY)),
    path="/",
    name="pages",
)
