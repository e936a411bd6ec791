"""Plots saved with each run: the confusion matrix and the training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "training_curves.png"


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """A labelled confusion-matrix heat map (rows true, columns predicted)."""
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = matrix.max() if matrix.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(
                j, i, str(matrix[i, j]), ha="center", va="center", color="white" if matrix[i, j] > top / 2 else "black"
            )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(history, path: Path) -> Path:
    """Loss and accuracy per epoch, train and validation; marks the epoch whose weights were kept."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    epochs = list(range(1, len(history.train_loss) + 1))
    ax_loss.plot(epochs, history.train_loss, label="train")
    ax_loss.plot(epochs, history.val_loss, label="val")
    ax_loss.set_title("loss")
    ax_acc.plot(epochs, history.train_acc, label="train")
    ax_acc.plot(epochs, history.val_acc, label="val")
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        if history.best_epoch:
            ax.axvline(history.best_epoch, color="grey", linestyle=":", label="kept")
        ax.legend()
    if not epochs:
        fig.suptitle("no training (--epochs 0): untrained weights")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
