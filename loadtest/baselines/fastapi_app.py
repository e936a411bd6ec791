"""The hand-written baselines: what an engineer writes to serve an ONNX classifier without this project.

FastAPI under uvicorn; per request: read the upload, decode it with Pillow, resize, run the model on that
single image (no batching). Endpoints are plain ``def`` so FastAPI runs them in its thread pool (Pillow and
onnxruntime release the GIL): a fair baseline, not a strawman that blocks the event loop. Same /classify and
/classify_batch API and response shape as the service, so one Locust scenario runs against both. How it runs
comes from the environment (``loadtest.servers.BASELINES`` sets it for each named baseline):

- ``BASELINE_VARIANT``: fp32 (default), fp16 or int8;
- ``BASELINE_ORT_THREADS``: onnxruntime threads per process (0, default: every core);
- ``BASELINE_DRAFT=1``: decode JPEGs at reduced scale, as Pillow's docs suggest for thumbnails;
- the number of processes is uvicorn's ``--workers``.

    BASELINE_MODEL_DIR=/path/to/model/folder uvicorn --factory loadtest.baselines.fastapi_app:create_app --port 8000

or ``IMGCLS_MODEL=<tag>`` instead of ``BASELINE_MODEL_DIR`` to load from the BentoML model store.
"""

import io
import json
import os
import uuid
from pathlib import Path
from typing import Annotated


def model_folder() -> tuple[Path, str]:
    """The model folder and its tag: ``BASELINE_MODEL_DIR``, else ``IMGCLS_MODEL`` looked up in the model store."""
    folder = os.environ.get("BASELINE_MODEL_DIR")
    if folder:
        return Path(folder), os.environ.get("BASELINE_MODEL_TAG", Path(folder).name)
    import bentoml

    model = bentoml.models.get(os.environ.get("IMGCLS_MODEL", "image-classifier:latest"))
    return Path(model.path), str(model.tag)


def create_app():
    """Build the FastAPI app (a factory, so importing this module stays cheap)."""
    import numpy as np
    import onnxruntime as ort
    from fastapi import FastAPI, File, Form, HTTPException, UploadFile
    from PIL import Image

    folder, tag = model_folder()
    labels = json.loads((folder / "labels.json").read_text())
    size = json.loads((folder / "preprocess.json").read_text())["size"]
    variant = os.environ.get("BASELINE_VARIANT", "fp32")
    threads = int(os.environ.get("BASELINE_ORT_THREADS", "0"))
    draft = os.environ.get("BASELINE_DRAFT", "0") == "1"
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(folder / f"model_{variant}.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
    )
    app = FastAPI(title=f"Baseline image classifier (FastAPI, {variant}, one image per call)")

    def predict(data: bytes, top_k: int) -> dict:
        try:
            img = Image.open(io.BytesIO(data))
            if draft and img.format == "JPEG":
                img.draft("RGB", (size, size))
            img = img.convert("RGB")
        except Exception as exc:
            raise HTTPException(status_code=400, detail=f"Could not read the image: {exc}") from exc
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        pixels = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)[None]
        probs = session.run(["probs"], {"pixels": pixels})[0][0]
        order = np.argsort(-probs)[: max(1, top_k)]
        top = [{"label": labels[i], "score": float(probs[i])} for i in order]
        return {"label": top[0]["label"], "score": top[0]["score"], "top_k": top}

    @app.get("/livez")
    def livez() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready"}

    @app.post("/classify")
    def classify(image: Annotated[UploadFile, File()], top_k: Annotated[int, Form()] = 5) -> dict:
        result = predict(image.file.read(), top_k)
        return {**result, "model": tag, "request_id": uuid.uuid4().hex}

    @app.post("/classify_batch")
    def classify_batch(images: Annotated[list[UploadFile], File()], top_k: Annotated[int, Form()] = 5) -> dict:
        results = [predict(f.file.read(), top_k) for f in images]
        return {"results": results, "model": tag, "request_id": uuid.uuid4().hex}

    return app
