"""Step load shape: warm up, then hold each user count for a fixed time and measure it; stop when the SLO breaks.

Active in step mode, when ``--steps`` is given (``"2,4,8,16"`` or ``"2..64x2"``); without it the locustfile
removes the shape, so ``locust -f loadtest`` runs Locust's own constant load. Options come from
``loadtest/locustfile.py``; the step logic itself is :class:`loadtest.stepstats.StepPlan`. After each step its
result is written to ``--steps-out`` (the runner follows that file).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from locust import LoadTestShape

from loadtest.stepstats import Snapshot, StepPlan, StepResult, step_schedule

log = logging.getLogger(__name__)


def plan_from_options(opts) -> StepPlan:
    """A StepPlan from Locust's parsed options (custom ones from loadtest/locustfile.py, defaults included)."""
    return StepPlan(
        users=step_schedule(opts.steps),
        warmup=float(opts.warmup),
        duration=float(opts.step_duration),
        settle=float(opts.step_settle),
        latency_objective_ms=float(opts.latency_objective_ms),
        max_error_rate=float(opts.max_error_rate),
        break_steps=int(opts.break_steps),
    )


class StepLoadShape(LoadTestShape):
    """Warm-up, then steps of ``--step-duration`` seconds; the first ``--step-settle`` seconds are not measured."""

    # Without --steps the locustfile removes this shape and -u/-r/-t drive Locust's constant load, so Locust must
    # not warn that they are ignored (it checks before the locustfile can say); with --steps the locustfile warns.
    use_common_options = True

    def __init__(self):
        super().__init__()
        self.plan: StepPlan | None = None

    def reset_time(self) -> None:
        """Called by Locust when a run starts; a new run (e.g. restarted from the web UI) gets a new plan."""
        super().reset_time()
        self.plan = None

    def tick(self):
        opts = self.runner.environment.parsed_options
        if self.plan is None:
            self.plan = plan_from_options(opts)
            log.info("step plan: %s users, %gs each", self.plan.users, self.plan.duration)
        users = self.plan.tick(
            self.get_run_time(), self.snapshot, self._reset, lambda i, r, ok: self._on_step(opts, i, r, ok)
        )
        return None if users is None else (users, float(users))

    def snapshot(self) -> Snapshot:
        """The aggregated counters now (on a distributed master: as last reported by the workers)."""
        stats = self.runner.stats
        total = stats.total
        per_name = {f"{e.method} {e.name}": (e.num_requests, e.num_failures) for e in stats.entries.values()}
        return Snapshot(
            time.monotonic(), total.num_requests, total.num_failures, dict(total.response_times), per_name, time.time()
        )

    def _reset(self) -> None:
        self.runner.stats.reset_all()  # Locust's CSV/HTML reports then cover the measured steps only
        log.info("warm-up done after %.0fs", self.get_run_time())

    def _on_step(self, opts, index: int, result: StepResult, ok: bool) -> None:
        log.info(
            "step %d: %d users, %.1f req/s, p50 %s ms, p99 %s ms, errors %.3f%% -> %s",
            index + 1, result.users, result.rps, result.p50_ms, result.p99_ms, 100 * result.error_rate,
            "within SLO" if ok else "SLO broken",
        )  # fmt: skip
        path = opts.steps_out
        if path:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(
                json.dumps({"planned": self.plan.users, "steps": [r.to_dict() for r in self.plan.results]}, indent=2)
            )
            os.replace(tmp, path)
