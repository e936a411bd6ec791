"""Admission: whether an API worker takes a request on, once its body has arrived.

A request is refused at once with 503 and ``Retry-After`` when the worker already processes
``max_concurrency`` requests, or when its images would wait longer than ``max_wait_s``: an estimate from the images
of the requests already admitted and the recent time an image takes, rather than letting them queue until the
latency goes to seconds. The worker's threads take the requests' images in turn (``service/threads.py``), so a
request of ``k`` images waits for at most ``k`` images of each request ahead of it; the estimate counts that.
"""

from __future__ import annotations

import math

from imgcls.errors import ApiError
from service import metrics


class Ticket:
    """An admitted request: its images not finished yet. ``done_one()`` as each finishes, ``close()`` at the end."""

    __slots__ = ("admission", "remaining")

    def __init__(self, admission: Admission, images: int):
        self.admission, self.remaining = admission, images

    def done_one(self, seconds: float) -> None:
        """One image finished, after ``seconds`` of decoding and model time."""
        self.admission.record(seconds)
        self.remaining -= 1

    def close(self) -> None:
        self.admission.release(self)


class Admission:
    """The requests one API worker processes, within ``max_concurrency`` and ``max_wait_s`` (see the module).

    ``parallelism``: images the worker processes at once when busy (its share of the cores). Used on the event
    loop only.
    """

    def __init__(self, max_concurrency: int, max_wait_s: float, parallelism: float = 1.0, retry_after_s: int = 1):
        self.max_concurrency, self.max_wait_s = max_concurrency, max_wait_s
        self.parallelism, self.retry_after_s = max(parallelism, 1e-3), retry_after_s
        self.admitted: set[Ticket] = set()
        self.seconds_per_image = 0.0  # recent decode and model time of an image

    def expected_wait(self, images: int) -> float:
        """Seconds until a new request of ``images`` images would be done, behind the admitted ones."""
        ahead = sum(min(t.remaining, images) for t in self.admitted)
        return (ahead + images) * self.seconds_per_image / self.parallelism

    def admit(self, images: int) -> Ticket:
        """A ticket for a request of ``images`` images; ApiError 503 when it cannot be taken on now."""
        if len(self.admitted) >= self.max_concurrency:
            raise self._busy(
                f"This worker already processes {len(self.admitted)} requests (IMGCLS_MAX_CONCURRENCY)",
                self.retry_after_s,
            )
        wait = self.expected_wait(images)
        if wait > self.max_wait_s:
            raise self._busy(
                f"The images of this request would wait about {wait:.1f} s, more than "
                f"{self.max_wait_s * 1000:.0f} ms (IMGCLS_MAX_LATENCY_MS)",
                max(self.retry_after_s, math.ceil(wait - self.max_wait_s)),
            )
        ticket = Ticket(self, images)
        self.admitted.add(ticket)
        metrics.get().in_flight.inc()
        return ticket

    def release(self, ticket: Ticket) -> None:
        if ticket in self.admitted:
            self.admitted.discard(ticket)
            metrics.get().in_flight.dec()

    def record(self, seconds: float) -> None:
        """Fold one image's decode and model time into the recent time per image."""
        self.seconds_per_image = 0.9 * self.seconds_per_image + 0.1 * seconds

    @staticmethod
    def _busy(why: str, retry_after_s: int) -> ApiError:
        return ApiError(
            503, "overloaded", f"{why}; retry after the number of seconds in Retry-After.", retry_after=retry_after_s
        )
