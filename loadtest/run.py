"""Headless benchmark runner: `python -m loadtest.run [--compare]`.

Starts the service (or uses ``--host``), runs Locust as a subprocess with the step load shape until the SLO
breaks or the last step, scrapes /metrics before and after, and writes Locust's CSV and HTML reports, a
results JSON, a markdown summary and a latency-vs-throughput chart. Exits 1 when the SLO gate fails.
With ``--compare`` the identical scenario also runs against a FastAPI baseline, both servers up, step by step in
turn (:func:`measure_side_by_side`), and the report gives the throughput ratio at an equal or lower p99: the
service at its best step whose p99 is not above that of the baseline's best step within the SLO, and the ratio
at each step.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from loadtest import promscrape, report, servers
from loadtest.images import COMPARE_MIX, DEFAULT_MIX, parse_mix
from loadtest.stepstats import DEFAULTS, headline, meets_slo, step_schedule

log = logging.getLogger(__name__)

LOADTEST_DIR = Path(__file__).resolve().parent

#: Scenario presets: which images, and which shares of batches and bad inputs.
SCENARIOS = {
    # Everything a user sends: the image mix on /classify with 1% bad inputs, and 10% /classify_batch.
    "mix": {"image_mix": DEFAULT_MIX, "batch_share": 0.1, "bad_input_share": 0.01},
    # Side by side with a baseline: /classify with 500x375 JPEGs only.
    "compare": {"image_mix": COMPARE_MIX, "batch_share": 0.0, "bad_input_share": 0.0},
}


@dataclass
class RunConfig:
    """Everything one run needs; saved into results.json as the resolved settings."""

    host: str = ""  # target an already running service instead of starting one
    model: str = "image-classifier:latest"  # model tag the runner serves (and the baseline loads)
    variant: str = ""  # IMGCLS_VARIANT for the service; empty: its default (int8 on CPU, fp16 on CUDA)
    device: str = ""  # IMGCLS_DEVICE; empty: auto
    workers: int = 0  # IMGCLS_WORKERS; 0: the service's default
    port: int = 0  # the port of the service the runner starts; 0: a free one
    service_env: list[str] = field(default_factory=list)  # KEY=VALUE settings of the service the runner starts
    scenario: str = "mix"
    image_mix: str = ""  # overrides the scenario's mix
    batch_share: float = -1.0  # overrides the scenario's share of /classify_batch requests; <0: the scenario's
    bad_input_share: float = -1.0  # overrides the scenario's share; <0: the scenario's
    labels: str = ""  # labels to validate against; empty: the served model's labels.json when the runner knows it
    steps: str = DEFAULTS.steps  # users per step (or START..MAXxFACTOR)
    step_duration: float = DEFAULTS.step_duration  # seconds per step; the first step_settle seconds are not measured
    step_settle: float = DEFAULTS.step_settle
    warmup: float = DEFAULTS.warmup  # seconds at the first step's load before measuring
    latency_objective_ms: float = DEFAULTS.latency_objective_ms  # p99 each step is judged by
    max_error_rate: float = DEFAULTS.max_error_rate
    min_rps: float = 0.0  # gate: the best throughput within the objective must reach this
    break_steps: int = DEFAULTS.break_steps  # stop after this many consecutive steps break it; 0: run every step
    processes: int = 0  # Locust --processes (one Locust process tops out at a few hundred req/s of uploads)
    compare: bool = False
    baseline: str = "fastapi-fp32"  # with compare: which hand-written server (loadtest/servers.py BASELINES)
    min_ratio: float = 0.0  # gate (with --compare): service/baseline throughput ratio must reach this
    batch_metric: str = "batch_size"  # substring of the service's batch-size histogram name in /metrics
    out: str = ""  # output folder; default runs/loadtest/<timestamp>
    locust_args: list[str] = field(default_factory=list)  # passed to Locust as they are
    ready_timeout: float = 300.0

    def resolved(self) -> RunConfig:
        """Fill the scenario's defaults into the empty fields and check the values."""
        if self.scenario not in SCENARIOS:
            raise ValueError(f"Unknown scenario {self.scenario!r}; choose from {', '.join(SCENARIOS)}.")
        preset = SCENARIOS[self.scenario]
        self.image_mix = self.image_mix or preset["image_mix"]
        for name in ("batch_share", "bad_input_share"):
            if getattr(self, name) < 0:
                setattr(self, name, preset[name])
        parse_mix(self.image_mix)
        step_schedule(self.steps)
        if self.step_settle >= self.step_duration:
            raise ValueError("--step-settle must be shorter than --step-duration.")
        self.out = self.out or str(Path("runs/loadtest") / datetime.now().strftime("%Y%m%d-%H%M%S"))
        return self


