"""`bentoml build` packs the service with the model, and the built Bento serves /classify."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import requests
import yaml
from PIL import Image

from imgcls import __version__
from imgcls.inference_log import log_files, parse_line
from tests.helpers import ROOT, start_server

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_built_bento_serves_classify_and_flushes_its_log_on_shutdown(tiny_model, bentoml_home, tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-o", "tag"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert build.returncode == 0, build.stdout + build.stderr
    tag = next(line.split("__tag__:", 1)[1] for line in build.stdout.splitlines() if "__tag__:" in line).strip()
    name, version = tag.split(":")
    bento_dir = bentoml_home / "bentos" / name / version

    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    packed = {m["tag"] for svc in info["services"] for m in svc["models"]}
    assert packed == {tiny_model}, "the Bento must reference exactly the model it serves"
    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime-gpu" in requirements and "\ntorch==" not in requirements

    # Built here with the model in the API workers (the CPU default), served the way a GPU machine runs it: one
    # shared model service. The service graph is decided when the Bento is served, not when it is built.
    srv = start_server(tag, {"IMGCLS_DEVICE": "cpu", "IMGCLS_PLACEMENT": "shared"}, tmp_path)
    try:
        buf = io.BytesIO()
        Image.new("RGB", (320, 240), (200, 120, 40)).save(buf, "JPEG")
        files = {"image": ("a.jpg", buf.getvalue(), "image/jpeg")}
        resp = requests.post(srv.url + "/classify", files=files, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == tiny_model
        assert "shared_model" in srv.output()  # the model ran in its own service
        # The Bento packs the pages, and /info names the model process's provider and the project's version.
        info = requests.get(srv.url + "/info", timeout=10).json()
        assert info["model"] == tiny_model and info["provider"] == "CPUExecutionProvider"
        assert info["version"] == __version__
        assert requests.get(srv.url + "/ui/app.js", timeout=10).status_code == 200
        assert requests.get(srv.url + "/docs.json", timeout=10).json()["info"]["version"] == __version__
    finally:
        srv.stop()  # graceful: the service's shutdown hook flushes the inference log
    logged = [parse_line(line) for path in log_files(srv.log_dir) for line in path.read_bytes().splitlines()]
    assert resp.json()["request_id"] in {r["request_id"] for r in logged if r}
