"""Shared fixtures: a throw-away BentoML home, a tiny trained model in it, and a real `bentoml serve`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgcls.onnx_run import cuda_usable
from tests.helpers import ROOT, podman, start_server, tiny_config


def pytest_collection_modifyitems(config, items):
    if cuda_usable():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (onnxruntime CUDAExecutionProvider and a loaded NVIDIA driver)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory) -> Path:
    """A private BentoML home for the whole run, so tests never touch the user's model store."""
    home = tmp_path_factory.mktemp("bentoml_home")
    os.environ["BENTOML_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Where the demo data is generated for the test run."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_model(bentoml_home, cache_dir, tmp_path_factory) -> str:
    """Train the tiny test configuration on demo data and save it to the store; returns the model tag."""
    from training.pipeline import run

    return run(tiny_config(cache_dir=str(cache_dir), out_dir=str(tmp_path_factory.mktemp("run")))).tag


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    """The service from bentofile.yaml serving the tiny model on the CPU, saving a thumbnail of every unfamiliar
    image (the drift tests look for them)."""
    env = {"IMGCLS_MODEL": tiny_model, "IMGCLS_DEVICE": "cpu", "IMGCLS_THUMBNAILS_PER_S": "10000"}
    srv = start_server(".", env, tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def cpu_image(tiny_model):
    """``container/build.sh bentofile.cpu.yaml`` with the tiny model: the image tag; the image is removed after.

    For the tests marked ``container`` (tests/test_container.py, tests/test_deploy.py): built once per run.
    """
    env = {**os.environ, "IMGCLS_MODEL": tiny_model, "BIN": str(Path(sys.executable).parent)}
    start = time.monotonic()
    build = subprocess.run(
        ["bash", "container/build.sh", "bentofile.cpu.yaml"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=1800,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-6000:] + build.stderr[-6000:]
    tag = build.stdout.strip().splitlines()[-1]
    assert tag.startswith("image-classifier-service-cpu:"), build.stdout[-2000:]
    print(f"\nbuilt {tag} in {time.monotonic() - start:.0f}s")
    yield tag
    podman("rmi", "-f", tag, check=False)
