"""A model that cannot be served stops `bentoml serve` within seconds, with one message naming what is wrong.

Each case is a copy of the session's tiny model with one file broken *and its checksum updated*, as a model
saved by a buggy or hand-edited training run would be (a file changed after saving is caught by its sha256
before anything else, tested in test_service_parts.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgcls.model_files import MANIFEST_FILE, VARIANT_FILES, write_manifest
from loadtest.servers import free_port
from tests.helpers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _interpolation(folder: Path) -> None:
    spec = json.loads((folder / "preprocess.json").read_text())
    (folder / "preprocess.json").write_text(json.dumps({**spec, "interpolation": "lanczos"}))


def _input_size(folder: Path) -> None:
    spec = json.loads((folder / "preprocess.json").read_text())
    (folder / "preprocess.json").write_text(json.dumps({**spec, "size": spec["size"] + 16}))


def _labels_missing(folder: Path) -> None:
    (folder / "labels.json").unlink()


def _labels_short(folder: Path) -> None:
    labels = json.loads((folder / "labels.json").read_text())
    (folder / "labels.json").write_text(json.dumps(labels[:-1]))


def _onnx_garbage(folder: Path) -> None:
    (folder / VARIANT_FILES["int8"]).write_bytes(os.urandom(4096))


def _detector_missing(folder: Path) -> None:
    (folder / "ood.json").unlink()


CASES = {
    "invalid_interpolation": (_interpolation, "interpolation"),
    "wrong_input_size": (_input_size, "preprocess.json"),
    "labels_json_removed": (_labels_missing, "labels.json"),
    "one_label_short": (_labels_short, "labels.json"),
    "corrupt_onnx": (_onnx_garbage, "model_int8.onnx"),
    "ood_json_removed": (_detector_missing, "ood.json"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_unservable_model_stops_the_server_with_one_clear_message(tiny_model, tmp_path, case):
    import bentoml

    breaks, named = CASES[case]
    source = Path(bentoml.models.get(tiny_model).path)
    with bentoml.models.create(f"broken-{case.replace('_', '-')}") as model:
        folder = Path(model.path)
        shutil.copytree(source, folder, dirs_exist_ok=True)
        breaks(folder)
        recorded = json.loads((folder / MANIFEST_FILE).read_text())["files"]
        write_manifest(folder, [n for n in recorded if (folder / n).exists()])
    env = {
        **os.environ,
        "IMGCLS_MODEL": str(model.tag),
        "IMGCLS_DEVICE": "cpu",
        "IMGCLS_LOG_DIR": str(tmp_path / "log"),
    }
    cmd = [sys.executable, "-m", "bentoml", "serve", ".", "--host", "127.0.0.1", "--port", str(free_port())]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert elapsed < 30, f"took {elapsed:.0f} s to give up"
    messages = [line for line in output.splitlines() if "imgcls: cannot serve" in line]
    assert len(messages) == 1 and named in messages[0], output[-3000:]
    assert "Traceback" not in output, output[-3000:]
