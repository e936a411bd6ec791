"""The onnxruntime session that runs the model: which file on which device, explicit providers, threads, warm-up.

Providers are always listed explicitly, so onnxruntime-gpu on a machine without CUDA never tries (and loudly
fails) to start the CUDA provider, and the log says which provider and file are in use. Every file of the
stored model is checked against its sha256 before the session is created.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcls.model_files import INPUT_NAME, OUTPUT_EMBEDDING, OUTPUT_PROBS, ModelFiles, ModelFilesError
from imgcls.onnx_run import CPU, CUDA
from service import metrics

log = logging.getLogger(__name__)

DEFAULT_VARIANT = {"cuda": "fp16", "cpu": "int8"}


def choose_variant(requested: str, device: str, available: dict[str, Path]) -> str:
    """The model file variant: the requested one (must exist), else the device default, else fp32."""
    if requested:
        if requested not in available:
            raise ModelFilesError(
                f"IMGCLS_VARIANT={requested} but the model only has {sorted(available)}; pick one of those."
            )
        return requested
    preferred = DEFAULT_VARIANT[device]
    if preferred in available:
        return preferred
    log.warning("model has no %s variant for %s; using fp32", preferred, device)
    if "fp32" not in available:
        raise ModelFilesError(f"model has none of the variants fp32/fp16/int8 (found {sorted(available)})")
    return "fp32"


@dataclass
class ModelSession:
    """A warmed-up onnxruntime session of one variant, and what it runs on."""

    session: object
    device: str
    provider: str
    variant: str
    model_file: Path
    classes: int
    pad_to_bucket: bool  # pad batches to powers of two so the GPU sees few shapes (cuDNN tunes per shape)
    last_seconds: float = 0.0  # how long the last batch took in the session

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> float32 [N, classes + embedding]: probabilities, then the embedding; counted in
        the metrics."""
        start = time.perf_counter()
        probs, embedding = self.run(pixels)
        self.last_seconds = time.perf_counter() - start
        recorded = metrics.get()
        recorded.model_seconds.observe(self.last_seconds)
        recorded.batch_size.observe(len(pixels))
        return np.concatenate([probs, embedding], axis=1)

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities [N, classes] and embeddings [N, E] (float32) for a uint8 NHWC batch."""
        n = len(pixels)
        if self.pad_to_bucket and n & (n - 1):
            bucket = 1 << (n - 1).bit_length()
            pixels = np.concatenate([pixels, np.zeros((bucket - n, *pixels.shape[1:]), dtype=pixels.dtype)])
        probs, embedding = self.session.run([OUTPUT_PROBS, OUTPUT_EMBEDDING], {INPUT_NAME: pixels})
        return np.asarray(probs[:n], dtype=np.float32), np.asarray(embedding[:n], dtype=np.float32)


def _create(path: Path, device: str, threads: int, spin: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # onnxruntime's own warnings are noise here; our log says what is active
    if device == "cpu":
        # The API workers decode on the same cores between batches, so threads must not spin-wait for work
        # (onnxruntime's default) and steal their CPU.
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        providers = [CPU]
    else:
        try:
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels or the system, before the provider loads
        except Exception as exc:  # a missing library shows up below as a CUDA provider that did not start
            log.warning("onnxruntime.preload_dlls() failed: %s", exc)
        providers = [(CUDA, {"device_id": 0, "cudnn_conv_algo_search": "EXHAUSTIVE"}), CPU]
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own types for a graph it cannot load
        raise ModelFilesError(f"onnxruntime cannot load {path}: {exc}") from None


def open_session(
    files: ModelFiles, device: str, variant: str, threads: int = 1, spin: bool = False, strict_device: bool = False
) -> ModelSession:
    """A session of the chosen variant on ``device`` (falling back to the CPU when CUDA does not start, unless
    ``strict_device``), checked to output one probability per label."""
    chosen = choose_variant(variant, device, files.variants)
    session = _create(files.variants[chosen], device, threads, spin)
    provider = session.get_providers()[0]
    if device == "cuda" and provider != CUDA:
        if strict_device:
            raise ModelFilesError(
                "IMGCLS_DEVICE=cuda but onnxruntime could not start the CUDA provider (CUDA 13 and cuDNN 9 "
                "libraries are needed); check `nvidia-smi`, or set IMGCLS_DEVICE=cpu."
            )
        log.warning("CUDA provider did not start; falling back to the CPU")
        return open_session(files, "cpu", variant, threads, spin)
    return ModelSession(
        session, device, provider, chosen, files.variants[chosen], len(files.labels), pad_to_bucket=device == "cuda"
    )


def warm_up(model: ModelSession, size: int, max_batch_size: int, runs: int) -> None:
    """Run the batch sizes the service will see, so the first requests do not pay for allocation or tuning,
    and check the outputs' shapes against the labels."""
    sizes = sorted({1, max_batch_size})
    if model.pad_to_bucket:  # every bucket shape once, so cuDNN tunes them all now
        sizes = sorted({1 << i for i in range(max_batch_size.bit_length() + 1)})
    start = time.perf_counter()
    for n in sizes:
        for _ in range(max(1, runs)):
            probs, embedding = model.run(np.zeros((n, size, size, 3), dtype=np.uint8))
            if probs.shape != (n, model.classes) or embedding.ndim != 2 or len(embedding) != n:
                raise ModelFilesError(
                    f"{model.model_file} outputs probabilities of shape {probs.shape} and embeddings of shape "
                    f"{embedding.shape} for {n} images, but labels.json lists {model.classes} classes: the stored "
                    "model is inconsistent; re-run training."
                )
    log.info("warm-up with batch sizes %s took %.2fs", sizes, time.perf_counter() - start)
