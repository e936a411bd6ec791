"""Step load shape: warm up, then hold each user count for a fixed time and measure it; stop when the SLO breaks.

Active in step mode, when ``--steps`` is given (``"2,4,8,16"`` or ``"2..64x2"``). Without it the shape is a
plain constant load from ``-u``/``-r``/``-t`` (also what the web UI's user-count fields set), so
``locust -f loadtest`` behaves as usual. Options come from ``loadtest/locustfile.py``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from locust import LoadTestShape

from loadtest.stepstats import Snapshot, StepResult, meets_slo, step_result, step_schedule

log = logging.getLogger(__name__)


def _opt(options, name: str, default):
    value = getattr(options, name, None) if options is not None else None
    return default if value is None or value == "" else value


class StepLoadShape(LoadTestShape):
    """Warm-up, then steps of ``--step-duration`` seconds; the first ``--step-settle`` seconds are not measured."""

    use_common_options = True  # without --steps: -u, -r and -t (and the web UI's fields) drive a constant load

    def __init__(self):
        super().__init__()
        self._reset_plan()

    def _reset_plan(self) -> None:
        self.results: list[StepResult] = []
        self._planned: list[int] | None = None
        self._current = -1
        self._window_start: Snapshot | None = None
        self._breaks = 0
        self._done = False
        self._warm = False

    def reset_time(self) -> None:
        """Called by Locust when a run starts; also forget any previous run's steps (web UI restarts)."""
        super().reset_time()
        self._reset_plan()

    # -- Locust hook --------------------------------------------------------------------------------------------
    def tick(self):
        opts = self.runner.environment.parsed_options if self.runner else None
        spec = _opt(opts, "steps", "")
        if not spec:
            run_time = _opt(opts, "run_time", 0)
            if run_time and self.get_run_time() >= run_time:
                return None
            return int(_opt(opts, "num_users", 1)), float(_opt(opts, "spawn_rate", 1))
        if self._planned is None:
            self._planned = step_schedule(spec)
            log.info("step plan: %s users, %ss each", self._planned, _opt(opts, "step_duration", 60))
        return self._step_tick(opts)

    # -- step mode ----------------------------------------------------------------------------------------------
    def _step_tick(self, opts):
        if self._done:
            return None
        warmup = float(_opt(opts, "warmup", 10))
        duration = float(_opt(opts, "step_duration", 60))
        settle = min(float(_opt(opts, "step_settle", 5)), duration / 2)
        t = self.get_run_time()
        first = self._planned[0]
        if t < warmup:
            return first, float(first)
        if not self._warm:
            self._warm = True
            self.runner.stats.reset_all()  # the CSV/HTML reports then cover the measured steps only
            log.info("warm-up done after %.0fs", t)
        index = int((t - warmup) // duration)
        in_step = (t - warmup) - index * duration
        if index != self._current:
            if self._current >= 0 and self._window_start is not None:
                if self._finish_step(opts):
                    self._done = True
                    return None
            self._current = index
            self._window_start = None
        if index >= len(self._planned):
            self._done = True
            return None
        users = self._planned[index]
        if self._window_start is None and in_step >= settle:
            self._window_start = self.snapshot()
        return users, float(users)

    def _finish_step(self, opts) -> bool:
        """Record the step that just ended; True when the run should stop because the SLO broke."""
        result = step_result(self._planned[self._current], self._window_start, self.snapshot())
        self.results.append(result)
        slo, max_err = float(_opt(opts, "slo_p99_ms", 200.0)), float(_opt(opts, "max_error_rate", 0.001))
        ok = meets_slo(result, slo, max_err)
        log.info(
            "step %d: %d users, %.1f req/s, p50 %s ms, p99 %s ms, errors %.3f%% -> %s",
            self._current + 1,
            result.users,
            result.rps,
            result.p50_ms,
            result.p99_ms,
            100 * result.error_rate,
            "within SLO" if ok else "SLO broken",
        )
        self._write(opts)
        self._breaks = 0 if ok else self._breaks + 1
        stop_after = int(_opt(opts, "break_steps", 1))
        return stop_after > 0 and self._breaks >= stop_after

    def snapshot(self) -> Snapshot:
        """The aggregated counters now (on a distributed master: as last reported by the workers)."""
        stats = self.runner.stats
        total = stats.total
        per_name = {f"{e.method} {e.name}": (e.num_requests, e.num_failures) for e in stats.entries.values()}
        return Snapshot(time.monotonic(), total.num_requests, total.num_failures, dict(total.response_times), per_name)

    def _write(self, opts) -> None:
        path = _opt(opts, "steps_out", "")
        if not path:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"planned": self._planned, "steps": [r.to_dict() for r in self.results]}, indent=2))
        os.replace(tmp, path)
