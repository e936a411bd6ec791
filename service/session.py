"""The onnxruntime session that runs the model: which file on which device, explicit providers, threads, warm-up.

Providers are always listed explicitly, so onnxruntime-gpu on a machine without CUDA never tries (and loudly
fails) to start the CUDA provider, and the log says which provider and file are in use. Every file of the
stored model is checked against its sha256 before the session is created.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import time
import typing as t
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcls.model_files import INPUT_NAME, OUTPUT_EMBEDDING, OUTPUT_PROBS, ModelFiles, ModelFilesError
from imgcls.onnx_run import CPU, CUDA
from service import metrics

if t.TYPE_CHECKING:
    from service.settings import Plan, Settings

log = logging.getLogger(__name__)

DEFAULT_VARIANT = {"cuda": "fp16", "cpu": "int8"}


def choose_variant(requested: str, device: str, available: dict[str, Path]) -> str:
    """The model file variant: the requested one (must exist), else the device default, else fp32."""
    if requested:
        if requested not in available:
            raise ModelFilesError(
                f"IMGCLS_VARIANT={requested} but the model only has {sorted(available)}; pick one of those."
            )
        return requested
    preferred = DEFAULT_VARIANT[device]
    if preferred in available:
        return preferred
    log.warning("model has no %s variant for %s; using fp32", preferred, device)
    if "fp32" not in available:
        raise ModelFilesError(f"model has none of the variants fp32/fp16/int8 (found {sorted(available)})")
    return "fp32"


@dataclass
class ModelSession:
    """A warmed-up onnxruntime session of one variant, and what it runs on."""

    session: object
    device: str
    provider: str
    variant: str
    model_file: Path
    classes: int
    pad_to_bucket: bool  # pad batches to powers of two so the GPU sees few shapes (cuDNN tunes per shape)

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> float32 [N, classes + embedding]: probabilities, then the embedding; counted in
        the metrics."""
        start = time.perf_counter()
        probs, embedding = self.run(pixels)
        recorded = metrics.get()
        recorded.model_seconds.observe(time.perf_counter() - start)
        recorded.batch_size.observe(len(pixels))
        return np.concatenate([probs, embedding], axis=1)

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities [N, classes] and embeddings [N, E] (float32) for a uint8 NHWC batch."""
        n = len(pixels)
        if self.pad_to_bucket and n & (n - 1):
            bucket = 1 << (n - 1).bit_length()
            pixels = np.concatenate([pixels, np.zeros((bucket - n, *pixels.shape[1:]), dtype=pixels.dtype)])
        probs, embedding = self.session.run([OUTPUT_PROBS, OUTPUT_EMBEDDING], {INPUT_NAME: pixels})
        return np.asarray(probs[:n], dtype=np.float32), np.asarray(embedding[:n], dtype=np.float32)


def _create(path: Path, device: str, threads: int, spin: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # onnxruntime's own warnings are noise here; our log says what is active
    if device == "cpu":
        # The API workers decode on the same cores between batches, so threads must not spin-wait for work
        # (onnxruntime's default) and steal their CPU.
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        providers = [CPU]
    else:
        try:
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels or the system, before the provider loads
        except Exception as exc:  # a missing library shows up below as a CUDA provider that did not start
            log.warning("onnxruntime.preload_dlls() failed: %s", exc)
        providers = [(CUDA, {"device_id": 0, "cudnn_conv_algo_search": "EXHAUSTIVE"}), CPU]
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own types for a graph it cannot load
        raise ModelFilesError(f"onnxruntime cannot load {path}: {exc}") from None


def open_session(
    files: ModelFiles, device: str, variant: str, threads: int = 1, spin: bool = False, strict_device: bool = False
) -> ModelSession:
    """A session of the chosen variant on ``device`` (falling back to the CPU when CUDA does not start, unless
    ``strict_device``), checked to output one probability per label."""
    chosen = choose_variant(variant, device, files.variants)
    session = _create(files.variants[chosen], device, threads, spin)
    provider = session.get_providers()[0]
    if device == "cuda" and provider != CUDA:
        if strict_device:
            raise ModelFilesError(
                "IMGCLS_DEVICE=cuda but onnxruntime could not start the CUDA provider (CUDA 13 and cuDNN 9 "
                "libraries are needed); check `nvidia-smi`, or set IMGCLS_DEVICE=cpu."
            )
        log.warning("CUDA provider did not start; falling back to the CPU")
        return open_session(files, "cpu", variant, threads, spin)
    return ModelSession(
        session, device, provider, chosen, files.variants[chosen], len(files.labels), pad_to_bucket=device == "cuda"
    )


def warm_up(model: ModelSession, size: int, max_batch_size: int, runs: int) -> None:
    """Run the batch sizes the service will see, so the first requests do not pay for allocation or tuning,
    and check the outputs' shapes against the labels."""
    sizes = sorted({1, max_batch_size})
    if model.pad_to_bucket:  # every bucket shape once, so cuDNN tunes them all now
        sizes = sorted({1 << i for i in range(max_batch_size.bit_length() + 1)})
    start = time.perf_counter()
    for n in sizes:
        for _ in range(max(1, runs)):
            probs, embedding = model.run(np.zeros((n, size, size, 3), dtype=np.uint8))
            if probs.shape != (n, model.classes) or embedding.ndim != 2 or len(embedding) != n:
                raise ModelFilesError(
                    f"{model.model_file} outputs probabilities of shape {probs.shape} and embeddings of shape "
                    f"{embedding.shape} for {n} images, but labels.json lists {model.classes} classes: the stored "
                    "model is inconsistent; re-run training."
                )
    log.info("warm-up with batch sizes %s took %.2fs", sizes, time.perf_counter() - start)


