"""Running a stored ONNX variant outside the service: one session, batched predictions, a throughput loop.

Training uses it to score and check every export and to build the references; the model benchmark
(``python -m loadtest.modelbench``) times variants with the same loop training records in ``metrics.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from imgcls.model_files import INPUT_NAME, OUTPUT_EMBEDDING, OUTPUT_PROBS

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def gpu_present() -> bool:
    """True when an NVIDIA driver is loaded (cheap check before asking onnxruntime)."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def cuda_usable() -> bool:
    """True when onnxruntime offers the CUDA provider and a driver is loaded."""
    if not gpu_present():
        return False
    import onnxruntime as ort

    return CUDA in ort.get_available_providers()


def session_for(path: str | Path, provider: str = CPU, threads: int = 0):
    """An onnxruntime session on exactly ``provider`` (onnxruntime-gpu would otherwise try CUDA first, and fall
    back silently)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=[provider])
    if sess.get_providers()[0] != provider:
        raise RuntimeError(f"onnxruntime did not start {provider} (got {sess.get_providers()}).")
    return sess


def predict(session, pixels: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, C], embeddings [N, E]) for uint8 NHWC pixels."""
    probs, embs = [], []
    for start in range(0, len(pixels), batch_size):
        p, e = session.run([OUTPUT_PROBS, OUTPUT_EMBEDDING], {INPUT_NAME: pixels[start : start + batch_size]})
        probs.append(p)
        embs.append(e)
    return np.concatenate(probs).astype(np.float32), np.concatenate(embs).astype(np.float32)


def images_per_second(session, size: int, batch: int, seconds: float = 2.0, warmup: int = 2) -> float:
    """Images per second over about ``seconds`` of back-to-back runs at ``batch`` (after ``warmup`` runs)."""
    rng = np.random.default_rng(0)
    feed = {INPUT_NAME: rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)}
    outputs = [OUTPUT_PROBS, OUTPUT_EMBEDDING]
    for _ in range(warmup):
        session.run(outputs, feed)
    runs, start = 0, time.perf_counter()
    while True:
        session.run(outputs, feed)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and runs >= 3:
            return runs * batch / elapsed
