"""A real Prometheus server scrapes the service and can query the metrics users alert on."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import httpx
import pytest

from loadtest.servers import free_port
from tests.helpers import encode, photo

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?query={urllib.parse.quote(expr)}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)["data"]["result"]


def test_prometheus_scrapes_predictions_and_model_info(server, tmp_path):
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `make system-deps` installs Debian's prometheus package"
    target = server.url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        f"global: {{scrape_interval: 1s}}\nscrape_configs:\n"
        f"  - job_name: imgcls\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(3):
            files = {"image": ("x.png", encode(photo(64, 48), "PNG"), "image/png")}
            assert httpx.post(server.url + "/classify", files=files, timeout=30).status_code == 200
        deadline = time.monotonic() + 60
        predictions, info = [], []
        while time.monotonic() < deadline and not (predictions and info):
            try:
                predictions = query(base, "sum(imgcls_predictions_total)")
                info = query(base, "imgcls_model_info")
            except OSError:
                pass
            time.sleep(1)
        assert predictions and float(predictions[0]["value"][1]) >= 3
        assert info[0]["metric"]["variant"] == "int8" and info[0]["metric"]["provider"] == "CPUExecutionProvider"
        assert query(base, 'up{job="imgcls"}')[0]["value"][1] == "1"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
