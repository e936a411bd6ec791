"""What several test modules use: the project root, test images, the tiny training config, servers, HTTP checks."""

from __future__ import annotations

import functools
import os
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from loadtest.images import encode, repeat_last_scan
from loadtest.servers import Target, start_service, stop_process
from training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def photo(w: int = 500, h: int = 375, mode: str = "RGB") -> Image.Image:
    """A smooth gradient with a bright square, so every mode conversion has something to keep."""
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    rgb = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    rgb[h // 4 : h // 2, w // 4 : w // 2] = 250
    return Image.fromarray(rgb).convert(mode)


def jpeg(w: int = 500, h: int = 375, quality: int = 90) -> bytes:
    return encode(photo(w, h), "JPEG", quality=quality)


def exif_rotated_jpeg(w: int = 400, h: int = 100) -> bytes:
    """A landscape stored with orientation 6 (displayed rotated 90 degrees: portrait)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(w, h), "JPEG", exif=exif.tobytes())


def png_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """A PNG whose header claims width x height pixels; the pixel data is a token (never decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def costly_webp(side: int = 7000) -> bytes:
    """A lossless WebP of one colour: about 2 KB on the wire, ``side`` x ``side`` pixels to decode."""
    return encode(Image.new("RGB", (side, side), (90, 140, 200)), "WEBP", lossless=True, quality=0)


def tiny_config(cache_dir: str, out_dir: str, **overrides) -> TrainConfig:
    """A training configuration that runs end to end in seconds (near-chance accuracy, by design)."""
    values = dict(
        demo=True,
        cache_dir=cache_dir,
        out_dir=out_dir,
        demo_per_class=60,
        demo_image_size=128,
        image_size=32,
        width=8,
        depth=3,
        embedding_dim=16,
        epochs=3,
        batch_size=32,
        calibration_images=64,
        reference_images=200,
        speed_seconds=0.2,
        progress=False,
        workers=1,
    )
    return TrainConfig(**{**values, **overrides})


@dataclass
class Server:
    """A running `bentoml serve` subprocess bound to 127.0.0.1, with its inference-log folder and output."""

    url: str
    proc: object
    log_file: Path
    log_dir: Path

    def output(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self) -> None:
        """Graceful stop (SIGTERM lets the inference log flush), then kill."""
        stop_process(self.proc)


def start_server(target: str, env_extra: dict[str, str], tmp: Path, timeout: float = 120.0) -> Server:
    """Start `bentoml serve TARGET` the way the load-test runner does; raise with its output if it fails."""
    started: Target = start_service(None, tmp, env_extra, timeout, target=target)
    return Server(started.url, started.proc, started.log_file, tmp / "inference_log")


def classify(server: Server, data: bytes, content_type: str = "image/jpeg", **fields) -> requests.Response:
    files = {"image": ("photo.jpg", data, content_type)}
    return requests.post(server.url + "/classify", files=files, data=fields, timeout=60)


def metric_values(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample on ``url``/metrics: {(name, sorted labels): value}."""
    text = requests.get(url + "/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def total(values: dict, name: str, **labels) -> float:
    """The sum of the samples named ``name`` that carry ``labels``."""
    return sum(v for (n, lbls), v in values.items() if n == name and all((k, v2) in lbls for k, v2 in labels.items()))


@functools.cache
def documented_errors(base_url: str, path: str) -> dict[str, str]:
    """The error responses the server's ``/docs.json`` documents for POST ``path``: status -> description."""
    spec = requests.get(base_url + "/docs.json", timeout=10).json()
    responses = spec["paths"][path]["post"]["responses"]
    return {status: r["description"] for status, r in responses.items() if status != "200"}


def assert_error(resp: requests.Response, status: int, code: str) -> None:
    """``resp`` is the one error shape with this status and code, and a detail that says something; for the API
    routes, /docs.json lists that code under that status."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == code, body
    assert isinstance(body["detail"], str) and len(body["detail"]) > 10
    url = urlsplit(resp.url)
    if url.path in ("/classify", "/classify_batch"):
        documented = documented_errors(f"{url.scheme}://{url.netloc}", url.path).get(str(status), "")
        assert f"`{code}`" in documented, f"/docs.json does not document {status} {code} for {url.path}"


def why_no_podman(kube_play: bool = False) -> str | None:
    """Why the container tests cannot run here (None when they can)."""
    if shutil.which("podman") is None:
        return "podman is not installed (`make test-container` installs it and the base image)"
    if os.geteuid() != 0:
        return "needs root: podman runs as root here, and the test hands the log folder to the container's user"
    if kube_play and shutil.which("catatonit") is None:
        return "podman kube play needs catatonit for its pause container (container/base.sh installs it)"
    return None


def in_container(test=None, *, kube_play: bool = False):
    """Marks for a test that builds or runs an image (``kube_play=True``: runs manifests with podman kube play)."""

    def mark(test):
        reason = why_no_podman(kube_play)
        for marker in (pytest.mark.container, pytest.mark.slow, pytest.mark.integration):
            test = marker(test)
        return pytest.mark.skipif(reason is not None, reason=reason or "")(test)

    return mark if test is None else mark(test)


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run podman; AssertionError with its output when it fails and ``check``."""
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def scan_bomb(side: int = 7000, repeats: int = 700) -> bytes:
    """A progressive JPEG of one colour that declares ``side`` x ``side`` and repeats its last refinement scan
    ``repeats`` times: a few hundred KB, each scan a pass over every coefficient of the full-size image."""
    return repeat_last_scan(
        encode(Image.new("RGB", (side, side), (90, 140, 200)), "JPEG", quality=50, progressive=True), repeats
    )


def text_chunk_png(chunks: int = 60, chunk_bytes: int = 1 << 20) -> bytes:
    """A small PNG carrying ``chunks`` zTXt chunks that each inflate to ``chunk_bytes``: tens of KB on the wire."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = encode(photo(64, 48), "PNG")
    text = b"".join(chunk(b"zTXt", b"k%d\0\0" % i + zlib.compress(b" " * chunk_bytes, 9)) for i in range(chunks))
    return png[:33] + text + png[33:]  # after the signature and IHDR
