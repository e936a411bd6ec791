"""The CPU container image, built the way `make container-cpu` builds it and run with podman as in production.

``container/build.sh bentofile.cpu.yaml`` builds the image from the tiny test model (the ``cpu_image`` fixture in
tests/conftest.py, shared with tests/test_deploy.py); each container is started with
``podman run -p 127.0.0.1:PORT:3000`` and a host folder mounted at the documented inference-log path. Needs podman
and root (``make test-container`` installs podman and the base image first); skipped without them.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image

from loadtest.servers import free_port
from tests.helpers import ROOT, in_container, podman

LOG_DIR = "/data/inference_log"  # IMGCLS_LOG_DIR in both bentofiles' envs
BENTO_UID = 1034  # the user `bentoml` of BentoML 1.4.39's generated Dockerfile (USER bentoml, uid and gid 1034)
BENTO_PATH = "/home/bentoml/bento"  # where that Dockerfile puts the Bento; models under models/<name>/<version>/


def encoded(fmt: str, size: tuple[int, int] = (320, 240)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, fmt)
    return buf.getvalue()


class Container:
    """A detached ``podman run`` of an image, published on 127.0.0.1 only, with a host folder as its log volume."""

    def __init__(
        self,
        image: str,
        log_dir: Path,
        env: dict[str, str] | None = None,
        mounts: tuple[str, ...] = (),
        log_owner: int = BENTO_UID,
    ):
        self.name = f"imgcls-test-{uuid.uuid4().hex[:10]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        os.chown(log_dir, log_owner, log_owner)  # a bind mount keeps the host's owner: the container's user, normally
        flags = ["-p", f"127.0.0.1:{self.port}:3000", "-v", f"{log_dir}:{LOG_DIR}"]
        for key, value in (env or {}).items():
            flags += ["-e", f"{key}={value}"]
        for mount in mounts:
            flags += ["-v", mount]
        self.started = time.monotonic()
        podman("run", "-d", "--name", self.name, *flags, image)

    def state(self) -> tuple[str, int]:
        out = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", self.name).stdout.split()
        return out[0], int(out[1])

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def wait_ready(self, timeout: float = 180) -> float:
        """Seconds from ``podman run`` until /readyz answers 200."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.state()[0] != "running":
                raise AssertionError(f"container {self.name} exited before it was ready:\n{self.logs()[-4000:]}")
            try:
                if requests.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - self.started
            except requests.RequestException:
                pass  # not listening yet, or listening before the workers are up
            time.sleep(0.2)
        raise AssertionError(f"container {self.name} not ready after {timeout:.0f}s:\n{self.logs()[-4000:]}")

    def exec(self, *cmd: str) -> str:
        return podman("exec", self.name, *cmd).stdout

    def remove(self) -> None:
        podman("rm", "-f", "-t", "5", self.name, check=False)


def assert_start_fails(box: Container, reason: str) -> None:
    """The container stops by itself with a non-zero status and ``reason`` in its output; removed either way."""
    try:
        podman("wait", box.name, timeout=120)
        status, code = box.state()
        assert status == "exited" and code != 0
        assert reason in box.logs()
    finally:
        box.remove()


def logged_request_ids(log_dir: Path) -> set[str]:
    """The request id of every line in the inference-log files (``<id>/<i>`` for image i of a batch)."""
    return {
        json.loads(line)["request_id"]
        for path in log_dir.glob("inference-*.jsonl")
        for line in path.read_text().splitlines()
        if line
    }


def test_cpu_bentofile_is_the_gpu_one_with_the_cpu_onnxruntime():
    """The two bentofiles may differ only in onnxruntime's package, the Bento's name and its description."""
    gpu = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    cpu = yaml.safe_load((ROOT / "bentofile.cpu.yaml").read_text())
    gpu_ort = [p for p in gpu["python"]["packages"] if p.startswith("onnxruntime")]
    cpu_ort = [p for p in cpu["python"]["packages"] if p.startswith("onnxruntime")]
    assert gpu_ort == ["onnxruntime-gpu[cuda,cudnn]==1.31.1"] and cpu_ort == ["onnxruntime==1.31.1"]
    assert cpu["name"] == gpu["name"] + "-cpu"
    for bentofile in (gpu, cpu):
        packages = bentofile["python"]["packages"]
        bentofile["python"]["packages"] = [p for p in packages if not p.startswith("onnxruntime")]
        del bentofile["name"], bentofile["description"]
    assert cpu == gpu
    assert {"name": "IMGCLS_LOG_DIR", "value": LOG_DIR} in gpu["envs"]


@pytest.fixture(scope="module")
def running(cpu_image, tmp_path_factory):
    """The CPU image running and ready, with one IMGCLS_* setting passed as an environment variable."""
    box = Container(cpu_image, tmp_path_factory.mktemp("container") / "log", env={"IMGCLS_MAX_FILES": "3"})
    try:
        print(f"\nready {box.wait_ready():.1f}s after podman run")
        yield box
    finally:
        box.remove()


@in_container
def test_runs_as_non_root_and_listens_on_all_interfaces(running):
    assert running.exec("id", "-u").strip() == str(BENTO_UID)
    status = running.exec("cat", "/proc/1/status")  # the server itself, not just a shell we started
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids == [str(BENTO_UID)] * 4
    assert "bentoml serve" in running.exec("cat", "/proc/1/cmdline").replace("\0", " ")
    listening = [line.split() for line in running.exec("cat", "/proc/net/tcp").splitlines()[1:]]
    assert any(row[1] == "00000000:0BB8" and row[3] == "0A" for row in listening), "nothing listens on 0.0.0.0:3000"