class Siblings:
    """How busy the other processes the supervisor started (this worker's siblings) have lately been, in cores,
    from the CPU time Linux counts for each (``/proc/<pid>/stat``)."""

    #: The CPU time looked at: clock ticks are 10 ms, so a shorter window cannot tell a core from none.
    WINDOW_S = 0.2

    def __init__(self, parent: int | None = None):
        self.parent = parent or os.getppid()
        self.tick_s = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        self._pids: list[int] = []
        self._found_at = float("-inf")
        self._readings: collections.deque[tuple[float, float]] = collections.deque()  # (when, their CPU seconds)

    def _cpu_seconds(self) -> float:
        now = time.monotonic()
        if now - self._found_at > 5.0:  # workers are replaced now and then
            try:
                with open(f"/proc/{self.parent}/task/{self.parent}/children") as f:
                    self._pids = [int(p) for p in f.read().split() if int(p) != os.getpid()]
            except (OSError, ValueError):
                self._pids = []
            self._found_at = now
        total = 0
        for pid in self._pids:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()  # after the command name, which may hold spaces
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except (OSError, ValueError, IndexError):  # gone meanwhile
                continue
        return total * self.tick_s

    def busy_cores(self) -> float:
        """Cores the siblings used over about the last ``WINDOW_S`` (0 until there are two readings)."""
        now = time.monotonic()
        self._readings.append((now, self._cpu_seconds()))
        while len(self._readings) > 2 and now - self._readings[1][0] >= self.WINDOW_S:
            self._readings.popleft()
        (then, before), (_, after) = self._readings[0], self._readings[-1]
        return (after - before) / (now - then) if now - then >= self.WINDOW_S else 0.0


class Model:
    """The model in an API worker: ``main`` for batches, and on the CPU ``lone``, with a thread per core, for an image
    that finds the other workers idle (one client at a time would otherwise leave every core but one idle).

    Whether they are idle is what the kernel counts of their CPU time, so no worker needs to tell the others what
    it does; under load the main session runs alone. The kernel is asked at most every ``ASK_EVERY_S``: reading its
    files hands the interpreter's lock to other threads.
    """

    ASK_EVERY_S = 0.05
    #: The other workers together use less than this share of a core: they are idle.
    IDLE_CORES = 0.25

    def __init__(self, main: ModelSession, lone: ModelSession | None):
        self.main, self.lone = main, lone
        self.siblings = Siblings() if sys.platform.startswith("linux") else None
        self.variant, self.provider = main.variant, main.provider
        self._idle, self._asked_at = False, float("-inf")

    def others_idle(self) -> bool:
        """Whether the other workers have been idle lately (as of at most ``ASK_EVERY_S`` ago)."""
        now = time.monotonic()
        if self.siblings is not None and now - self._asked_at > self.ASK_EVERY_S:
            self._idle, self._asked_at = self.siblings.busy_cores() < self.IDLE_CORES, now
        return self._idle

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> float32 [N, classes + embedding], on the session the other workers' load allows."""
        if self.lone is not None and len(pixels) == 1 and self.others_idle():
            return self.lone.infer(pixels)
        return self.main.infer(pixels)


def open_served(files: ModelFiles, tag: str, plan: Plan, settings: Settings, strict_device: bool) -> ModelSession:
    """The warmed-up session ``plan`` runs, shown in the model-info metric and the log."""
    model = open_session(files, plan.device, settings.variant, plan.ort_threads, settings.ort_spin, strict_device)
    warm_up(model, files.spec.size, plan.max_batch_size, settings.warmup_runs)
    metrics.get().model_info.labels(model=tag, variant=model.variant, provider=model.provider).set(1)
    threads = f" with {plan.ort_threads} threads" if model.device == "cpu" else ""
    log.info("serving %s: %s (%s) on %s%s", tag, model.model_file.name, model.variant, model.provider, threads)
    return model


def open_in_worker(files: ModelFiles, tag: str, plan: Plan, settings: Settings) -> Model:
    """The model in an API worker: its session and, on the CPU, one with a thread per core for an image alone."""
    main = open_served(files, tag, plan, settings, strict_device=False)
    lone = None
    if plan.lone_threads and main.device == "cpu":
        lone = open_session(files, "cpu", main.variant, plan.lone_threads, settings.ort_spin)
        warm_up(lone, files.spec.size, 1, settings.warmup_runs)
        log.info("an image that finds the other workers idle runs with %d threads", plan.lone_threads)
    return Model(main, lone)
