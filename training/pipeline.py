"""One training run end to end: data -> train -> ONNX fp32/fp16/int8 -> checks -> drift reference -> model store."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from imgcls.demo_images import DemoParams
from imgcls.model_files import CONFIG_FILE, LABELS_FILE, METRICS_FILE, OOD_FILE, VARIANT_FILES, reference_file
from imgcls.onnx_run import images_per_second, session_for
from imgcls.preprocess import SPEC_FILE, PreprocessSpec
from training.config import TrainConfig
from training.dataset import DatasetError, discover, load
from training.demo_data import ensure_demo_data

log = logging.getLogger(__name__)

#: Suffix of a run folder until the run has finished.
PARTIAL = ".partial"


@dataclass
class RunResult:
    """What a run produced: the model-store tag (None with ``store=False``), its folder and its metrics."""

    tag: str | None
    run_dir: Path
    metrics: dict


def resolve_data(cfg: TrainConfig) -> Path:
    """The image folder to train on: the user's, or the demo dataset (generated if needed)."""
    if cfg.demo:
        params = DemoParams(cfg.demo_classes, cfg.demo_per_class, cfg.demo_image_size, seed=cfg.seed)
        return ensure_demo_data(cfg.cache_dir, params, workers=cfg.workers)
    return Path(cfg.data)


def new_run_dir(cfg: TrainConfig) -> Path:
    """A name OUT_DIR/NAME-YYYYmmdd-HHMMSS[-k] no run has used yet (finished or not)."""
    base = Path(cfg.out_dir) / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir, k = base, 1
    while run_dir.exists() or run_dir.with_name(run_dir.name + PARTIAL).exists():
        run_dir, k = Path(f"{base}-{k}"), k + 1
    return run_dir


