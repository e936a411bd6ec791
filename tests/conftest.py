"""Shared fixtures: a throw-away BentoML home, a tiny trained model in it, and a real `bentoml serve`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from loadtest.servers import Target, start_service, stop

ROOT = Path(__file__).resolve().parents[1]


def has_cuda() -> bool:
    """The service's own test: would `IMGCLS_DEVICE=auto` pick CUDA here?"""
    try:
        from service.runtime import choose_device

        return choose_device("auto") == "cuda"
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if has_cuda():
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
    from training.config import TrainConfig
    from training.pipeline import run

    cfg = TrainConfig.tiny(cache_dir=str(cache_dir), out_dir=str(tmp_path_factory.mktemp("run")))
    return run(cfg).tag


class Server:
    """A running `bentoml serve` subprocess bound to 127.0.0.1, with its inference-log folder and output."""

    def __init__(self, target: Target, log_dir: Path):
        self.url, self.proc, self.log_file, self.log_dir = target.url, target.proc, target.log_file, log_dir

    def output(self) -> str:
        return self.log_file.read_text(errors="replace")


def start_server(target: str, env_extra: dict[str, str], tmp: Path, timeout: float = 120.0) -> Server:
    """Start `bentoml serve TARGET` the way the load-test runner does; raise with its output if it fails."""
    started = start_service(None, tmp, env_extra, timeout, target=target)
    return Server(started, tmp / "inference_log")


def stop_server(proc: subprocess.Popen) -> None:
    """Graceful stop (SIGTERM lets the inference log flush), then kill."""
    stop(Target("server", "", proc))


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    """The service from bentofile.yaml serving the tiny model on the CPU."""
    srv = start_server(".", {"IMGCLS_MODEL": tiny_model, "IMGCLS_DEVICE": "cpu"}, tmp_path_factory.mktemp("server"))
    yield srv
    stop_server(srv.proc)
