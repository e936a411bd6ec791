"""Run exported ONNX models with onnxruntime on the CPU and score them: the numbers every report uses."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from service.artifacts import INPUT_NAME, OUTPUT_EMBEDDING, OUTPUT_PROBS
from training.speed import session_for

log = logging.getLogger(__name__)


def cpu_session(path: str | Path, threads: int = 0):
    """An onnxruntime session pinned to the CPU provider (onnxruntime-gpu would otherwise try CUDA first)."""
    return session_for(path, "CPUExecutionProvider", threads)


def predict(session, pixels: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, C], embeddings [N, E]) for uint8 NHWC pixels."""
    probs, embs = [], []
    for start in range(0, len(pixels), batch_size):
        p, e = session.run([OUTPUT_PROBS, OUTPUT_EMBEDDING], {INPUT_NAME: pixels[start : start + batch_size]})
        probs.append(p)
        embs.append(e)
    return np.concatenate(probs).astype(np.float32), np.concatenate(embs).astype(np.float32)


def confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion counts: rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def per_class(matrix: np.ndarray, classes: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall and support per class from a confusion matrix."""
    out = {}
    for i, name in enumerate(classes):
        tp = float(matrix[i, i])
        predicted, actual = float(matrix[:, i].sum()), float(matrix[i, :].sum())
        out[name] = {
            "precision": round(tp / predicted, 4) if predicted else 0.0,
            "recall": round(tp / actual, 4) if actual else 0.0,
            "support": int(actual),
        }
    return out


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy."""
    return float((probs.argmax(1) == labels).mean()) if len(labels) else 0.0