@in_container
def test_classifies_real_uploads_and_logs_them_to_the_volume(running, tiny_model):
    jpeg, png = encoded("JPEG"), encoded("PNG")
    ids = []
    for name, data, kind in (("a.jpg", jpeg, "image/jpeg"), ("b.png", png, "image/png")):
        resp = requests.post(running.url + "/classify", files={"image": (name, data, kind)}, timeout=60)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["model"] == tiny_model and body["label"] == body["top_k"][0]["label"]
        ids.append(body["request_id"])

    junk = {"image": ("c.jpg", b"not an image", "image/jpeg")}
    bad = requests.post(running.url + "/classify", files=junk, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"], bad.text

    files = [("images", ("a.jpg", jpeg, "image/jpeg")), ("images", ("b.png", png, "image/png"))]
    with_junk = files + [("images", ("c.png", b"junk", "image/png"))]
    batch = requests.post(running.url + "/classify_batch", files=with_junk, timeout=60)
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert [r.get("error") for r in results][:2] == [None, None] and results[2]["error"], results
    ids += [f"{batch.json()['request_id']}/{i}" for i in (0, 1)]

    # IMGCLS_MAX_FILES=3 from `podman run -e` reached the service
    four = requests.post(running.url + "/classify_batch", files=files * 2, timeout=60)
    assert four.status_code == 413 and four.json()["error"] == "too_many_files", four.text

    deadline = time.monotonic() + 10  # each worker writes its log once a second
    while not set(ids) <= logged_request_ids(running.log_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(ids) <= logged_request_ids(running.log_dir)
    assert "inference_log" not in running.exec("ls", f"{BENTO_PATH}/src"), "the log must not land inside the Bento"


@in_container
def test_metrics_and_probes(running):
    requests.post(running.url + "/classify", files={"image": ("a.jpg", encoded("JPEG"), "image/jpeg")}, timeout=60)
    assert requests.get(running.url + "/readyz", timeout=10).status_code == 200
    assert requests.get(running.url + "/livez", timeout=10).status_code == 200
    metrics = requests.get(running.url + "/metrics", timeout=10).text
    assert "imgcls_predictions_total{" in metrics
    assert 'provider="CPUExecutionProvider"' in metrics and 'variant="int8"' in metrics


@in_container
def test_sigterm_under_load_finishes_in_flight_requests_and_logs_every_answer(cpu_image, tmp_path):
    """Four clients keep batches in flight; SIGTERM; every request sent before it is answered and logged."""
    # The subject is SIGTERM: a request shed for its expected wait (503 at once, on a busy box) is not, so that
    # bound is far off here.
    box = Container(cpu_image, tmp_path / "log", env={"IMGCLS_MAX_LATENCY_MS": "30000"})
    stop = threading.Event()
    try:
        box.wait_ready()
        files = [("images", (f"{i}.jpg", encoded("JPEG", (1600, 1200)), "image/jpeg")) for i in range(8)]
        outcomes: list[tuple[float, float, int | str, str]] = []  # start, end, status or exception, request id

        def client() -> None:
            while not stop.is_set():
                start = time.monotonic()
                try:  # a new connection each time: a keep-alive one may be closed under a request being sent
                    resp = requests.post(box.url + "/classify_batch", files=files, headers={"Connection": "close"},
                                         timeout=(2, 60))  # fmt: skip
                    status, rid = resp.status_code, resp.json().get("request_id", "") if resp.ok else ""
                except requests.RequestException as exc:
                    status, rid = type(exc).__name__, ""
                outcomes.append((start, time.monotonic(), status, rid))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        while sum(o[2] == 200 for o in outcomes) < 8:
            assert time.monotonic() - box.started < 300 and all(t.is_alive() for t in threads)
            time.sleep(0.05)
        signalled = time.monotonic()
        podman("kill", "--signal", "TERM", box.name)
        podman("wait", box.name, timeout=60)
        stopped = time.monotonic() - signalled
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
        print(f"\nstopped {stopped:.1f}s after SIGTERM; {len(outcomes)} requests")

        assert box.state() == ("exited", 0), box.logs()[-4000:]
        before = [o for o in outcomes if o[0] < signalled]
        assert any(o[1] > signalled for o in before), "no request was in flight at SIGTERM; the test proves nothing"
        assert all(o[2] == 200 for o in before), [o for o in before if o[2] != 200]
        answered = [o[3] for o in outcomes if o[2] == 200]
        expected = {f"{rid}/{i}" for rid in answered for i in range(len(files))}
        assert expected <= logged_request_ids(box.log_dir), "answered but not in the inference log"
    finally:
        stop.set()
        box.remove()


@in_container
def test_a_tampered_model_file_stops_the_start(cpu_image, tiny_model, bentoml_home, tmp_path):
    """The sha256 of every stored file is checked before the model loads: a modified one ends the container."""
    name, version = tiny_model.split(":")
    tampered = tmp_path / "model_fp32.onnx"
    tampered.write_bytes((bentoml_home / "models" / name / version / "model_fp32.onnx").read_bytes() + b"\0")
    tampered.chmod(0o644)
    target = f"{BENTO_PATH}/models/{name}/{version}/model_fp32.onnx"
    box = Container(cpu_image, tmp_path / "log", mounts=(f"{tampered}:{target}:ro",))
    assert_start_fails(box, "was recorded at save time: the file was modified or corrupted")


@in_container
def test_a_log_volume_the_user_cannot_write_stops_the_start(cpu_image, tmp_path):
    """A bind-mounted host folder owned by root: the records would all be lost, so the container does not start."""
    box = Container(cpu_image, tmp_path / "log", log_owner=0)
    assert_start_fails(box, "is not writable by uid")
