"""Locust users for the image-classification service: `locust -f loadtest` (web UI) or with `--headless`.

Users are closed-loop (no wait time): the offered load is the number of users, each sending its next request
as soon as the previous answer arrives. Settings: `[tool.locust]` in pyproject.toml, the command line, or
the LOCUST_* environment variables below; the web UI shows them too. The target is `--host` (for example
http://127.0.0.1:3000); nothing here assumes one.

- ``ClassifyUser``: POST /classify, one image from the mix; a ``--bad-input-share`` of its requests are
  client mistakes that must get a 4xx.
- ``BatchClassifyUser``: POST /classify_batch with ``--batch-files`` images.
The step load shape in ``loadtest/shape.py`` is picked up with the folder (``--steps`` turns it on).
"""

from __future__ import annotations

import json
import logging
import random

from locust import FastHttpUser, constant, events, task
from locust.runners import MasterRunner

from loadtest.images import DEFAULT_MIX, ImageMix, parse_mix
from loadtest.scenarios import (
    BAD_INPUT_OK,
    Payload,
    bad_payloads,
    batch_payload,
    check_batch,
    check_single,
    load_labels,
    single_payload,
)

log = logging.getLogger(__name__)


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    """Custom options; each also reads an environment variable and a `[tool.locust]` key of the same name."""
    parser.add_argument(
        "--image-mix",
        env_var="LOCUST_IMAGE_MIX",
        default=DEFAULT_MIX,
        help="Image kinds and weights, e.g. 'web_jpeg=70,phone_jpeg=10,png=10,webp=10' "
        "(kinds: web_jpeg, jpeg_500x375, phone_jpeg, png, webp)",
    )
    parser.add_argument(
        "--image-pool",
        env_var="LOCUST_IMAGE_POOL",
        type=int,
        default=4,
        help="Distinct images generated per kind (phone photos: half as many)",
    )
    parser.add_argument("--top-k", env_var="LOCUST_TOP_K", type=int, default=5, help="top_k sent with each request")
    parser.add_argument(
        "--batch-files", env_var="LOCUST_BATCH_FILES", type=int, default=4, help="Images per /classify_batch request"
    )
    parser.add_argument(
        "--bad-input-share",
        env_var="LOCUST_BAD_INPUT_SHARE",
        type=float,
        default=0.01,
        help="Share of /classify requests that send a bad input and must get a 4xx",
    )
    parser.add_argument(
        "--traffic-source",
        env_var="LOCUST_TRAFFIC_SOURCE",
        default="loadtest",
        help="X-Traffic-Source of every request: the drift job leaves this traffic out of production's window",
    )
    parser.add_argument(
        "--labels",
        env_var="LOCUST_LABELS",
        default="",
        help="The model's labels (labels.json, model folder or comma list); empty: any non-empty "
        "label passes, and it must be the same model's labels throughout",
    )
    parser.add_argument(
        "--steps",
        env_var="LOCUST_STEPS",
        default="",
        help="Step mode: users per step, '2,4,8,16' or '2..64x2'; empty: constant load from -u/-r/-t",
    )
    parser.add_argument(
        "--step-duration", env_var="LOCUST_STEP_DURATION", type=float, default=60.0, help="Seconds per step"
    )
    parser.add_argument(
        "--step-settle",
        env_var="LOCUST_STEP_SETTLE",
        type=float,
        default=5.0,
        help="Seconds at the start of each step left out of its statistics",
    )
    parser.add_argument(
        "--warmup",
        env_var="LOCUST_WARMUP",
        type=float,
        default=10.0,
        help="Seconds of warm-up at the first step's load before measuring (step mode)",
    )
    parser.add_argument(
        "--slo-p99-ms", env_var="LOCUST_SLO_P99_MS", type=float, default=200.0, help="Latency objective: p99 in ms"
    )
    parser.add_argument(
        "--max-error-rate",
        env_var="LOCUST_MAX_ERROR_RATE",
        type=float,
        default=0.001,
        help="Highest error rate that still meets the SLO (0.001 = 0.1%%)",
    )
    parser.add_argument(
        "--break-steps",
        env_var="LOCUST_BREAK_STEPS",
        type=int,
        default=1,
        help="Stop after this many consecutive steps break the SLO (0: run every step)",
    )
    parser.add_argument(
        "--steps-out",
        env_var="LOCUST_STEPS_OUT",
        default="",
        include_in_web_ui=False,
        help="Write the per-step results to this JSON file (step mode)",
    )


