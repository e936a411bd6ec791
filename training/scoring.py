"""Scoring predictions against the true labels: accuracy, the confusion matrix, precision and recall per class."""

from __future__ import annotations

import numpy as np


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
