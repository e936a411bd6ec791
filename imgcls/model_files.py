"""The files of a stored model: written by training, read by the service, the drift job and the load tester.

A model (default name ``image-classifier``) is a folder in the BentoML model store holding:

- ``model_fp32.onnx``, ``model_fp16.onnx``, ``model_int8.onnx``: input ``pixels`` uint8 [N, size, size, 3];
  outputs ``probs`` float32 [N, classes] (softmax) and ``embedding`` float32 [N, <=64];
- ``labels.json`` (class names in output order), ``preprocess.json`` (:class:`PreprocessSpec`),
  ``metrics.json``, ``config.json`` (the resolved training config);
- ``reference_<variant>.parquet``: the drift reference as that variant sees held-out images (statistics,
  label, confidence, ``emb_*``, ``ood_score``);
- ``ood.json``: the unfamiliar-image detector of each variant (:mod:`imgcls.ood`);
- ``manifest.json``: ``{"files": {name: sha256}, "variants": {"fp32": name, ...}}``.

This module only reads and checks files; finding a model's folder in the store is BentoML's job.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from imgcls.ood import OodDetector
from imgcls.preprocess import SPEC_FILE, PreprocessSpec

DEFAULT_MODEL_NAME = "image-classifier"
DEFAULT_MODEL = f"{DEFAULT_MODEL_NAME}:latest"
VARIANTS = ("fp32", "fp16", "int8")
VARIANT_FILES = {v: f"model_{v}.onnx" for v in VARIANTS}
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
OOD_FILE = "ood.json"
MANIFEST_FILE = "manifest.json"
INPUT_NAME = "pixels"
OUTPUT_PROBS = "probs"
OUTPUT_EMBEDDING = "embedding"


def reference_file(variant: str) -> str:
    """The drift reference of one variant."""
    return f"reference_{variant}.parquet"


class ModelFilesError(RuntimeError):
    """A stored model is incomplete, corrupt or inconsistent; the message names the file and what to do."""


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | Path, names: list[str]) -> dict:
    """Record the sha256 of each named file in ``folder`` and the variants among them."""
    folder = Path(folder)
    names = sorted(names)
    variants = {v: name for v, name in VARIANT_FILES.items() if name in names}
    manifest = {"files": {name: sha256_of(folder / name) for name in names}, "variants": variants}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a stored model; ModelFilesError when it is missing or malformed."""
    path = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("variants"), dict):
            raise ValueError("no files/variants tables")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelFilesError(f"{path} is missing or unreadable ({exc}); re-run training to store the model.") from None
    return manifest


def verify(folder: str | Path, names: list[str] | None = None) -> None:
    """Raise :class:`ModelFilesError` unless each named file (default: all recorded) matches its stored sha256."""
    folder = Path(folder)
    recorded = read_manifest(folder)["files"]
    for name in names or list(recorded):
        if name not in recorded:
            raise ModelFilesError(f"{name} has no checksum in {folder / MANIFEST_FILE}; re-save the model.")
        try:
            actual = sha256_of(folder / name)
        except OSError as exc:
            raise ModelFilesError(f"{folder / name} cannot be read ({exc}); restore the model store.") from None
        if actual != recorded[name]:
            raise ModelFilesError(
                f"{folder / name} has sha256 {actual} but {recorded[name]} was recorded at save time: "
                "the file was modified or corrupted. Re-run training or restore the model store."
            )


def load_labels(folder: str | Path) -> list[str]:
    """The class names, in output index order; ModelFilesError unless a list of distinct non-empty strings."""
    path = Path(folder) / LABELS_FILE
    try:
        labels = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFilesError(f"{path} is missing or unreadable ({exc}); re-run training.") from None
    if (
        not isinstance(labels, list)
        or len(labels) < 2
        or not all(isinstance(x, str) and x for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise ModelFilesError(f"{path} is not a list of at least two distinct class names; re-run training.")
    return labels


@dataclass(frozen=True)
class ModelFiles:
    """A stored model's checked files: preprocessing, labels, and the ONNX file and detector of each variant."""

    folder: Path
    spec: PreprocessSpec
    labels: list[str]
    variants: dict[str, Path]
    detectors: dict[str, OodDetector]

    def reference(self, variant: str) -> Path:
        return self.folder / reference_file(variant)


def open_model(folder: str | Path, check_sha256: bool = True) -> ModelFiles:
    """Check a stored model (every file against its sha256, the spec, the labels) and describe it.

    Raises :class:`ModelFilesError` naming the file that is wrong, so a server refuses to start on it.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if check_sha256:
        verify(folder)
    try:
        spec = PreprocessSpec.load(folder / SPEC_FILE)
    except ValueError as exc:
        raise ModelFilesError(f"{exc}; re-run training to store a valid spec.") from None
    variants = {v: folder / name for v, name in manifest["variants"].items() if v in VARIANT_FILES}
    if not variants:
        raise ModelFilesError(f"{folder / MANIFEST_FILE} lists no model variant; re-run training.")
    labels = load_labels(folder)
    return ModelFiles(folder, spec, labels, variants, load_detectors(folder, variants, len(labels)))


def load_detectors(folder: Path, variants: dict[str, Path], classes: int) -> dict[str, OodDetector]:
    """The unfamiliar-image detector of every variant, from ``ood.json``."""
    path = folder / OOD_FILE
    try:
        raw = json.loads(path.read_text())
        detectors = {v: OodDetector.from_dict(raw[v]) for v in variants}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFilesError(f"{path} is missing, incomplete or unreadable ({exc!r}); re-run training.") from None
    wrong = [v for v, d in detectors.items() if len(d.class_means) != classes]
    if wrong:
        raise ModelFilesError(f"{path}: the detector of {', '.join(wrong)} has another class count than labels.json.")
    return detectors
