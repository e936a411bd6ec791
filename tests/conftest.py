"""Shared fixtures: a throw-away BentoML home, a tiny trained model in it, and a real `bentoml serve`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_cuda() -> bool:
    try:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers() and _nvidia_smi_ok()
    except Exception:
        return False


def _nvidia_smi_ok() -> bool:
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (onnxruntime CUDAExecutionProvider and nvidia-smi)")
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
    """A running `bentoml serve` subprocess bound to 127.0.0.1."""

    def __init__(self, url: str, proc: subprocess.Popen, log_dir: Path, log_file: Path):
        self.url, self.proc, self.log_dir, self.log_file = url, proc, log_dir, log_file

    def output(self) -> str:
        return self.log_file.read_text(errors="replace")


def start_server(target: str, env_extra: dict[str, str], tmp: Path, timeout: float = 120.0) -> Server:
    """Start `bentoml serve TARGET` on a free port and wait for /readyz; raise with its output if it fails."""
    import urllib.request

    port = free_port()
    log_dir = tmp / "inference_log"
    from loadtest.servers import private_bentoml_home

    # A home of its own per server: BentoML empties the shared metrics folder at each start.
    home = private_bentoml_home(tmp / "bentoml_home")
    env = {**os.environ, "BENTOML_HOME": str(home), "IMGCLS_LOG_DIR": str(log_dir), **env_extra}
    log_file = tmp / "server.log"
    cmd = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log_file, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_file.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return Server(url, proc, log_dir, log_file)
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"server not ready in {timeout}s:\n{log_file.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """Graceful stop (SIGTERM lets the inference log flush), then kill."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    """The service from bentofile.yaml serving the tiny model on the CPU."""
    srv = start_server(".", {"IMGCLS_MODEL": tiny_model, "IMGCLS_DEVICE": "cpu"}, tmp_path_factory.mktemp("server"))
    yield srv
    stop_server(srv.proc)
