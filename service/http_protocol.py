"""The HTTP connection protocol: limits on each request's head, and no reset connections at shutdown.

- **Heads**: uvicorn's httptools protocol bounds nothing: a client may send 100 MB of headers, which the parser
  buffers, or trickle them for ever. :class:`LimitedHttpToolsProtocol` counts the bytes of each request's head
  as they arrive and answers 431 (too large, too many fields) or 408 (too slow) with the service's JSON error,
  then closes the connection, before any of it reaches the application.
- **Balance**: a connection is counted in this worker's slot of the connection census (``service/balance.py``)
  from its first complete request until it closes. One still sending its first head or body is not: a hundred
  slow clients on one worker must not make it push its working clients away.
- **Shutdown**: uvicorn closes idle keep-alive connections at once when it stops, and a client whose next
  request was already on its way got a reset. Here an idle connection is given ``IDLE_GRACE_S`` to bring that
  request, which is served with ``Connection: close``.

BentoML builds each worker's ``uvicorn.Config`` itself and offers no way to choose the protocol class, so
:func:`install` points uvicorn's "auto" HTTP protocol at this one; it must run when the service module is
imported, before the worker's uvicorn loads its configuration.
"""

from __future__ import annotations

import asyncio
import json
import typing as t

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import balance, metrics

HEAD_END = b"\r\n\r\n"
#: At shutdown, how long an idle keep-alive connection may take to bring a request its client already sent.
IDLE_GRACE_S = 0.5


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on each request head (set by :func:`install`) and a graceful
    shutdown of idle connections."""

    max_head_bytes: t.ClassVar[int] = 32 << 10
    max_headers: t.ClassVar[int] = 100
    head_timeout_s: t.ClassVar[float] = 20.0

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        # A head is expected at the start of the connection and after each complete request; while one is, the
        # bytes received are counted up to the blank line that ends it (a body never shares a chunk with the
        # start of its own head, so nothing else is counted).
        self._expect_head, self._head_bytes, self._head_tail, self._fields = True, 0, b"", 0
        self._refusal: tuple[int, str, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._shutting_down = False
        self._census: balance.Census | None = None  # the census it is counted in, once it sent a whole request

    def connection_made(self, transport: t.Any) -> None:
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._expect_head:
            self._refuse(408, "head_timeout", f"The request headers did not arrive within {self.head_timeout_s:g} s.")

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        if self._census is not None:
            self._census.add(-1)
            self._census = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._expect_head:
            window = self._head_tail + data
            end = window.find(HEAD_END)
            if end < 0:
                self._head_bytes += len(data)
                self._head_tail = window[-3:]
            else:
                self._head_bytes += end + len(HEAD_END) - len(self._head_tail)
            if self._head_bytes > self.max_head_bytes:
                return self._refuse(
                    431,
                    "headers_too_large",
                    f"The request line and headers are over {self.max_head_bytes} bytes (IMGCLS_MAX_HEADER_BYTES).",
                )
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # as uvicorn's own data_received handles it
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if self._refusal is not None:
                return self._refuse(*self._refusal)
            self._refuse(400, "invalid_http", "The request is not valid HTTP/1.1.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._fields = 0
        if self._head_timer is None:  # a request after an idle keep-alive: its head has the same time to arrive
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def on_headers_complete(self) -> None:
        self._expect_head, self._head_bytes, self._head_tail = False, 0, b""
        self._stop_head_timer()
        super().on_headers_complete()
        if self._shutting_down and self.cycle is not None:
            self.cycle.keep_alive = False  # the last request on this connection: answered with Connection: close

    def shutdown(self) -> None:
        """The server stops: finish the request in flight, or serve the one an idle connection is bringing."""
        self._shutting_down = True
        if self.cycle is None or self.cycle.response_complete:
            self.loop.call_later(IDLE_GRACE_S, self._close_if_idle)
        elif not self.cycle.response_started:
            self.cycle.keep_alive = False  # its response will say Connection: close
        # else its response went out without Connection: close, so the client may send another request on this
        # connection: it stays open after the response for the same grace as an idle one (on_response_complete).

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._shutting_down and not self.transport.is_closing():
            self.loop.call_later(IDLE_GRACE_S, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def on_message_complete(self) -> None:
        self._expect_head = True
        if self._census is None and balance.CENSUS is not None:
            self._census = balance.CENSUS
            self._census.add(1)
        super().on_message_complete()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._fields > self.max_headers:
            self._refusal = (
                431,
                "too_many_headers",
                f"The request has more than {self.max_headers} header fields (IMGCLS_MAX_HEADERS).",
            )
            raise ValueError(self._refusal[2])  # stops the parser; data_received answers
        super().on_header(name, value)

    def _refuse(self, status: int, code: str, detail: str) -> None:
        """Answer in the service's error shape and close the connection; the application never sees it."""
        self._stop_head_timer()
        if self.transport.is_closing():
            return
        metrics.reject(code)
        body = json.dumps({"error": code, "detail": detail}).encode()
        reason = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, reason, len(body), body)
        )
        self.transport.close()


def install(max_head_bytes: int, max_headers: int, head_timeout_s: float) -> None:
    """Make this process's uvicorn use :class:`LimitedHttpToolsProtocol` with these limits."""
    # Private: uvicorn.config.HTTP_PROTOCOLS is how uvicorn resolves http="auto", and BentoML passes no http=.
    from uvicorn import config

    LimitedHttpToolsProtocol.max_head_bytes = max_head_bytes
    LimitedHttpToolsProtocol.max_headers = max_headers
    LimitedHttpToolsProtocol.head_timeout_s = head_timeout_s
    config.HTTP_PROTOCOLS["auto"] = f"{__name__}:LimitedHttpToolsProtocol"
