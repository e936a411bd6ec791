"""The one error type: a request the service refuses or cannot answer, as the client will see it.

Raised wherever the problem is found (the upload parser, the decoder, the batcher, a middleware) and turned
into the one response shape, ``{"error": code, "detail": what to do}`` with ``status``, in one place.
"""

from __future__ import annotations


class ApiError(Exception):
    """HTTP ``status``, a short machine-readable ``code`` and a ``detail`` that tells the client what to do."""

    def __init__(self, status: int, code: str, detail: str, retry_after: int | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.retry_after = status, code, detail, retry_after

    def body(self) -> dict[str, str]:
        """The JSON body every error response has."""
        return {"error": self.code, "detail": self.detail}

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code!r}, {self.detail!r})"


def size_text(n: int) -> str:
    """A byte count as people read it in an error message: 64 MiB, 1.5 KiB, 300 bytes."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f} {unit}" if value == int(value) or value >= 100 else f"{value:.1f} {unit}"
    return f"{n} bytes"
