"""The service's settings, read once from ``IMGCLS_*`` environment variables (all optional)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from service.artifacts import DEFAULT_MODEL_NAME
from service.preprocess import DEFAULT_MAX_PIXELS


class SettingsError(ValueError):
    """An ``IMGCLS_*`` variable holds a value the service cannot use."""


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Settings:
    """Every knob of the service; the field ``name`` is read from ``IMGCLS_NAME``."""

    model: str = f"{DEFAULT_MODEL_NAME}:latest"  # tag in the BentoML model store
    device: str = "auto"  # auto | cpu | cuda
    variant: str = ""  # fp32 | fp16 | int8; empty: fp16 on CUDA, int8 on CPU
    log_dir: str = "inference_log"
    log_max_bytes: int = 64 << 20  # rotate the inference log at this size
    max_body_bytes: int = 10 << 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = 64  # per /classify_batch request
    max_batch_size: int = 32  # adaptive batching: largest batch the model sees (128 when a GPU is used)
    max_latency_ms: int = 1000  # adaptive batching: latency budget before the dispatcher sheds load
    workers: int = 0  # API (preprocessing) worker processes; 0: one per core
    placement: str = "auto"  # worker: a model in every API worker | shared: one model service | auto (see app.py)
    ort_threads: int = 0  # onnxruntime intra-op threads per session; 0: cores / sessions
    ort_spin: bool = False  # let ORT threads spin between runs (burns CPU the decoders need)
    hop_in_flight: int = 2  # placement shared: hop calls one API worker has in flight; more share the next
    keepalive_requests: int = 100  # per connection, then it is closed (spreads them over workers); 0: no limit
    max_concurrency: int = 64  # in-flight requests per API worker before answering 503 + Retry-After
    timeout_s: float = 30.0  # per request, answered with 504
    retry_after_s: int = 1
    access_log: bool = True  # BentoML's per-request log line in the API workers
    tracing: bool = False  # BentoML's OpenTelemetry spans for the API routes (see app.py); off: they skip it
    warmup_runs: int = 2

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
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
        """Refuse combinations the service cannot run with."""
        if self.device not in ("auto", "cpu", "cuda"):
            raise SettingsError(f"IMGCLS_DEVICE={self.device!r}: use auto, cpu or cuda.")
        if self.placement not in ("auto", "worker", "shared"):
            raise SettingsError(f"IMGCLS_PLACEMENT={self.placement!r}: use auto, worker or shared.")
        if self.variant not in ("", "fp32", "fp16", "int8"):
            raise SettingsError(f"IMGCLS_VARIANT={self.variant!r}: use fp32, fp16 or int8 (or leave it unset).")
        if self.max_batch_size < 2:
            raise SettingsError("IMGCLS_MAX_BATCH_SIZE must be at least 2 (BentoML's batching requires it).")
        for name in ("max_body_bytes", "max_pixels", "max_files", "max_latency_ms", "max_concurrency"):
            if getattr(self, name) < 1:
                raise SettingsError(f"IMGCLS_{name.upper()} must be positive.")
        if self.keepalive_requests < 0:
            raise SettingsError("IMGCLS_KEEPALIVE_REQUESTS must be 0 (no limit) or positive.")

    @property
    def api_workers(self) -> int:
        """API worker processes: explicit, else one per core."""
        return self.workers or _cpu_count()

    @property
    def intra_op_threads(self) -> int:
        """onnxruntime threads for one batch: explicit, else one per core."""
        return self.ort_threads or _cpu_count()
