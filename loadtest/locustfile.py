"""Locust users for the image-classification service: `locust -f loadtest` (web UI) or with `--headless`.

Users are closed-loop (no wait time): the offered load is the number of users, each sending its next request
as soon as the previous answer arrives. Settings: `[tool.locust]` in pyproject.toml, the command line, or
the LOCUST_* environment variables below; the web UI shows them too. The target is `--host` (for example
http://127.0.0.1:3000); nothing here assumes one.

One user class, :class:`ImageUser`: each request is a ``/classify_batch`` with ``--batch-files`` images for a
``--batch-share`` of requests, else a ``/classify`` with one image of the mix, of which a ``--bad-input-share``
are client mistakes that must get a 4xx. Every request is marked ``X-Traffic-Source: loadtest``, so the drift
job leaves it out of production's window. With ``--steps`` the step load shape (``loadtest/shape.py``) drives
the user count; without it Locust's own ``-u``/``-r``/``-t`` (and the web UI's fields) do.
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
from loadtest.stepstats import DEFAULTS

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
        "--batch-share",
        env_var="LOCUST_BATCH_SHARE",
        type=float,
        default=0.1,
        help="Share of requests sent to /classify_batch instead of /classify",
    )
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
        help=f"Step mode: users per step, e.g. '{DEFAULTS.steps}' or '2..64x2'; empty: Locust's -u/-r/-t",
    )
    parser.add_argument(
        "--step-duration",
        env_var="LOCUST_STEP_DURATION",
        type=float,
        default=DEFAULTS.step_duration,
        help="Seconds per step",
    )
    parser.add_argument(
        "--step-settle",
        env_var="LOCUST_STEP_SETTLE",
        type=float,
        default=DEFAULTS.step_settle,
        help="Seconds at the start of each step left out of its statistics",
    )
    parser.add_argument(
        "--warmup",
        env_var="LOCUST_WARMUP",
        type=float,
        default=DEFAULTS.warmup,
        help="Seconds of warm-up at the first step's load before measuring (step mode)",
    )
    parser.add_argument(
        "--latency-objective-ms",
        env_var="LOCUST_LATENCY_OBJECTIVE_MS",
        type=float,
        default=DEFAULTS.latency_objective_ms,
        help="The p99 latency each step is judged by, in ms",
    )
    parser.add_argument(
        "--max-error-rate",
        env_var="LOCUST_MAX_ERROR_RATE",
        type=float,
        default=DEFAULTS.max_error_rate,
        help="Highest error rate that still meets the objective (0.001 = 0.1%%)",
    )
    parser.add_argument(
        "--break-steps",
        env_var="LOCUST_BREAK_STEPS",
        type=int,
        default=DEFAULTS.break_steps,
        help="Stop after this many consecutive steps break the objective (0: run every step)",
    )
    parser.add_argument(
        "--steps-out",
        env_var="LOCUST_STEPS_OUT",
        default="",
        include_in_web_ui=False,
        help="Write the per-step results to this JSON file after each step (step mode)",
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
    batch_share: float
    bad_share: float
    source: str

    @classmethod
    def prepare(cls, opts) -> None:
        key = (opts.image_mix, opts.image_pool, opts.top_k, opts.batch_files, opts.batch_share, opts.labels,
               opts.bad_input_share, opts.traffic_source)  # fmt: skip
        if key == cls.key:
            return
        cls.mix = ImageMix(parse_mix(opts.image_mix), per_kind=opts.image_pool)
        cls.top_k, cls.batch_files, cls.batch_share = opts.top_k, max(1, opts.batch_files), opts.batch_share
        cls.bad_share, cls.source = opts.bad_input_share, opts.traffic_source
        cls.labels = load_labels(opts.labels)
        # One ready multipart body per image: the load generator shares the CPU, so encode once, send many.
        cls.single = {id(img): single_payload(img, cls.top_k) for pool in cls.mix.pools.values() for img in pool}
        jpeg = next((img for pool in cls.mix.pools.values() for img in pool if img.content_type == "image/jpeg"), None)
        cls.bad = bad_payloads(jpeg.data if jpeg else next(iter(cls.mix.pools.values()))[0].data)
        cls.key = key
        log.info("image mix ready: %s", cls.mix.describe())


@events.init.add_listener
def _set_up(environment, **_kwargs) -> None:
    """Refuse bad settings before any user starts; name the test in the reports; no shape without --steps."""
    environment.locustfile = "loadtest (image classification)"  # the HTML report's "Script"
    opts = environment.parsed_options
    if opts is None or not hasattr(opts, "image_mix"):
        return
    if not opts.steps:
        environment.shape_class = None  # a constant load from -u/-r/-t, as Locust runs without a shape
    elif any(getattr(opts, name, None) for name in ("num_users", "spawn_rate", "run_time")):
        logging.getLogger(__name__).warning("with --steps the step plan sets the users and the time: -u, -r and -t "
                                            "are ignored")  # fmt: skip
    try:
        parse_mix(opts.image_mix)
        load_labels(opts.labels)
        if not 0 <= opts.batch_share <= 1 or not 0 <= opts.bad_input_share <= 1:
            raise ValueError("--batch-share and --bad-input-share are shares between 0 and 1")
    except ValueError as exc:
        raise SystemExit(f"loadtest: {exc}") from None


@events.test_start.add_listener
def _prepare(environment, **_kwargs) -> None:
    if not isinstance(environment.runner, MasterRunner) and environment.parsed_options is not None:
        _Workload.prepare(environment.parsed_options)


class ImageUser(FastHttpUser):
    """What a client of the service sends: photos to /classify, some batches, now and then a mistake."""

    wait_time = constant(0)
    _seen_model: str | None = None

    @task
    def send(self) -> None:
        w = _Workload
        draw = random.random()
        if draw < w.batch_share:
            self._batch()
        elif draw < w.batch_share + (1 - w.batch_share) * w.bad_share:
            self._bad_input(random.choice(list(w.bad.items())))
        else:
            self._single()

    def _post(self, path: str, payload: Payload, name: str):
        headers = {"Content-Type": payload.content_type, "X-Traffic-Source": _Workload.source}
        return self.client.post(path, data=payload.body, headers=headers, name=name, catch_response=True)

    def _single(self) -> None:
        w = _Workload
        image = w.mix.pick()
        with self._post("/classify", w.single[id(image)], f"/classify [{image.kind}]") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.content or b'')[:200]!r}")
                return
            problem = check_single(resp.content, w.labels, w.top_k) or self._same_model(resp.content)
            if problem:
                resp.failure(problem)

    def _batch(self) -> None:
        w = _Workload
        images = [w.mix.pick() for _ in range(w.batch_files)]
        with self._post(
            "/classify_batch", batch_payload(images, w.top_k), f"/classify_batch [{w.batch_files} images]"
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.content or b'')[:200]!r}")
                return
            problem = check_batch(resp.content, w.labels, w.top_k, len(images))
            if problem:
                resp.failure(problem)

    def _bad_input(self, item: tuple[str, Payload]) -> None:
        kind, payload = item
        with self._post("/classify", payload, "/classify [bad input]") as resp:
            if resp.status_code in BAD_INPUT_OK:
                resp.success()
            else:
                resp.failure(f"{kind}: expected a 4xx refusal, got HTTP {resp.status_code}")

    def _same_model(self, body: bytes) -> str | None:
        """Without a label list, at least every answer must come from one model."""
        model = json.loads(body).get("model")
        if ImageUser._seen_model is None:
            ImageUser._seen_model = model
        elif model != ImageUser._seen_model:
            return f"answer from model {model!r}, earlier answers from {ImageUser._seen_model!r}"
        return None
