"""Demo data generation, dataset discovery and the errors a user with a bad image folder sees."""

from __future__ import annotations

import hashlib
import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls.demo_images import DemoParams, render
from imgcls.preprocess import PreprocessSpec
from tests.helpers import ROOT
from training.config import ConfigError, TrainConfig, help_text, parse_overrides
from training.dataset import DatasetError, discover, load
from training.demo_data import MARKER_FILE, ensure_demo_data

SMALL = DemoParams(classes=3, per_class=8, image_size=128)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.jpg"))}


def _write_image(path: Path, fmt: str = "JPEG", colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path, fmt)


def test_demo_data_is_byte_identical_across_runs(tmp_path):
    a = ensure_demo_data(tmp_path / "a", SMALL, workers=2)
    b = ensure_demo_data(tmp_path / "b", SMALL, workers=1)
    ha, hb = _hashes(a), _hashes(b)
    assert len(ha) == SMALL.classes * SMALL.per_class
    assert ha == hb
    # A different seed is a different dataset.
    assert render(0, 0, SMALL) != render(0, 0, DemoParams(classes=3, per_class=8, image_size=128, seed=1))


def test_demo_data_layout_split_and_image_properties(tmp_path):
    root = ensure_demo_data(tmp_path, SMALL, workers=1)
    counts = {split: len(list((root / split).rglob("*.jpg"))) for split in ("train", "val", "test")}
    assert counts == {"train": 3 * 6, "val": 3 * 1, "test": 3 * 1}  # 70/15/15 of 8 per class
    sizes = set()
    for path in root.rglob("*.jpg"):
        with Image.open(path) as img:
            assert img.format == "JPEG"
            assert min(img.size) >= 0.8 * 128 and max(img.size) <= 128
            sizes.add(img.size)
    assert len(sizes) > 5, "image sizes should vary"


def test_demo_data_is_reused_when_complete_and_regenerated_when_not(tmp_path):
    root = ensure_demo_data(tmp_path, SMALL, workers=1)
    probe = next(root.rglob("*.jpg"))
    probe.write_bytes(b"tampered")
    assert ensure_demo_data(tmp_path, SMALL, workers=1) == root
    assert probe.read_bytes() == b"tampered", "a complete dataset must not be regenerated"
    (root / MARKER_FILE).unlink()  # as if generation had been interrupted
    ensure_demo_data(tmp_path, SMALL, workers=1)
    assert probe.read_bytes() != b"tampered"
    assert (root / MARKER_FILE).exists()


def test_flat_folder_gets_a_seeded_disjoint_split(tmp_path):
    for cls in ("cat", "dog"):
        for i in range(20):
            _write_image(tmp_path / cls / f"{i}.png", "PNG")
    classes, splits = discover(tmp_path, seed=3)
    assert classes == ["cat", "dog"]
    sets = {name: set(s.paths) for name, s in splits.items()}
    assert sum(len(s) for s in sets.values()) == 40
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert len(sets["val"]) == len(sets["test"]) == 6  # 15% of 20, per class
    assert discover(tmp_path, seed=3)[1]["val"].paths == splits["val"].paths
    assert set(discover(tmp_path, seed=4)[1]["val"].paths) != sets["val"]


def test_accepts_jpeg_png_webp_and_ignores_other_files(tmp_path):
    for i, fmt in enumerate(("JPEG", "PNG", "WEBP")):
        _write_image(tmp_path / "a" / f"{i}.{fmt.lower()}", fmt)
        _write_image(tmp_path / "b" / f"{i}.{fmt.lower()}", fmt, colour=(0, 0, 200))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    classes, splits = discover(tmp_path)
    assert classes == ["a", "b"]
    assert sum(len(s.paths) for s in splits.values()) == 6
    images = load(splits["train"], PreprocessSpec(size=16))
    assert images.pixels.shape[1:] == (16, 16, 3) and images.pixels.dtype == np.uint8
    assert images.sizes[0] == (40, 30)


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        discover(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="is a file"):
        discover(tmp_path / "x.jpg")


def test_fewer_than_two_classes(tmp_path):
    for i in range(5):
        _write_image(tmp_path / "only" / f"{i}.jpg")
    with pytest.raises(DatasetError, match="at least two"):
        discover(tmp_path)


