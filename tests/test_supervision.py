"""The worker's life under `bentoml serve`, with a minimal service so each case is quick and exact."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from loadtest.servers import free_port
from tests.helpers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SERVICE = """
import os
import bentoml
from service import adaptations, lifecycle
from service.settings import Settings

adaptations.install(Settings(), "Probe", 2)


@bentoml.service(workers=2)
class Probe:
    @bentoml.on_startup
    async def check(self) -> None:
        if os.environ.get("PROBE_FAIL"):
            lifecycle.stop_server("the probe cannot serve")

    @bentoml.api
    def hello(self) -> str:
        return "hi"
"""


def serve(tmp_path: Path, **env: str) -> tuple[subprocess.Popen, int]:
    (tmp_path / "probe.py").write_text(SERVICE)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "probe:Probe", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "BENTOML_HOME": str(tmp_path / "home"), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, port


def wait_ready(proc: subprocess.Popen, port: int) -> None:
    for _ in range(120):
        assert proc.poll() is None, proc.stdout.read()
        try:
            if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError("not ready")


def test_the_supervisor_listens_for_commands_on_no_tcp_port(tmp_path):
    proc, port = serve(tmp_path)
    try:
        wait_ready(proc, port)
        listening = {c.laddr.port for c in psutil.Process(proc.pid).net_connections("tcp") if c.status == "LISTEN"}
        assert listening == {port}, f"the supervisor listens on {listening}, not only the API port"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_worker_that_cannot_serve_stops_the_server_with_status_3_and_its_reason(tmp_path):
    proc, _ = serve(tmp_path, PROBE_FAIL="1")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out[-3000:]
    assert out.count("imgcls: cannot serve: the probe cannot serve") == 1, out[-3000:]


def test_workers_leave_with_a_supervisor_killed_hard(tmp_path):
    proc, port = serve(tmp_path)
    wait_ready(proc, port)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait()
    gone = psutil.wait_procs(workers, timeout=20)[1] == []
    assert gone, "workers outlived their supervisor"
