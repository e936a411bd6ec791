"""Throughput of an ONNX model with onnxruntime: the one timing loop behind metrics.json and the benchmark."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from service.artifacts import INPUT_NAME, OUTPUT_EMBEDDING, OUTPUT_PROBS


def session_for(path: str | Path, provider: str = "CPUExecutionProvider", threads: int = 0):
    """An onnxruntime session on exactly one provider (no silent fallback)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=[provider])
    if sess.get_providers()[0] != provider:
        raise RuntimeError(f"onnxruntime did not start {provider} (got {sess.get_providers()}).")
    return sess


def images_per_second(session, size: int, batch: int, seconds: float = 2.0, warmup: int = 2) -> float:
    """Images per second over about ``seconds`` of back-to-back runs at ``batch`` (after ``warmup`` runs)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    feed = {INPUT_NAME: pixels}
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