class _Workload:
    """Per-process images, payloads and labels, rebuilt only when the options change (web UI edits)."""

    key: tuple | None = None
    mix: ImageMix
    single: dict[int, Payload]
    bad: dict[str, Payload]
    labels: frozenset[str] | None
    top_k: int
    batch_files: int
    bad_share: float
    source: str

    @classmethod
    def prepare(cls, opts) -> None:
        key = (opts.image_mix, opts.image_pool, opts.top_k, opts.batch_files, opts.labels, opts.bad_input_share,
               opts.traffic_source)  # fmt: skip
        if key == cls.key:
            return
        cls.mix = ImageMix(parse_mix(opts.image_mix), per_kind=opts.image_pool)
        cls.top_k, cls.batch_files, cls.bad_share = opts.top_k, max(1, opts.batch_files), opts.bad_input_share
        cls.source = opts.traffic_source
        cls.labels = load_labels(opts.labels)
        # One ready multipart body per image: the load generator shares the CPU, so encode once, send many.
        cls.single = {id(img): single_payload(img, cls.top_k) for pool in cls.mix.pools.values() for img in pool}
        jpeg = next((img for pool in cls.mix.pools.values() for img in pool if img.content_type == "image/jpeg"), None)
        cls.bad = bad_payloads(jpeg.data if jpeg else next(iter(cls.mix.pools.values()))[0].data)
        cls.key = key
        log.info("image mix ready: %s", cls.mix.describe())


@events.init.add_listener
def _check_options(environment, **_kwargs) -> None:
    """Refuse bad settings before any user starts, with a message saying what to change."""
    opts = environment.parsed_options
    if opts is None or not hasattr(opts, "image_mix"):
        return
    try:
        parse_mix(opts.image_mix)
        load_labels(opts.labels)
    except ValueError as exc:
        raise SystemExit(f"loadtest: {exc}") from None


@events.test_start.add_listener
def _prepare(environment, **_kwargs) -> None:
    if not isinstance(environment.runner, MasterRunner) and environment.parsed_options is not None:
        _Workload.prepare(environment.parsed_options)


class ClassifyUser(FastHttpUser):
    """POST /classify with one image of the mix; now and then a bad input that must be refused with a 4xx."""

    weight = 9
    wait_time = constant(0)
    _seen_model: str | None = None

    @task
    def classify(self) -> None:
        w = _Workload
        if w.bad_share > 0 and random.random() < w.bad_share:
            self._bad_input(random.choice(list(w.bad.items())))
            return
        image = w.mix.pick()
        payload = w.single[id(image)]
        with self.client.post(
            "/classify",
            data=payload.body,
            headers={"Content-Type": payload.content_type, "X-Traffic-Source": w.source},
            name=f"/classify [{image.kind}]",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.content or b'')[:200]!r}")
                return
            problem = check_single(resp.content, w.labels, w.top_k)
            if problem is None:
                problem = self._same_model(resp.content)
            if problem:
                resp.failure(problem)

    def _bad_input(self, item: tuple[str, Payload]) -> None:
        kind, payload = item
        with self.client.post(
            "/classify",
            data=payload.body,
            headers={"Content-Type": payload.content_type, "X-Traffic-Source": _Workload.source},
            name="/classify [bad input]",
            catch_response=True,
        ) as resp:
            if resp.status_code in BAD_INPUT_OK:
                resp.success()
            else:
                resp.failure(f"{kind}: expected a 4xx refusal, got HTTP {resp.status_code}")

    def _same_model(self, body: bytes) -> str | None:
        """Without a label list, at least every answer must come from one model."""
        model = json.loads(body).get("model")
        if ClassifyUser._seen_model is None:
            ClassifyUser._seen_model = model
        elif model != ClassifyUser._seen_model:
            return f"answer from model {model!r}, earlier answers from {ClassifyUser._seen_model!r}"
        return None


class BatchClassifyUser(FastHttpUser):
    """POST /classify_batch with several images of the mix; results must come back complete and in order."""

    weight = 1
    wait_time = constant(0)

    @task
    def classify_batch(self) -> None:
        w = _Workload
        images = [w.mix.pick() for _ in range(w.batch_files)]
        payload = batch_payload(images, w.top_k)
        with self.client.post(
            "/classify_batch",
            data=payload.body,
            headers={"Content-Type": payload.content_type, "X-Traffic-Source": w.source},
            name=f"/classify_batch [{w.batch_files} images]",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.content or b'')[:200]!r}")
                return
            problem = check_batch(resp.content, w.labels, w.top_k, len(images))
            if problem:
                resp.failure(problem)