def run(cfg: TrainConfig) -> RunResult:
    """Train, export, quantise, check, write the references and (unless ``store=False``) save to the model store.

    The run writes into ``<run folder>.partial`` and renames it when everything passed, so a failed run never
    looks like a finished one.
    """
    from training import export, quantize, report, scoring, store
    from training.model import build_model
    from training.reference import score_variant, statistics
    from training.train import loss_and_accuracy, seed_everything, train

    cfg.validate()
    started = time.monotonic()
    data_dir = resolve_data(cfg)
    classes, splits = discover(data_dir, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    final_dir = new_run_dir(cfg)
    run_dir = final_dir.with_name(final_dir.name + PARTIAL)
    run_dir.mkdir(parents=True)
    log.info("Run folder: %s", final_dir)
    spec = PreprocessSpec(size=cfg.image_size)
    cfg.save(run_dir / CONFIG_FILE)
    spec.save(run_dir / SPEC_FILE)
    (run_dir / LABELS_FILE).write_text(json.dumps(classes, indent=2) + "\n")

    sets = {name: load(split, spec, cfg.workers, what=name) for name, split in splits.items()}
    missing = [classes[c] for c in range(len(classes)) if not (sets["train"].labels == c).any()]
    if missing:
        raise DatasetError(f"No readable training image for class(es) {', '.join(missing)}; add images.")

    seed_everything(cfg.seed, cfg.threads)
    model = build_model(cfg, len(classes))
    history = train(cfg, model, sets["train"], sets["val"], spec, run_dir)
    torch_test_acc = loss_and_accuracy(model, sets["test"], spec)[1]

    test = sets["test"]
    paths = {v: run_dir / f for v, f in VARIANT_FILES.items()}
    export.export_fp32(model, spec, paths["fp32"])
    parity = export.check_parity(model, spec, paths["fp32"], test.pixels)
    export.export_fp16(paths["fp32"], paths["fp16"])
    calib_rng = np.random.default_rng(cfg.seed)
    n_cal = min(cfg.calibration_images, len(sets["train"].labels))
    calib = sets["train"].pixels[np.sort(calib_rng.permutation(len(sets["train"].labels))[:n_cal])]
    quantize.quantize_int8(paths["fp32"], paths["int8"], calib)

    # Every figure below comes from onnxruntime on the CPU, on images decoded by the serving code.
    stats = {name: statistics(images) for name, images in sets.items()}
    scored = {
        v: score_variant(path, sets, stats, classes, cfg.reference_images, cfg.seed, cfg.threads)
        for v, path in paths.items()
    }
    for v, result in scored.items():
        result.reference.to_parquet(run_dir / reference_file(v), index=False)
    (run_dir / OOD_FILE).write_text(json.dumps({v: r.detector.to_dict() for v, r in scored.items()}, indent=1) + "\n")
    predictions = {v: r.test_probs.argmax(1) for v, r in scored.items()}
    accuracy = {v: round(scoring.accuracy(r.test_probs, test.labels), 6) for v, r in scored.items()}
    matrix = scoring.confusion(test.labels, predictions["fp32"], len(classes))
    report.plot_confusion(
        matrix, classes, run_dir / report.CONFUSION_PNG, f"test set, fp32 ONNX ({accuracy['fp32']:.1%})"
    )
    report.plot_curves(history, run_dir / report.CURVES_PNG)

    timing = {}
    for variant in ("fp32", "int8"):
        sess = session_for(paths[variant], threads=cfg.threads)
        timing[variant] = round(images_per_second(sess, spec.size, cfg.speed_batch, cfg.speed_seconds), 2)
    speed_info = {
        "note": f"short check at the end of training: CPU, batch {cfg.speed_batch}, {cfg.speed_seconds:g} s per "
        "variant; run `python -m loadtest.modelbench` for a proper measurement",
        "batch": cfg.speed_batch,
        "images_per_second": timing,
        "int8_vs_fp32": round(timing["int8"] / timing["fp32"], 3),
    }

    metrics = {
        "name": cfg.name,
        "dataset": "demo" if cfg.demo else str(data_dir),
        "arch": cfg.arch,
        "input_size": cfg.image_size,
        "num_classes": len(classes),
        "classes": classes,
        "embedding_dim": cfg.embedding_dim,
        "images": {name: int(len(s.labels)) for name, s in sets.items()},
        "skipped_unreadable": {name: s.skipped for name, s in sets.items()},
        "test_images": int(len(test.labels)),
        "accuracy": accuracy,
        "accuracy_torch": round(torch_test_acc, 6),
        "int8_drop_points": round(100 * (accuracy["fp32"] - accuracy["int8"]), 3),
        "fp16_drop_points": round(100 * (accuracy["fp32"] - accuracy["fp16"]), 3),
        "agreement_with_fp32": {
            v: round(float((predictions[v] == predictions["fp32"]).mean()), 6) for v in ("fp16", "int8")
        },
        "per_class": scoring.per_class(matrix, classes),
        "confusion_matrix": matrix.tolist(),
        "export_parity": parity,
        "speed": speed_info,
        "unfamiliar": {
            v: {
                "method": r.detector.to_dict()["method"],
                "flagged_validation": round(r.flagged_val, 4),
                "flagged_test": round(r.flagged_test, 4),
            }
            for v, r in scored.items()
        },
        "training": {
            "epochs": cfg.epochs,
            "best_epoch": history.best_epoch,
            "best_val_accuracy": round(history.best_val_acc, 6),
            "seconds": round(history.seconds, 1),
            "history": {
                k: [round(x, 5) for x in getattr(history, k)]
                for k in ("train_loss", "train_acc", "val_loss", "val_acc")
            },
        },
        "run_dir": str(final_dir),
    }
    tag = None
    metrics["total_seconds"] = round(time.monotonic() - started, 1)
    (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    run_dir.rename(final_dir)
    if cfg.store:
        tag = store.save_model(final_dir, cfg.name, metrics)
    log.info(
        "Done in %.0f s: test accuracy fp32 %.2f%%, fp16 %.2f%%, int8 %.2f%% (drop %.2f points); int8 %.2fx fp32",
        metrics["total_seconds"],
        100 * accuracy["fp32"],
        100 * accuracy["fp16"],
        100 * accuracy["int8"],
        metrics["int8_drop_points"],
        speed_info["int8_vs_fp32"],
    )
    return RunResult(tag=tag, run_dir=final_dir, metrics=metrics)
