"""The onnxruntime session: which device and model variant, explicit providers, threads, warm-up.

Chosen automatically (CUDA + fp16 when a GPU is usable, else CPU + int8) and overridable with
``IMGCLS_DEVICE`` and ``IMGCLS_VARIANT``. Providers are always listed explicitly, so onnxruntime-gpu
on a machine without CUDA never tries (and loudly fails) to start the CUDA provider, and the log
says which provider and file are in use.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service import artifacts
from service.preprocess import SPEC_FILE, PreprocessSpec
from service.settings import Settings

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_VARIANT = {"cuda": "fp16", "cpu": "int8"}


class ModelLoadError(RuntimeError):
    """The stored model cannot be served as configured; the message says what to do."""


def gpu_present() -> bool:
    """True when an NVIDIA driver is loaded (cheap check before trying the CUDA provider)."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def choose_device(requested: str) -> str:
    """``cuda`` or ``cpu``: the requested one, or for ``auto`` CUDA when onnxruntime and a driver offer it."""
    if requested in ("cpu", "cuda"):
        return requested
    import onnxruntime as ort

    return "cuda" if CUDA in ort.get_available_providers() and gpu_present() else "cpu"


def choose_variant(requested: str, device: str, available: dict[str, str]) -> str:
    """The model file variant: the requested one (must exist), else the device default, else fp32."""
    if requested:
        if requested not in available:
            raise ModelLoadError(
                f"IMGCLS_VARIANT={requested} but the model only has {sorted(available)}; pick one of those."
            )
        return requested
    preferred = DEFAULT_VARIANT[device]
    if preferred in available:
        return preferred
    log.warning("model has no %s variant for %s; using fp32", preferred, device)
    if "fp32" not in available:
        raise ModelLoadError(f"model has none of the variants fp32/fp16/int8 (found {sorted(available)})")
    return "fp32"


@dataclass
class Runtime:
    """A warmed-up session plus what the service needs to describe its outputs."""

    session: object
    device: str
    provider: str
    variant: str
    model_file: Path
    labels: list[str]
    spec: PreprocessSpec
    pad_to_bucket: bool  # pad batches to powers of two so the GPU sees few shapes (cuDNN tunes per shape)

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities [N, classes] and embeddings [N, E] (float32) for a uint8 NHWC batch."""
        n = len(pixels)
        if self.pad_to_bucket and n & (n - 1):
            bucket = 1 << (n - 1).bit_length()
            pixels = np.concatenate([pixels, np.zeros((bucket - n, *pixels.shape[1:]), dtype=pixels.dtype)])
        probs, embedding = self.session.run(
            [artifacts.OUTPUT_PROBS, artifacts.OUTPUT_EMBEDDING], {artifacts.INPUT_NAME: pixels}
        )
        return np.asarray(probs[:n], dtype=np.float32), np.asarray(embedding[:n], dtype=np.float32)


def _session_options(settings: Settings, device: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if device == "cpu":
        # One batch at a time uses every core; the API workers decode on the same cores between
        # batches, so threads must not spin-wait for work (ORT's default) and steal their CPU.
        opts.intra_op_num_threads = settings.intra_op_threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.ort_spin else "0")
    opts.log_severity_level = 3  # onnxruntime's own warnings are noise here; our log says what is active
    return opts


def _create_session(path: Path, settings: Settings, device: str):
    import onnxruntime as ort

    if device == "cuda":
        try:
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels or the system, before the provider loads
        except Exception as exc:  # a missing library shows up below as a CUDA provider that did not start
            log.warning("onnxruntime.preload_dlls() failed: %s", exc)
        providers = [(CUDA, {"device_id": 0, "cudnn_conv_algo_search": "EXHAUSTIVE"}), CPU]
    else:
        providers = [CPU]
    return ort.InferenceSession(str(path), sess_options=_session_options(settings, device), providers=providers)


def load(folder: str | Path, settings: Settings) -> Runtime:
    """Verify the stored files, create the session on the chosen device and warm it up."""
    import json

    folder = Path(folder)
    try:
        artifacts.verify(folder)
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{folder} is incomplete ({exc}); re-run training to store the model again.") from exc
    except artifacts.IntegrityError as exc:
        raise ModelLoadError(f"refusing to serve a model that fails its checksum: {exc}") from exc
    available = json.loads((folder / artifacts.MANIFEST_FILE).read_text())["variants"]
    spec = PreprocessSpec.load(folder / SPEC_FILE)
    labels = artifacts.load_labels(folder)

    device = choose_device(settings.device)
    variant = choose_variant(settings.variant, device, available)
    path = folder / available[variant]
    session = _create_session(path, settings, device)
    provider = session.get_providers()[0]
    if device == "cuda" and provider != CUDA:
        if settings.device == "cuda":
            raise ModelLoadError(
                "IMGCLS_DEVICE=cuda but onnxruntime could not start the CUDA provider (CUDA 13 and cuDNN 9 "
                "libraries are needed); check `nvidia-smi`, or set IMGCLS_DEVICE=cpu."
            )
        log.warning("CUDA provider did not start; falling back to the CPU")
        device = "cpu"
        variant = choose_variant(settings.variant, device, available)
        path = folder / available[variant]
        session = _create_session(path, settings, device)
        provider = session.get_providers()[0]

    runtime = Runtime(session, device, provider, variant, path, labels, spec, pad_to_bucket=device == "cuda")
    warm_up(runtime, settings)
    log.info(
        "model ready: %s (%s) on %s%s, %d classes, input %dx%d",
        path,
        variant,
        provider,
        f" with {settings.intra_op_threads} threads" if device == "cpu" else "",
        len(labels),
        spec.size,
        spec.size,
    )
    return runtime


def warm_up(runtime: Runtime, settings: Settings) -> None:
    """Run the batch sizes the service will see, so the first requests do not pay for allocation or tuning."""
    s = runtime.spec.size
    sizes = sorted({1, settings.max_batch_size})
    if runtime.pad_to_bucket:  # every bucket shape once, so cuDNN tunes them all now
        sizes = sorted({1 << i for i in range(settings.max_batch_size.bit_length() + 1)})
    start = time.perf_counter()
    for n in sizes:
        for _ in range(max(1, settings.warmup_runs)):
            probs, embedding = runtime.run(np.zeros((n, s, s, 3), dtype=np.uint8))
    if probs.shape[1] != len(runtime.labels):
        raise ModelLoadError(
            f"{runtime.model_file} outputs {probs.shape[1]} classes but labels.json lists {len(runtime.labels)}; "
            "the stored model is inconsistent, re-run training."
        )
    log.info("warm-up with batch sizes %s took %.2fs", sizes, time.perf_counter() - start)