def test_class_without_images(tmp_path):
    for i in range(5):
        _write_image(tmp_path / "full" / f"{i}.jpg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
    with pytest.raises(DatasetError, match="empty.*no images"):
        discover(tmp_path)


def test_unreadable_files_are_skipped_with_a_warning_and_count(tmp_path, caplog):
    for cls in ("a", "b"):
        for i in range(10):
            _write_image(tmp_path / cls / f"{i}.jpg")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    buf = io.BytesIO()
    Image.new("RGB", (50, 50)).save(buf, "PNG")
    (tmp_path / "b" / "truncated.png").write_bytes(buf.getvalue()[:40])
    classes, splits = discover(tmp_path, val_fraction=0.1, test_fraction=0.1)
    everything = splits["train"]
    everything.paths += splits["val"].paths + splits["test"].paths
    everything.labels += splits["val"].labels + splits["test"].labels
    with caplog.at_level(logging.WARNING, logger="training.dataset"):
        images = load(everything, PreprocessSpec(size=16))
    assert images.skipped == 2
    assert len(images.labels) == 20
    assert "Skipped 2 unreadable" in caplog.text


def test_split_folders_are_used_as_given(tmp_path):
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        for cls in ("x", "y"):
            for i in range(n):
                _write_image(tmp_path / split / cls / f"{i}.jpg")
    classes, splits = discover(tmp_path)
    assert classes == ["x", "y"]
    assert [len(splits[s].paths) for s in ("train", "val", "test")] == [12, 4, 4]
    assert all("/val/" in str(p) for p in splits["val"].paths)


def test_config_overrides():
    cfg = parse_overrides(["--demo", "--epochs", "3", "--image-size=48", "lr=0.01", "--no-augment", "--init", "w.pt"])
    assert (cfg.demo, cfg.epochs, cfg.image_size, cfg.lr, cfg.augment, cfg.init) == (True, 3, 48, 0.01, False, "w.pt")
    with pytest.raises(ConfigError, match="Unknown option --epoch"):
        parse_overrides(["--epoch", "3"])
    with pytest.raises(ConfigError, match="expects a int"):
        parse_overrides(["--epochs", "many"])
    with pytest.raises(ConfigError, match="exactly one of --data"):
        TrainConfig().validate()
    with pytest.raises(ConfigError, match="embedding-dim"):
        TrainConfig(demo=True, embedding_dim=65).validate()


def test_boolean_options_take_the_values_help_shows():
    """`--help` shows `--store true`; `--store false` must then work, as must the bare flag forms."""
    assert "--store                true" in help_text()
    assert parse_overrides(["--demo", "--store", "false"]).store is False
    assert parse_overrides(["--demo", "--store", "true", "--epochs", "2"]).store is True
    assert parse_overrides(["--no-store", "--demo"]).store is False
    assert parse_overrides(["--store=no", "--demo"]).store is False
    assert "seeds the demo images" in help_text()


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("one_class", "at least two"),
        ("empty_class", "no images"),
    ],
)
def test_cli_reports_bad_folders_without_a_traceback(tmp_path, layout, message):
    data = tmp_path / "data"
    if layout != "missing":
        for i in range(4):
            _write_image(data / "cats" / f"{i}.jpg")
    if layout == "empty_class":
        (data / "dogs").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "training", "--data", str(data)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_a_tiny_folder_trains_with_few_optimiser_steps(tmp_path):
    """3 classes x 40 images, 2 epochs: four optimiser steps in all, too few for the one-cycle schedule."""
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        for i in range(40):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (60, 80, 3)), 0, 255).astype(np.uint8)
            (tmp_path / "photos" / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(tmp_path / "photos" / f"c{c}" / f"{i}.jpg")
    cmd = [sys.executable, "-m", "training", "--data", str(tmp_path / "photos"), "--epochs", "2",
           "--out-dir", str(tmp_path / "runs"), "--store", "false", "--speed-seconds", "0.1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout and "flagged as unfamiliar" in proc.stdout
    (run,) = (tmp_path / "runs").iterdir()
    assert not run.name.endswith(".partial") and (run / "metrics.json").exists()
    assert run.name.startswith("photos-")  # named after the folder: the demo model it would replace stays
    assert "warning: the unfamiliar-image threshold was set on 18 validation images" in proc.stdout
    assert "warning: the drift reference has 36 rows" in proc.stdout


def test_a_failed_run_keeps_the_partial_suffix(tmp_path, monkeypatch):
    from training import pipeline

    for cls in ("a", "b"):
        for i in range(6):
            _write_image(tmp_path / "photos" / cls / f"{i}.jpg")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("training.train.train", broken)
    cfg = TrainConfig(data=str(tmp_path / "photos"), out_dir=str(tmp_path / "runs"), workers=1, store=False)
    with pytest.raises(RuntimeError, match="disk full"):
        pipeline.run(cfg)
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.endswith(".partial") and not (run / "metrics.json").exists()
