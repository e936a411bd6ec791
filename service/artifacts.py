"""The layout of a model in the BentoML model store: written by training, read by service and drift.

A model (default name ``image-classifier``) is a folder holding:

- ``model_fp32.onnx``, ``model_fp16.onnx``, ``model_int8.onnx``: input ``pixels`` uint8
  [N, size, size, 3]; outputs ``probs`` float32 [N, classes] (softmax) and ``embedding``
  float32 [N, <=64].
- ``labels.json`` (list of class names, index order), ``preprocess.json`` (:class:`PreprocessSpec`),
  ``metrics.json``, ``config.json`` (the resolved training config),
- ``reference.parquet``: the drift reference (statistics, label, confidence, ``emb_*``),
- ``manifest.json``: ``{"files": {name: sha256}, "variants": {"fp32": name, ...}}``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

DEFAULT_MODEL_NAME = "image-classifier"
VARIANT_FILES = {"fp32": "model_fp32.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
REFERENCE_FILE = "reference.parquet"
MANIFEST_FILE = "manifest.json"
INPUT_NAME = "pixels"
OUTPUT_PROBS = "probs"
OUTPUT_EMBEDDING = "embedding"


class IntegrityError(RuntimeError):
    """A stored model file does not match the checksum recorded when it was saved."""


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | Path) -> dict:
    """Record the sha256 of every ONNX variant present in ``folder``."""
    folder = Path(folder)
    variants = {v: name for v, name in VARIANT_FILES.items() if (folder / name).exists()}
    manifest = {"files": {name: sha256_of(folder / name) for name in variants.values()}, "variants": variants}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify(folder: str | Path, names: list[str] | None = None) -> None:
    """Raise :class:`IntegrityError` unless each named file (default: all) matches its stored sha256."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    for name in names or list(manifest["files"]):
        expected = manifest["files"].get(name)
        if expected is None:
            raise IntegrityError(f"{name} has no checksum in {folder / MANIFEST_FILE}; re-save the model.")
        actual = sha256_of(folder / name)
        if actual != expected:
            raise IntegrityError(
                f"{folder / name} has sha256 {actual} but {expected} was recorded at save time: "
                "the file was modified or corrupted. Re-run training or restore the model store."
            )


def load_labels(folder: str | Path) -> list[str]:
    """The class names, in output index order."""
    return json.loads((Path(folder) / LABELS_FILE).read_text())
