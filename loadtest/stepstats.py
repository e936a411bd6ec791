"""Per-step statistics of a stepped load test, the SLO check and the headline: pure functions, no Locust runtime.

Locust keeps one cumulative histogram of response times (``StatsEntry.response_times``: rounded ms -> count;
1 ms resolution below 100 ms, 10 ms below 1 s, 100 ms below 10 s). A step's own percentiles come from the
difference between two snapshots of it, taken at the start and end of the step's measurement window, so
each step's p99 counts that step's requests only. This also works on a distributed master, whose histogram
is the sum of the workers' reports.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

PERCENTILES = (0.50, 0.95, 0.99)


@dataclass(frozen=True)
class StepDefaults:
    """The defaults of a stepped run, defined once: the runner's and Locust's options and the plan read them."""

    steps: str = "1,2,4,6,8,12,16,24,32,48,64"  # users per step (the runner's; Locust's own default is no steps)
    step_duration: float = 40.0  # seconds per step
    step_settle: float = 10.0  # seconds at the start of a step left out of its statistics
    warmup: float = 15.0  # seconds at the first step's load before measuring (JIT, caches, batching warm)
    latency_objective_ms: float = 200.0  # p99 each step is judged by
    max_error_rate: float = 0.001  # share of failed requests a step may have
    break_steps: int = 1  # stop after this many consecutive steps over the objective; 0: run every step


DEFAULTS = StepDefaults()


@dataclass
class Snapshot:
    """Cumulative counters of the aggregated stats entry at one moment."""

    t: float
    requests: int
    failures: int
    response_times: dict[int, int]
    per_name: dict[str, tuple[int, int]] = field(default_factory=dict)
    wall: float = 0.0  # Unix time, so that another process can line up its own samples (the server's CPU)


@dataclass
class StepResult:
    """What one load step measured, its warm-up excluded."""

    users: int
    duration_s: float
    requests: int
    failures: int
    rps: float
    error_rate: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    per_name: dict[str, dict[str, int]] = field(default_factory=dict)
    window: tuple[float, float] = (0.0, 0.0)  # Unix times of the measured window

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(hist: dict[int, int], q: float) -> float | None:
    """The response time at or below which ``q`` of the requests in ``hist`` (ms -> count) finished."""
    total = sum(hist.values())
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for ms in sorted(hist):
        seen += hist[ms]
        if seen >= rank:
            return float(ms)
    return float(max(hist))


def diff_hist(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    """Counts recorded between two cumulative snapshots (stats resets show up as negative and are dropped)."""
    out = Counter(after)
    out.subtract(before)
    return {int(k): v for k, v in out.items() if v > 0}


def step_result(users: int, start: Snapshot, end: Snapshot) -> StepResult:
    """The statistics of the requests finished between two snapshots."""
    hist = diff_hist(end.response_times, start.response_times)
    duration = max(end.t - start.t, 1e-9)
    requests = max(end.requests - start.requests, 0)
    failures = max(end.failures - start.failures, 0)
    p50, p95, p99 = (percentile(hist, q) for q in PERCENTILES)
    per_name = {}
    for name, (req, fail) in end.per_name.items():
        req0, fail0 = start.per_name.get(name, (0, 0))
        if req - req0 > 0:
            per_name[name] = {"requests": req - req0, "failures": max(fail - fail0, 0)}
    return StepResult(
        users=users,
        duration_s=round(duration, 3),
        requests=requests,
        failures=failures,
        rps=round(requests / duration, 3),
        error_rate=round(failures / requests, 6) if requests else 0.0,
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        max_ms=float(max(hist)) if hist else None,
        per_name=per_name,
        window=(start.wall, end.wall),
    )


def meets_slo(step: StepResult | dict, latency_objective_ms: float, max_error_rate: float) -> bool:
    """True when the step served requests with p99 within the objective and an error rate within the limit."""
    s = step.to_dict() if isinstance(step, StepResult) else step
    return (
        s["requests"] > 0
        and s["p99_ms"] is not None
        and s["p99_ms"] <= latency_objective_ms
        and s["error_rate"] <= max_error_rate
    )


def headline(steps: list[dict], latency_objective_ms: float, max_error_rate: float) -> dict | None:
    """The step with the highest achieved req/s among those meeting the SLO, or None when none does."""
    ok = [s for s in steps if meets_slo(s, latency_objective_ms, max_error_rate)]
    return max(ok, key=lambda s: s["rps"]) if ok else None


def step_schedule(spec: str) -> list[int]:
    """Parse the users per step, e.g. ``"2,4,8,16"``, or a geometric ``"2..64x2"`` (start..max x factor)."""
    spec = spec.strip()
    if ".." in spec:
        start_s, _, rest = spec.partition("..")
        max_s, _, factor_s = rest.partition("x")
        try:
            start, top, factor = int(start_s), int(max_s), float(factor_s or 2)
        except ValueError:
            raise ValueError(f"Step spec {spec!r} is not START..MAX[xFACTOR], e.g. '2..64x2'.") from None
        if start < 1 or top < start or factor <= 1:
            raise ValueError(f"Step spec {spec!r} needs 1 <= START <= MAX and FACTOR > 1.")
        steps, users = [], float(start)
        while round(users) <= top:
            if not steps or round(users) != steps[-1]:
                steps.append(round(users))
            users *= factor
        return steps
    try:
        steps = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"Step spec {spec!r} is not a comma list of user counts, e.g. '2,4,8,16'.") from None
    if not steps or min(steps) < 1:
        raise ValueError(f"Step spec {spec!r} needs at least one user count >= 1.")
    return steps


@dataclass
class StepPlan:
    """The step-mode state machine, driven by the load shape once a second with the run time in seconds.

    Warm-up at the first step's users (then ``reset`` is called, so Locust's own reports leave it out), then
    each step for ``duration`` seconds, measured after ``settle`` seconds. After each step ``on_step`` gets its
    result; the plan ends after the last step or after ``break_steps`` consecutive steps over the SLO.
    """

    users: list[int]
    warmup: float = DEFAULTS.warmup
    duration: float = DEFAULTS.step_duration
    settle: float = DEFAULTS.step_settle
    latency_objective_ms: float = DEFAULTS.latency_objective_ms
    max_error_rate: float = DEFAULTS.max_error_rate
    break_steps: int = DEFAULTS.break_steps  # 0: never stop early
    results: list[StepResult] = field(default_factory=list)
    _current: int = -1
    _window_start: Snapshot | None = None
    _breaks: int = 0
    _warm: bool = False
    _done: bool = False

    def tick(self, t: float, snapshot, reset, on_step=None) -> int | None:
        """Users wanted at run time ``t``, or None when the plan is over."""
        if self._done:
            return None
        if t < self.warmup:
            return self.users[0]
        if not self._warm:
            self._warm = True
            reset()
        settle = min(self.settle, self.duration / 2)
        index = int((t - self.warmup) // self.duration)
        if index != self._current:
            if self._current >= 0 and self._window_start is not None and self._finish(snapshot(), on_step):
                self._done = True
                return None
            self._current, self._window_start = index, None
        if index >= len(self.users):
            self._done = True
            return None
        if self._window_start is None and (t - self.warmup) - index * self.duration >= settle:
            self._window_start = snapshot()
        return self.users[index]

    def _finish(self, end: Snapshot, on_step) -> bool:
        result = step_result(self.users[self._current], self._window_start, end)
        self.results.append(result)
        ok = meets_slo(result, self.latency_objective_ms, self.max_error_rate)
        if on_step is not None:
            on_step(self._current, result, ok)
        self._breaks = 0 if ok else self._breaks + 1
        return self.break_steps > 0 and self._breaks >= self.break_steps
