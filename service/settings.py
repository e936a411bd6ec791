"""The service's settings: read once from ``IMGCLS_*`` environment variables, then resolved once into a plan.

:class:`Settings` holds what the user asked for (every field is optional; its default is defined here and
nowhere else). :func:`resolve` is the one place that turns it into what this server will do on this machine
(:class:`Plan`: CPU or GPU, where the model runs, batch size, threads), as a pure function of the settings,
whether a GPU is usable and the core count, so every combination is unit-tested without a GPU.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from imgcls.inference_log import PRODUCTION, default_log_dir
from imgcls.model_files import DEFAULT_MODEL, VARIANTS
from imgcls.preprocess import PILLOW_MAX_PIXELS, DecodeLimits

_DECODE = DecodeLimits()
SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")


class SettingsError(ValueError):
    """An ``IMGCLS_*`` variable holds a value the service cannot use."""


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class Settings:
    """Every knob of the service; the field ``name`` is read from ``IMGCLS_NAME``."""

    model: str = _help("model tag in the BentoML model store", DEFAULT_MODEL)
    device: str = _help("auto | cpu | cuda", "auto")
    variant: str = _help("fp32 | fp16 | int8; empty: fp16 on CUDA, int8 on the CPU", "")
    placement: str = _help("auto | worker (a model in every API worker) | shared (one model process)", "auto")
    workers: int = _help("API worker processes; 0: one per core", 0)
    ort_threads: int = _help("onnxruntime threads per session; 0: the cores shared out among the sessions", 0)
    lone_threads: int = _help(
        "onnxruntime threads for an image that finds the other API workers idle (a second session in each); "
        "0: every core, up to 8; 1: off",
        0,
    )
    ort_spin: bool = _help("let onnxruntime threads spin between runs (burns CPU the decoders need)", False)
    max_batch_size: int = _help("largest batch the model sees; 0: 32 on the CPU, 128 on a GPU", 0)
    max_latency_ms: int = _help(
        "the longest an image may wait: a request whose images would wait longer is refused with 503 at once", 1000
    )
    hop_in_flight: int = _help("placement shared: hop calls one API worker has in flight", 2)
    decode_threads: int = _help("threads per API worker that decode images and run the model", 2)
    max_body_bytes: int = _help("largest request body (every file of a batch together)", 64 << 20)
    max_image_bytes: int = _help("largest single uploaded file", 10 << 20)
    max_files: int = _help("most files per /classify_batch request", 64)
    max_pixels: int = _help("most pixels an image may declare in its header", _DECODE.max_pixels)
    max_decode_pixels: int = _help(
        "most CPU and memory a decode may take, in decoded pixels' worth (JPEG: its scans and coded bytes count)",
        _DECODE.max_decode_pixels,
    )
    max_header_bytes: int = _help("largest request line plus headers, answered 431 above", 32 << 10)
    max_headers: int = _help("most header fields per request, answered 431 above", 100)
    header_timeout_s: float = _help("time a client has to send its request line and headers, answered 408 after", 20.0)
    body_timeout_s: float = _help("time a client has to send its whole request body, answered 408 after", 30.0)
    max_concurrency: int = _help("requests one API worker processes at once before answering 503", 64)
    timeout_s: float = _help("time to process a request once received, answered 504 after", 30.0)
    drain_s: float = _help("on SIGTERM: seconds reporting not ready while still serving, before stopping", 2.0)
    retry_after_s: int = _help("the Retry-After of a 503", 1)
    keepalive_requests: int = _help(
        "requests per connection, then it is closed (so it may reach a newer pod); 0: no limit", 1000
    )
    api_key: str = _help("when set, /classify, /classify_batch, /info and /ui need it (Bearer, X-API-Key or Basic)", "")
    api_key_file: str = _help("file holding the API key (a mounted secret); read once at start", "")
    protect_metrics: bool = _help(
        "with an API key, /metrics needs it too (it names the model and its labels); 0: Prometheus scrapes freely",
        True,
    )
    traffic_sources: str = _help(
        "traffic sources a client may name (X-Traffic-Source or the form field source); the drift job judges "
        "production only, so set just production where clients are not trusted",
        "production,loadtest,simulation",
    )
    log_dir: str = _help("inference-log folder; empty: $BENTOML_HOME/inference_log", "")
    request_id_key_file: str = _help(
        "the key that signs request ids, so that /feedback knows ids it issued (made on the first start); empty: "
        "request-id.key in the inference-log folder. Pods that share it accept feedback on each other's answers",
        "",
    )
    log_max_bytes: int = _help("rotate each inference-log file at this size", 64 << 20)
    log_max_total_bytes: int = _help("delete the oldest inference-log files past this total; 0: keep all", 8 << 30)
    log_max_age_days: float = _help("delete inference-log records older than this many days; 0: no age limit", 30.0)
    thumbnail_bytes: int = _help("disk kept for thumbnails of unfamiliar images", 32 << 20)
    thumbnails_per_s: float = _help(
        "96 px thumbnails of unfamiliar user images kept per second per API worker, for the drift report; 0: no "
        "image of a user is ever kept",
        0.0,
    )
    keep_images_bytes: int = _help(
        "keep every classified image, as the model saw it, in <log dir>/images within this many bytes per API "
        "worker, so that labelled ones can become a training folder (python -m drift.accuracy --export); 0: off, "
        "no user image is kept",
        0,
    )
    access_log: bool = _help(
        "BentoML's per-request log line in the API workers (off: the metrics and the inference log cover every "
        "request, and the line costs CPU on each one)",
        False,
    )
    tracing: bool = _help("BentoML's OpenTelemetry spans for the API routes (skipped otherwise: they cost CPU)", False)
    warmup_runs: int = _help("runs of each batch size before the server reports ready", 2)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``environ`` (default ``os.environ``), refusing malformed values with a clear message."""
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            key = f"IMGCLS_{f.name.upper()}"
            raw = env.get(key, "").strip()
            if not raw:
                continue
            kind = type(f.default)
            try:
                if kind is bool:
                    if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError(raw)
                    values[f.name] = raw.lower() in ("1", "true", "yes")
                elif kind is int:
                    values[f.name] = int(float(raw))  # accepts 50e6
                else:
                    values[f.name] = kind(raw)
            except ValueError:
                raise SettingsError(f"{key}={raw!r} is not a valid {kind.__name__}; fix or unset it.") from None
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse values and combinations the service cannot run with."""
        choices = {
            "device": ("auto", "cpu", "cuda"),
            "placement": ("auto", "worker", "shared"),
            "variant": ("", *VARIANTS),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                shown = " | ".join(a or "(unset)" for a in allowed)
                raise SettingsError(f"IMGCLS_{name.upper()}={getattr(self, name)!r}: use {shown}.")
        if self.max_batch_size == 1 or self.max_batch_size < 0:
            raise SettingsError("IMGCLS_MAX_BATCH_SIZE must be at least 2 (or 0 for the device's default).")
        positive = ("max_body_bytes", "max_image_bytes", "max_pixels", "max_decode_pixels", "max_files",
                    "max_latency_ms", "max_concurrency", "decode_threads", "max_header_bytes", "max_headers",
                    "hop_in_flight", "timeout_s", "body_timeout_s", "header_timeout_s")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"IMGCLS_{name.upper()} must be positive.")
        non_negative = ("keepalive_requests", "workers", "ort_threads", "lone_threads", "log_max_total_bytes",
                        "log_max_age_days", "drain_s", "thumbnails_per_s", "keep_images_bytes")  # fmt: skip
        for name in non_negative:
            if getattr(self, name) < 0:
                raise SettingsError(f"IMGCLS_{name.upper()} must be 0 or positive.")
        if self.max_pixels > PILLOW_MAX_PIXELS:
            raise SettingsError(f"IMGCLS_MAX_PIXELS can be at most {PILLOW_MAX_PIXELS}: Pillow opens no larger image.")
        if self.max_image_bytes > self.max_body_bytes:
            raise SettingsError("IMGCLS_MAX_IMAGE_BYTES cannot exceed IMGCLS_MAX_BODY_BYTES (the whole request).")
        if self.api_key and self.api_key_file:
            raise SettingsError("Set IMGCLS_API_KEY or IMGCLS_API_KEY_FILE, not both.")
        bad = [name for name in self.sources if not SOURCE_NAME.match(name)]
        if bad or PRODUCTION not in self.sources:
            raise SettingsError(
                f"IMGCLS_TRAFFIC_SOURCES={self.traffic_sources!r}: a comma-separated list of short names (letters, "
                "digits, '_', '-', '.') that includes production."
            )

    @property
    def sources(self) -> frozenset[str]:
        """The traffic sources a client may name."""
        return frozenset(name.strip().lower() for name in self.traffic_sources.split(",") if name.strip())

    @property
    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(self.max_pixels, self.max_decode_pixels)

    @property
    def request_id_key_path(self) -> Path:
        return (
            Path(self.request_id_key_file).expanduser()
            if self.request_id_key_file
            else (self.inference_log_dir / "request-id.key")
        )

    @property
    def inference_log_dir(self) -> Path:
        """The absolute inference-log folder."""
        return Path(self.log_dir).expanduser().absolute() if self.log_dir else default_log_dir()

    def read_api_key(self) -> str:
        """The API key ("" when none is set), from the variable or the file."""
        if not self.api_key_file:
            return self.api_key
        try:
            key = Path(self.api_key_file).read_text().strip()
        except OSError as exc:
            raise SettingsError(f"IMGCLS_API_KEY_FILE={self.api_key_file}: cannot read it ({exc}).") from None
        if not key:
            raise SettingsError(f"IMGCLS_API_KEY_FILE={self.api_key_file} is empty.")
        return key


@dataclass(frozen=True)
class Plan:
    """What this server does on this machine, resolved once from the settings."""

    device: str  # cpu | cuda
    shared_model: bool  # one model process fed by every API worker, or a model in each
    api_workers: int
    max_batch_size: int
    ort_threads: int  # per onnxruntime session (CPU)
    lone_threads: int = 0  # threads of each API worker's second session, for an image alone; 0: none


#: The batch size a device gets when IMGCLS_MAX_BATCH_SIZE is 0: fp16 on a large GPU peaks near 128 (H100,
#: ResNet-18); on the CPU throughput is flat past a few images, and larger batches only add latency.
DEFAULT_BATCH = {"cpu": 32, "cuda": 128}
#: The most threads a lone image gets by default, so that on a large machine one image does not wake dozens of
#: threads for little gain.
MAX_LONE_THREADS = 8


def resolve(settings: Settings, gpu_usable: bool, cpus: int) -> Plan:
    """The plan for ``settings`` on a machine with ``cpus`` cores, with or without a usable GPU.

    ``auto`` placement shares one model process on a GPU (one CUDA session, big batches) and keeps a model in
    every API worker on the CPU (no HTTP hop between them). With a model in every CPU worker, the cores are shared
    out among the sessions, and each worker also opens a session with more threads for an image that finds the
    other workers idle (one client at a time: its image would otherwise run on one core while the others idle).
    """
    device = settings.device if settings.device != "auto" else ("cuda" if gpu_usable else "cpu")
    if device == "cuda" and not gpu_usable:
        raise SettingsError("IMGCLS_DEVICE=cuda but no usable GPU (NVIDIA driver + CUDA provider); set it to cpu.")
    shared = settings.placement == "shared" or (settings.placement == "auto" and device == "cuda")
    workers = settings.workers or cpus
    sessions = 1 if shared else workers
    threads = settings.ort_threads or max(1, cpus // sessions)
    lone = (settings.lone_threads or min(cpus, MAX_LONE_THREADS)) if device == "cpu" and not shared else 0
    batch = settings.max_batch_size or DEFAULT_BATCH[device]
    return Plan(device, shared, workers, batch, threads, lone if lone > threads else 0)


def cpu_count(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """Cores this process may use: the cores it may run on, fewer under a cgroup v2 CPU quota (a container's
    ``resources.limits.cpu`` on Kubernetes: a pod limited to 2 CPUs on a 64-core node gets 2, not 64)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path(cgroup_cpu_max).read_text().split()[:2]
        limit = cores if quota == "max" else math.ceil(int(quota) / int(period))
    except (OSError, ValueError, ZeroDivisionError):  # no cgroup v2 here, or a file we cannot read as one
        return cores
    return max(1, min(cores, limit))


def _shown(value: object) -> str:
    return (str(value).lower() if isinstance(value, bool) else str(value)) or "(unset)"


def help_text(environ: Mapping[str, str] | None = None) -> str:
    """Every ``IMGCLS_*`` variable with its default, the value this environment sets, and its meaning."""
    env = os.environ if environ is None else environ
    lines = ["IMGCLS_* environment variables of `bentoml serve` (a value set here is marked with *):", ""]
    for f in fields(Settings):
        key = f"IMGCLS_{f.name.upper()}"
        raw = env.get(key, "").strip()
        value = ("(set, hidden)" if f.name == "api_key" else raw) if raw else _shown(f.default)
        lines.append(f"  {key:<29} {'*' if raw else ' '}{value:<22} {f.metadata['help']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m service.settings``: list the settings with this environment's values; exit 2 when one is bad."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m service.settings",
        description="List every IMGCLS_* setting of the service with its default and the value this environment "
        "gives it, and check them as `bentoml serve` would.",
        epilog="Exit status: 0 the settings are valid, 2 one is not (the message says which and why).",
    )
    parser.parse_args(argv)
    print(help_text())
    try:
        Settings.from_env()
    except SettingsError as exc:
        print(f"\nimgcls: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
