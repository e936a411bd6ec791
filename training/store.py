"""Save a run's artifacts as one model in the BentoML model store, with its key facts as labels and metadata."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from imgcls.model_files import (
    CONFIG_FILE,
    LABELS_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    OOD_FILE,
    VARIANT_FILES,
    reference_file,
    write_manifest,
)
from imgcls.preprocess import SPEC_FILE

log = logging.getLogger(__name__)

#: Every file the service and the drift job read from a stored model.
STORED_FILES = (
    *VARIANT_FILES.values(),
    *(reference_file(v) for v in VARIANT_FILES),
    OOD_FILE,
    LABELS_FILE,
    SPEC_FILE,
    METRICS_FILE,
    CONFIG_FILE,
)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def labels_and_metadata(metrics: dict, manifest: dict) -> tuple[dict[str, str], dict]:
    """The facts `bentoml models get TAG` shows: short strings as labels, the details as metadata."""
    acc = metrics["accuracy"]
    labels = {
        "task": "image-classification",
        "arch": str(metrics["arch"]),
        "input_size": str(metrics["input_size"]),
        "classes": str(metrics["num_classes"]),
        "accuracy_fp32": _pct(acc.get("fp32")),
        "accuracy_fp16": _pct(acc.get("fp16")),
        "accuracy_int8": _pct(acc.get("int8")),
        "int8_drop_points": f"{metrics['int8_drop_points']:.2f}",
        "int8_speedup_b8": f"{metrics['speed']['int8_vs_fp32']:.2f}x",
        "dataset": str(metrics["dataset"]),
    }
    metadata = {
        "accuracy": acc,
        "int8_drop_points": metrics["int8_drop_points"],
        "speed": metrics["speed"],
        "input_size": metrics["input_size"],
        "num_classes": metrics["num_classes"],
        "classes": metrics["classes"],
        "embedding_dim": metrics["embedding_dim"],
        "test_images": metrics["test_images"],
        "sha256": manifest["files"],
        "run_dir": metrics["run_dir"],
    }
    return labels, metadata


def save_model(run_dir: Path, name: str, metrics: dict) -> str:
    """Copy the run's artifacts into a new version of model ``name``; returns its tag (``name:version``)."""
    import bentoml

    missing = [f for f in STORED_FILES if not (run_dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"Cannot store the model: {', '.join(missing)} missing from {run_dir}.")
    manifest = write_manifest(run_dir, list(STORED_FILES))
    labels, metadata = labels_and_metadata(metrics, manifest)
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        for fname in (*STORED_FILES, MANIFEST_FILE):
            shutil.copy2(run_dir / fname, model.path_of(fname))
    tag = str(model.tag)
    (run_dir / "model_tag.txt").write_text(tag + "\n")
    log.info("Saved %s to the BentoML model store: %s", tag, json.dumps(labels))
    return tag