def locust_command(cfg: RunConfig, url: str, out_dir: Path, labels: str) -> list[str]:
    """The `python -m locust` command line for one target."""
    cmd = [sys.executable, "-m", "locust", "-f", str(LOADTEST_DIR), "--headless", "--host", url,
           "--steps", cfg.steps, "--step-duration", str(cfg.step_duration), "--step-settle", str(cfg.step_settle),
           "--warmup", str(cfg.warmup), "--latency-objective-ms", str(cfg.latency_objective_ms),
           "--max-error-rate", str(cfg.max_error_rate), "--break-steps", str(cfg.break_steps),
           "--steps-out", str(out_dir / "steps.json"), "--image-mix", cfg.image_mix,
           "--batch-share", str(cfg.batch_share), "--bad-input-share", str(cfg.bad_input_share), "--labels", labels,
           "--csv", str(out_dir / "locust"), "--html", str(out_dir / "locust_report.html"),
           "--only-summary", "--loglevel", "INFO"]  # fmt: skip
    if cfg.processes:
        cmd += ["--processes", str(cfg.processes)]
    return cmd + cfg.locust_args


def run_locust(
    cmd: list[str], out_dir: Path, timeout: float, cpu: servers.CpuProbe | None = None
) -> tuple[int, list[tuple[float, float]]]:
    """Run Locust with its output in locust.log, reporting each step as the shape writes it to steps.json;
    returns its exit code and (Unix time, server CPU seconds) samples taken once a second when ``cpu`` is given."""
    log.info("locust: %s", shlex.join(cmd))
    steps_file, reported, samples = out_dir / "steps.json", 0, []
    deadline = time.monotonic() + timeout  # a hung Locust must not hang the runner
    with open(out_dir / "locust.log", "w") as logfile:
        proc = subprocess.Popen(cmd, cwd=servers.ROOT, stdout=logfile, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if cpu is not None:
                    samples.append((time.time(), cpu()))
                time.sleep(1)
                reported = _report_new_steps(steps_file, reported)
        finally:
            if proc.poll() is None:
                proc.kill()
            code = proc.wait()
    if cpu is not None:
        samples.append((time.time(), cpu()))  # after the last step's end
    _report_new_steps(steps_file, reported)
    if code < 0:
        raise TimeoutError(f"Locust was stopped after {timeout:.0f}s (signal {-code}); see {out_dir / 'locust.log'}")
    return code, samples


def cpu_per_request(step: dict, samples: list[tuple[float, float]]) -> float | None:
    """Server CPU milliseconds per request in a step's window, from the samples interpolated at its ends."""
    start, end = step.get("window", (0.0, 0.0))
    if len(samples) < 2 or not step["requests"] or not samples[0][0] <= start < end <= samples[-1][0]:
        return None
    times, seconds = zip(*samples, strict=True)
    used = float(np.interp(end, times, seconds) - np.interp(start, times, seconds))
    return round(1000 * used / step["requests"], 3)


def _report_new_steps(steps_file: Path, reported: int) -> int:
    """Log the steps finished since the last call (the shape rewrites the file after each); returns the count."""
    try:
        steps = json.loads(steps_file.read_text())["steps"]
    except (OSError, ValueError, KeyError):
        return reported
    for s in steps[reported:]:
        log.info(
            "step: %d users, %.1f req/s, p50 %s ms, p99 %s ms, errors %.2f%%",
            s["users"], s["rps"], s["p50_ms"], s["p99_ms"], 100 * s["error_rate"],
        )  # fmt: skip
    return len(steps)


def locust_steps(cfg: RunConfig, target: servers.Target, out_dir: Path, labels: str) -> tuple[dict, list[dict]]:
    """One Locust run of ``cfg``'s steps against ``target``, its files in ``out_dir``: what ran (command, exit code,
    folder) and the steps' results, each with the server's CPU per request when the runner started the server."""
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = cfg.warmup + len(step_schedule(cfg.steps)) * cfg.step_duration + 120
    cmd = locust_command(cfg, target.url, out_dir, labels)
    code, samples = run_locust(cmd, out_dir, budget, servers.cpu_probe(target))
    steps_file = out_dir / "steps.json"
    if not steps_file.exists():
        raise RuntimeError(f"Locust finished (exit {code}) without step results; see {out_dir / 'locust.log'}")
    steps = json.loads(steps_file.read_text())["steps"]
    for step in steps:
        step["server_cpu_ms_per_request"] = cpu_per_request(step, samples)
    return {"command": shlex.join(cmd), "exit_code": code, "folder": str(out_dir)}, steps


def target_result(
    cfg: RunConfig, target: servers.Target, label: str, runs: list[dict], steps: list[dict], before, after
) -> dict:
    """What the report keeps of one target: its Locust runs, steps, headline and the /metrics difference."""
    return {
        "label": label,
        "url": target.url,
        "started_by_runner": target.proc is not None,
        "locust_runs": runs,  # Locust's CSV and HTML reports and steps.json are in each run's folder
        "steps": steps,
        "headline": headline(steps, cfg.latency_objective_ms, cfg.max_error_rate),
        "metrics": promscrape.summarize(before, after, cfg.batch_metric),
    }


def measure(cfg: RunConfig, target: servers.Target, label: str, out_dir: Path, labels: str) -> dict:
    """One stepped Locust run against ``target``: steps, headline and the /metrics difference."""
    before = promscrape.scrape(target.url)
    run, steps = locust_steps(cfg, target, out_dir, labels)
    return target_result(cfg, target, label, [run], steps, before, promscrape.scrape(target.url))


def measure_side_by_side(
    cfg: RunConfig, targets: dict[str, tuple[servers.Target, str]], out: Path, labels: str
) -> dict[str, dict]:
    """Each step against every target in turn, all of them up, the order reversed from one step to the next.

    This box's speed drifts by several per cent over minutes (other tenants, turbo), and a comparison run target
    after target put all of one target's steps in one stretch of it. Here each step's two measurements follow
    each other and neither target always goes first. Each (step, target) is its own Locust run, in
    ``out/<target>/step-NN-<users>u``: warm-up before a target's first step only, then each step's ``step_settle``
    seconds unmeasured. A target stops after ``break_steps`` consecutive steps over the SLO; the other goes on.
    """
    names = list(targets)
    before = {name: promscrape.scrape(target.url) for name, (target, _) in targets.items()}
    runs: dict[str, list[dict]] = {name: [] for name in names}
    steps: dict[str, list[dict]] = {name: [] for name in names}
    breaks = dict.fromkeys(names, 0)
    for index, users in enumerate(step_schedule(cfg.steps)):
        for name in names if index % 2 == 0 else names[::-1]:
            if cfg.break_steps and breaks[name] >= cfg.break_steps:
                continue
            one = replace(cfg, steps=str(users), warmup=0.0 if runs[name] else cfg.warmup, break_steps=0)
            folder = out / name / f"step-{index + 1:02d}-{users}u"
            run, measured = locust_steps(one, targets[name][0], folder, labels)
            runs[name].append(run)
            steps[name] += measured
            ok = bool(measured) and meets_slo(measured[-1], cfg.latency_objective_ms, cfg.max_error_rate)
            breaks[name] = 0 if ok else breaks[name] + 1
    return {
        name: target_result(cfg, target, label, runs[name], steps[name], before[name], promscrape.scrape(target.url))
        for name, (target, label) in targets.items()
    }


def served_model_info(url: str) -> dict:
    """What a running service says it serves (its model-info gauge: model, variant, provider); empty if unknown."""
    samples = promscrape.scrape(url)
    return promscrape.summarize(samples, samples).get("model_info") or {}


def model_folder(tag: str) -> tuple[Path, str]:
    """The stored model's folder and full tag, with a clear message when it is missing."""
    import bentoml

    try:
        model = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        raise SystemExit(
            f"Model {tag!r} is not in the BentoML model store; train one first (`make train`, or "
            "`python -m training --demo`) or pass --model with a tag from `bentoml models list`."
        ) from None
    return Path(model.path), str(model.tag)


def benchmark(cfg: RunConfig, command: str) -> dict:
    """Run the service (and with ``compare`` the baseline) through the stepped scenario; return the results."""
    cfg = cfg.resolved()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = tag = None
    if not cfg.host or cfg.compare:
        folder, tag = model_folder(cfg.model)
    labels = cfg.labels or (str(folder / "labels.json") if folder else "")
    result = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": report.machine_info(),
        "settings": {**asdict(cfg), "model": tag or f"{cfg.model} (as served at --host)"},
        "targets": {},
        "comparison": None,
    }
    env = {k: v for k, v in {"IMGCLS_VARIANT": cfg.variant, "IMGCLS_DEVICE": cfg.device}.items() if v}
    if cfg.workers:
        env["IMGCLS_WORKERS"] = str(cfg.workers)
    for setting in cfg.service_env:
        key, _, value = setting.partition("=")
        if not key.startswith("IMGCLS_") or not _:
            raise ValueError(
                f"--service-env {setting!r}: give IMGCLS_NAME=VALUE (python -m service.settings lists them)"
            )
        env[key] = value
    if cfg.host:
        target = servers.Target("service", cfg.host.rstrip("/"))
        servers.wait_ready(target, cfg.ready_timeout)
    else:
        target = servers.start_service(tag, out / "service", env, cfg.ready_timeout, port=cfg.port)
    started = [target]
    try:
        if cfg.compare:
            spec = servers.BASELINES[cfg.baseline]
            # The expert runs the variant the service runs.
            variant = spec.variant or served_model_info(target.url).get("variant") or cfg.variant or "int8"
            baseline = servers.start_baseline(folder, tag, out / "baseline", spec, variant, cfg.ready_timeout)
            started.append(baseline)
            label = f"{cfg.baseline} ({variant}, {spec.describe()})"
            pair = {"service": (target, "service"), "baseline": (baseline, label)}
            result["targets"] = measure_side_by_side(cfg, pair, out, labels)
        else:
            result["targets"]["service"] = measure(cfg, target, "service", out / "service", labels)
    finally:
        for server in started:
            servers.stop(server)
    info = result["targets"]["service"]["metrics"].get("model_info") or {}
    if info:  # what the service says it ran, from its model-info gauge
        result["targets"]["service"]["label"] = f"service ({info.get('variant')}, {info.get('provider')})"
        result["settings"]["model"] = info.get("model", result["settings"]["model"])
    if cfg.compare:
        result["comparison"] = report.comparison(
            result["targets"]["service"]["steps"], result["targets"]["baseline"]["headline"], cfg.max_error_rate
        )
    result["gate"] = report.gate(result, cfg.latency_objective_ms, cfg.max_error_rate, cfg.min_rps, cfg.min_ratio)
    report.write(result, out)
    return result


