"""The start-up self-test: a real image through the whole path before the server says it is ready.

Twice, for two reasons. Once in the process that starts the workers, before any of them
(:func:`check_stored_model`): every stored file against its sha256, the preprocessing spec, the labels, the
detectors, and the image through a CPU session of the file that will be served, so a model that cannot be
served stops ``bentoml serve`` within seconds, with one message and a non-zero exit, instead of workers
failing and restarting behind an open port. Then in every API worker (:func:`classify_test_image`), through
its own serving core (``service/core.py``: decoding, batching, the model or the model process), before
``/readyz`` answers 200.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
import typing as t
from pathlib import Path

import bentoml
import numpy as np
from PIL import Image

from imgcls.errors import ApiError
from imgcls.imagestats import image_stats
from imgcls.model_files import ModelFilesError, open_model
from imgcls.preprocess import preprocess_bytes
from service import session

if t.TYPE_CHECKING:
    from service.core import Classifier
    from service.settings import Plan, Settings

log = logging.getLogger(__name__)

#: How long a worker keeps trying while the shared model process is still starting.
SHARED_MODEL_WAIT_S = 300.0


def test_image() -> bytes:
    """A 320x240 JPEG photo-like gradient with a square: exercises decode, draft scaling and resize."""
    x, y = np.meshgrid(np.linspace(0, 255, 320), np.linspace(0, 255, 240))
    rgb = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    rgb[60:120, 80:160] = (240, 200, 40)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def check_outputs(rows: np.ndarray, classes: int, score: float, what: str) -> None:
    """Refuse model outputs no answer can be made of: wrong width, non-finite, not probabilities."""
    if rows.ndim != 2 or rows.shape[0] != 1 or rows.shape[1] <= classes:
        raise ModelFilesError(f"{what} returned outputs of shape {rows.shape}; expected [1, {classes} + embedding].")
    probs = rows[0, :classes]
    if not np.all(np.isfinite(rows)) or abs(float(probs.sum()) - 1.0) > 1e-2 or probs.min() < -1e-6:
        raise ModelFilesError(f"{what} returned outputs that are not finite probabilities: {probs[:8]} ...")
    if not np.isfinite(score):
        raise ModelFilesError(f"{what}: the unfamiliar-image score of the test image is not finite ({score}).")


def check_stored_model(folder: str | Path, plan: Plan, settings: Settings) -> None:
    """Check the stored model and run the test image through a CPU session of the variant to be served."""
    start = time.perf_counter()
    files = open_model(folder)
    variant = session.choose_variant(settings.variant, plan.device, files.variants)
    model = session.open_session(files, "cpu", variant, threads=1)
    try:
        pixels, size = preprocess_bytes(test_image(), files.spec)
    except ApiError as exc:
        raise ModelFilesError(f"the test image cannot be preprocessed with {folder}/preprocess.json: {exc}") from None
    try:
        rows = model.infer(pixels[None])
    except Exception as exc:  # onnxruntime's own error types: a shape or type the graph does not take
        raise ModelFilesError(
            f"{model.model_file.name} cannot run the test image as {folder}/preprocess.json prepares it: {exc}"
        ) from None
    detector = files.detectors[variant]
    n = len(files.labels)
    score = float(detector.score(rows[:, n:], [image_stats(pixels, size)], rows[:, :n])[0])
    check_outputs(rows, len(files.labels), score, str(model.model_file))
    log.info("model check passed in %.2fs: %s (%s)", time.perf_counter() - start, folder, variant)


async def classify_test_image(classifier: Classifier) -> None:
    """The test image through a worker's serving core, as /classify runs one; waits while a shared model starts."""
    deadline = time.monotonic() + SHARED_MODEL_WAIT_S
    while True:
        try:
            [outcome] = await classifier.infer([test_image()])
        except ApiError as err:
            outcome = err
        if not isinstance(outcome, ApiError):
            break
        if outcome.status not in (503, 504) or time.monotonic() > deadline:  # 503/504: the model process starts
            raise ModelFilesError(f"the test image got no answer from the model: {outcome.detail}")
        await asyncio.sleep(0.5)
    answerer = classifier.answerer
    classes = len(answerer.labels)
    score = float(answerer.detector.score(outcome.rows[:, classes:], [outcome.stats], outcome.rows[:, :classes])[0])
    check_outputs(np.asarray(outcome.rows), classes, score, "the model")


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
