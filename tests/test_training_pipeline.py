"""The tiny training run end to end: exports that match torch, int8 within bound, and a store round trip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from imgcls.imagestats import STAT_FIELDS
from imgcls.inference_log import EMBEDDING_PREFIX
from imgcls.model_files import (
    CONFIG_FILE,
    LABELS_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    OOD_FILE,
    VARIANT_FILES,
    ModelFilesError,
    load_labels,
    open_model,
    reference_file,
    sha256_of,
    verify,
)
from imgcls.onnx_run import predict, session_for
from imgcls.preprocess import SPEC_FILE, PreprocessSpec, preprocess_file
from tests.helpers import ROOT, tiny_config
from training.config import TrainConfig
from training.model import ClassifierNet, ServingGraph, build_model
from training.train import CHECKPOINT_FILE

#: The tiny model is barely trained (near chance, so its probabilities are close together and rounding flips
#: more of them than in a trained model) and sees 54 test images (1.85 points each). We allow int8 to lose
#: at most 5 of them (9.3 points) here; the 1-point target applies to the full demo configuration and is
#: reported in its metrics.json.
TINY_INT8_MAX_DROP_POINTS = 10.0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stored(tiny_model):
    """(tag, stored model folder, bentoml Model) of the session's tiny model."""
    import bentoml

    model = bentoml.models.get(tiny_model)
    return tiny_model, Path(model.path), model


