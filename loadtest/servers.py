"""Start the targets of a load test as subprocesses on 127.0.0.1: the BentoML service and the FastAPI baseline."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]  # where bentofile.yaml and service/ live


@dataclass
class Target:
    """A server under test: its base URL and, when the runner started it, its process and log file."""

    name: str
    url: str
    proc: subprocess.Popen | None = None
    log_file: Path | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(target: Target, timeout: float) -> None:
    """Poll ``/readyz`` until it answers 200; raise with the server's output if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if target.proc is not None and target.proc.poll() is not None:
            raise RuntimeError(f"{target.name} exited with code {target.proc.returncode}:\n{_tail(target)}")
        try:
            with urllib.request.urlopen(target.url + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"{target.name} at {target.url} was not ready within {timeout:.0f}s (GET /readyz). "
        f"Check that it is running and the model loads.\n{_tail(target)}"
    )


def start_service(
    model: str | None,
    out_dir: Path,
    env_extra: dict[str, str],
    timeout: float = 300.0,
    target: str = ".",
    port: int = 0,
) -> Target:
    """`bentoml serve TARGET` (the project root, or a built Bento's tag) with ``IMGCLS_MODEL=model`` when given, on
    ``port`` (0: a free one).

    The inference log goes to ``out_dir/inference_log``; returns once /readyz says ready.
    """
    port = port or free_port()
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "IMGCLS_LOG_DIR": str(out_dir / "inference_log"),
        **({"IMGCLS_MODEL": model} if model else {}),
        **env_extra,
    }
    cmd = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    return _start("service", cmd, env, out_dir / "service.log", port, timeout)


@dataclass(frozen=True)
class Baseline:
    """How a hand-written server runs: model variant ("" for the service's), uvicorn workers (0: one per core),
    onnxruntime threads per worker (0: every core), JPEG reduced-scale decoding."""

    variant: str
    workers: int
    ort_threads: int
    draft: bool

    def describe(self) -> str:
        workers = f"{self.workers} worker" + ("s" if self.workers != 1 else "") if self.workers else "a worker per core"
        threads = f"{self.ort_threads} onnxruntime thread(s) each" if self.ort_threads else "onnxruntime on every core"
        return f"{workers}, {threads}" + (", JPEG draft decoding" if self.draft else "")


#: The comparisons ``python -m loadtest.run --compare --baseline NAME`` offers.
BASELINES = {
    # What most people write first: FastAPI, one process, the fp32 model, a plain decode.
    "fastapi-fp32": Baseline("fp32", 1, 0, False),
    # What an experienced engineer writes: the service's variant, a uvicorn worker per core with one onnxruntime
    # thread each (no thread oversubscription), JPEGs decoded at reduced scale as the service does.
    "fastapi-expert": Baseline("", 0, 1, True),
}


def start_baseline(
    model_dir: Path, tag: str, out_dir: Path, spec: Baseline, variant: str, timeout: float = 120.0
) -> Target:
    """A baseline under uvicorn, reading ``variant`` of the model from ``model_dir``."""
    port = free_port()
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "BASELINE_MODEL_DIR": str(model_dir),
        "BASELINE_MODEL_TAG": tag,
        "BASELINE_VARIANT": variant,
        "BASELINE_ORT_THREADS": str(spec.ort_threads),
        "BASELINE_DRAFT": "1" if spec.draft else "0",
    }
    workers = spec.workers or os.cpu_count() or 1
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "loadtest.baselines.fastapi_app:create_app",
           "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]  # fmt: skip
    return _start("baseline", cmd, env, out_dir / "baseline.log", port, timeout)


def _start(name: str, cmd: list[str], env: dict, log_file: Path, port: int, timeout: float) -> Target:
    log.info("starting %s: %s", name, " ".join(cmd))
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    target = Target(name, f"http://127.0.0.1:{port}", proc, log_file)
    try:
        wait_ready(target, timeout)
    except BaseException:
        stop(target)
        raise
    log.info("%s ready at %s", name, target.url)
    return target


CpuProbe = Callable[[], float]


def cpu_probe(target: Target) -> CpuProbe | None:
    """A function giving the CPU seconds used so far by a server the runner started (its whole process tree);
    None for one it was pointed at."""
    if target.proc is None:
        return None
    root = psutil.Process(target.proc.pid)

    def used() -> float:
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    return used


def stop(target: Target) -> None:
    """Stop a server the runner started (one it was pointed at is left alone)."""
    if target.proc is not None:
        stop_process(target.proc)


def stop_process(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM (lets a server finish its requests and flush its logs), then SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(target: Target, chars: int = 4000) -> str:
    if target.log_file is None or not target.log_file.exists():
        return ""
    return target.log_file.read_text(errors="replace")[-chars:]