def parse_args(argv: list[str] | None = None) -> tuple[RunConfig, list[str]]:
    """Command-line options to a RunConfig (defaults and meaning from the dataclass)."""
    d = RunConfig()
    p = argparse.ArgumentParser(
        prog="python -m loadtest.run",
        description=__doc__.split("\n\n")[0],
        epilog="exit status: 0 the gate passed; 1 it failed (no step within the objective, the headline below "
        "--min-rps, or the ratio below --min-ratio); 2 a bad option, or a server that did not start.",
    )
    p.add_argument("--host", default=d.host, help="URL of a running service (default: start `bentoml serve`)")
    p.add_argument(
        "--model", default=d.model, help="model tag to serve and to load in the baseline (default: %(default)s)"
    )
    p.add_argument("--variant", default=d.variant, choices=["fp32", "fp16", "int8"],
                   help="IMGCLS_VARIANT (default: the service's, int8 on the CPU and fp16 on CUDA)")  # fmt: skip
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"], help="IMGCLS_DEVICE (default: auto)")
    p.add_argument("--workers", type=int, default=d.workers, help="IMGCLS_WORKERS (default: the service's)")
    p.add_argument("--port", type=int, default=d.port, help="port of the service it starts (default: a free one)")
    p.add_argument("--service-env", action="append", default=[], metavar="IMGCLS_NAME=VALUE",
                   help="a setting of the service it starts, repeatable (see python -m service.settings)")  # fmt: skip
    p.add_argument("--scenario", default=None, choices=list(SCENARIOS),
                   help="mix: image mix + batch + bad inputs (the default); compare: 500x375 JPEGs on /classify "
                   "(the default with --compare)")  # fmt: skip
    p.add_argument("--image-mix", default=d.image_mix, help="instead of the scenario's image mix")
    p.add_argument("--batch-share", type=float, default=d.batch_share, help="instead of the scenario's batch share")
    p.add_argument("--bad-input-share", type=float, default=d.bad_input_share,
                   help="instead of the scenario's share of bad inputs")  # fmt: skip
    p.add_argument("--labels", default=d.labels, help="labels to validate against (default: the model's)")
    p.add_argument("--steps", default=d.steps, help="users per step: '1,2,4,8' or '2..64x2' (default: %(default)s)")
    p.add_argument(
        "--step-duration", type=float, default=d.step_duration, help="seconds per step (default: %(default)s)"
    )
    p.add_argument("--step-settle", type=float, default=d.step_settle,
                   help="unmeasured seconds at each step start (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--warmup", type=float, default=d.warmup, help="warm-up seconds before the first step (default: %(default)s)"
    )
    p.add_argument("--latency-objective-ms", type=float, default=d.latency_objective_ms,
                   help="p99 objective, ms (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-error-rate", type=float, default=d.max_error_rate,
                   help="error budget, 0.001 = 0.1%% (default: %(default)s)")  # fmt: skip
    p.add_argument("--min-rps", type=float, default=d.min_rps, help="gate: least req/s within the objective")
    p.add_argument("--break-steps", type=int, default=d.break_steps,
                   help="stop after N steps over the objective, 0: never (default: %(default)s)")  # fmt: skip
    p.add_argument("--processes", type=int, default=d.processes,
                   help="Locust worker processes, -1: one per core (default: one Locust process)")  # fmt: skip
    p.add_argument("--compare", action="store_true", help="also run a baseline server and report the ratio")
    p.add_argument("--baseline", default=d.baseline, choices=list(servers.BASELINES),
                   help="fastapi-fp32 (the default): what most people write first (fp32, one process); fastapi-expert: "
                   "the service's variant, one uvicorn worker per core, one onnxruntime thread each")  # fmt: skip
    p.add_argument("--min-ratio", type=float, default=d.min_ratio, help="gate with --compare: least throughput ratio")
    p.add_argument(
        "--batch-metric", default=d.batch_metric, help="name part of the batch-size histogram (default: %(default)s)"
    )
    p.add_argument("--out", default=d.out, help="output folder (default: runs/loadtest/<timestamp>)")
    p.add_argument("--ready-timeout", type=float, default=d.ready_timeout,
                   help="seconds to wait for /readyz (default: %(default)s)")  # fmt: skip
    p.add_argument("--locust-arg", action="append", default=[], dest="locust_args",
                   help="extra argument for Locust, repeatable (e.g. --locust-arg=--csv-full-history)")  # fmt: skip
    args = p.parse_args(argv)
    if args.scenario is None:
        args.scenario = "compare" if args.compare else d.scenario
    return RunConfig(**vars(args)), (sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the markdown summary, and return the gate's exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, args = parse_args(argv)
    try:
        result = benchmark(cfg, shlex.join(["python", "-m", "loadtest.run", *args]))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.markdown(result))
    print(f"Results: {result['files']['json']}  chart: {result['files']['chart']}")
    if result["gate"]["passed"]:
        print("SLO gate: passed")
        return 0
    print("SLO gate: FAILED - " + "; ".join(result["gate"]["reasons"]))
    return 1


if __name__ == "__main__":
    sys.exit(main())