def _test_images(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Test-split pixels through the serving preprocessing, with labels, for the stored model."""
    cfg = TrainConfig.load(folder / CONFIG_FILE)
    spec = PreprocessSpec.load(folder / SPEC_FILE)
    classes = load_labels(folder)
    root = next(Path(cfg.cache_dir).glob("shapes-*"))
    paths = sorted((root / "test").rglob("*.jpg"))
    pixels = np.stack([preprocess_file(p, spec)[0] for p in paths])
    labels = np.array([classes.index(p.parent.name) for p in paths])
    return pixels, labels, classes


def test_store_holds_every_file_with_matching_checksums(stored):
    tag, folder, model = stored
    references = [reference_file(v) for v in VARIANT_FILES]
    stored_files = {*VARIANT_FILES.values(), *references, OOD_FILE, LABELS_FILE, SPEC_FILE, METRICS_FILE, CONFIG_FILE}
    for name in stored_files:
        assert (folder / name).is_file(), name
    verify(folder)  # every file matches manifest.json
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["variants"] == VARIANT_FILES and set(manifest["files"]) == stored_files
    assert model.info.metadata["sha256"] == {name: sha256_of(folder / name) for name in stored_files}
    assert set(open_model(folder).detectors) == set(VARIANT_FILES)
    labels = model.info.labels
    metrics = json.loads((folder / METRICS_FILE).read_text())
    assert labels["accuracy_int8"] == f"{100 * metrics['accuracy']['int8']:.2f}"
    assert labels["classes"] == str(len(load_labels(folder))) == "6"
    assert labels["input_size"] == str(PreprocessSpec.load(folder / SPEC_FILE).size)
    assert set(metrics["accuracy"]) == {"fp32", "fp16", "int8"}
    assert metrics["speed"]["int8_vs_fp32"] > 0


def test_tampered_model_file_is_detected(stored, tmp_path):
    _, folder, _ = stored
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    with open(copy / VARIANT_FILES["int8"], "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelFilesError, match="model_int8.onnx"):
        verify(copy)


def test_bentoml_cli_shows_key_facts(stored):
    tag, _, _ = stored
    proc = subprocess.run(
        [sys.executable, "-m", "bentoml", "models", "get", tag, "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert "accuracy_fp32" in info["labels"] and "int8_drop_points" in info["labels"]
    assert info["metadata"]["num_classes"] == 6


def test_onnx_fp32_matches_the_trained_torch_model(stored):
    _, folder, model = stored
    cfg = TrainConfig.load(folder / CONFIG_FILE)
    spec = PreprocessSpec.load(folder / SPEC_FILE)
    net: ClassifierNet = build_model(cfg, len(load_labels(folder)))
    net.load_state_dict(torch.load(Path(model.info.metadata["run_dir"]) / CHECKPOINT_FILE, weights_only=True))
    net.eval()
    pixels, _, _ = _test_images(folder)
    with torch.no_grad():
        ref_probs, ref_emb = ServingGraph(net, spec.mean, spec.std).eval()(torch.from_numpy(pixels))
    probs, emb = predict(session_for(folder / VARIANT_FILES["fp32"]), pixels)
    assert np.abs(probs - ref_probs.numpy()).max() < 1e-4
    assert np.abs(emb - ref_emb.numpy()).max() < 1e-3
    assert (probs.argmax(1) == ref_probs.numpy().argmax(1)).all()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8"])
def test_every_variant_takes_uint8_pixels_with_any_batch_size(stored, variant):
    _, folder, _ = stored
    size = PreprocessSpec.load(folder / SPEC_FILE).size
    sess = session_for(folder / VARIANT_FILES[variant])
    (inp,) = sess.get_inputs()
    assert inp.name == "pixels" and inp.type == "tensor(uint8)" and inp.shape[1:] == [size, size, 3]
    assert [o.type for o in sess.get_outputs()] == ["tensor(float)", "tensor(float)"]
    for batch in (1, 5):
        probs, emb = predict(sess, np.zeros((batch, size, size, 3), np.uint8))
        assert probs.shape == (batch, 6) and emb.shape[0] == batch and 1 <= emb.shape[1] <= 64


def test_int8_accuracy_within_bound_measured_again_from_the_store(stored):
    _, folder, _ = stored
    pixels, labels, _ = _test_images(folder)
    acc, top1 = {}, {}
    for variant in ("fp32", "int8"):
        probs, _ = predict(session_for(folder / VARIANT_FILES[variant]), pixels)
        top1[variant] = probs.argmax(1)
        acc[variant] = float((top1[variant] == labels).mean())
    metrics = json.loads((folder / METRICS_FILE).read_text())
    assert acc["fp32"] == pytest.approx(metrics["accuracy"]["fp32"], abs=1e-6)
    assert acc["int8"] == pytest.approx(metrics["accuracy"]["int8"], abs=1e-6)
    assert 100 * (acc["fp32"] - acc["int8"]) <= TINY_INT8_MAX_DROP_POINTS
    assert (top1["int8"] == top1["fp32"]).mean() >= 0.8, "int8 should mostly predict what fp32 predicts"


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8"])
def test_reference_table_of_each_variant_matches_the_log_schema(stored, variant):
    _, folder, _ = stored
    ref = pd.read_parquet(folder / reference_file(variant))
    emb_cols = [c for c in ref.columns if c.startswith(EMBEDDING_PREFIX)]
    assert list(ref.columns) == [*STAT_FIELDS, "label", "confidence", "ood_score", *emb_cols]
    assert ref["ood_score"].notna().all() and (ref["ood_score"] >= 0).all()
    assert emb_cols == [f"{EMBEDDING_PREFIX}{i}" for i in range(len(emb_cols))] and 1 <= len(emb_cols) <= 64
    assert len(ref) > 50  # val + test of the tiny demo
    assert set(ref["label"]) <= set(load_labels(folder))
    assert ref["confidence"].between(0, 1).all()
    assert ref[list(STAT_FIELDS)].notna().all().all()
    assert (ref["width"] >= 100).all() and ref["brightness"].between(0, 1).all()


def test_run_folder_has_report_files(stored):
    _, _, model = stored
    run_dir = Path(model.info.metadata["run_dir"])
    for name in ("confusion_matrix.png", "training_curves.png", CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE):
        assert (run_dir / name).stat().st_size > 0, name
    assert not list(run_dir.parent.glob("*.partial"))  # the run finished, so its folder lost the suffix
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    assert set(metrics["per_class"]) == set(metrics["classes"])
    assert all({"precision", "recall", "support"} <= set(v) for v in metrics["per_class"].values())
    assert metrics["export_parity"]["top1_agreement"] == 1.0


def test_resnet18_architecture_is_resnet18_sized():
    n = sum(p.numel() for p in ClassifierNet(1000, arch="resnet18").parameters())
    assert 11_500_000 < n < 11_800_000  # torchvision's resnet18 has 11,689,512


@pytest.mark.integration
def test_cli_trains_and_stores_end_to_end(tmp_path, cache_dir):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home")}
    cmd = [
        sys.executable,
        "-m",
        "training",
        "--demo",
        "--cache-dir",
        str(cache_dir),
        "--out-dir",
        str(tmp_path / "runs"),
    ]
    tiny = tiny_config(cache_dir="", out_dir="")
    for key in ("demo_per_class", "demo_image_size", "image_size", "width", "depth", "embedding_dim", "batch_size"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(tiny, key))]
    cmd += ["--epochs", "1", "--calibration-images", "32", "--speed-seconds", "0.1", "--name", "cli-model"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model: cli-model:" in proc.stdout
    tag = proc.stdout.split("model: ")[1].split()[0]
    listing = subprocess.run(
        [sys.executable, "-m", "bentoml", "models", "list", "-o", "json"], env=env, capture_output=True, text=True
    )
    assert tag in listing.stdout
    run_dir = next((tmp_path / "runs").iterdir())
    saved = json.loads((run_dir / CONFIG_FILE).read_text())
    assert saved["epochs"] == 1 and saved["name"] == "cli-model"


def test_init_checkpoint_loads_matching_tensors_and_keeps_a_new_head(tmp_path):
    from training.model import load_init

    source = ClassifierNet(4, width=8, depth=3)
    torch.save(source.state_dict(), tmp_path / "init.pt")
    target = ClassifierNet(6, width=8, depth=3, seed=5)
    load_init(target, str(tmp_path / "init.pt"))
    assert torch.equal(target.stem[0].weight, source.stem[0].weight)
    assert target.head.weight.shape == (6, target.feature_dim)
    with pytest.raises(ValueError, match="shares no tensor"):
        torch.save({"other": torch.zeros(3)}, tmp_path / "bad.pt")
        load_init(target, str(tmp_path / "bad.pt"))
