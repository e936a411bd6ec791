"""Error responses and the request guard: every refusal is JSON ``{"error": code, "detail": what to do}``.

:class:`RequestGuard` is an ASGI middleware in front of the API routes that refuses what should
never reach the handlers, cheaply and early: bodies over the size limit (from ``Content-Length``,
before reading them), more requests in flight than a worker should hold (503 + ``Retry-After``)
and requests that run past the time limit (504). It also rewrites BentoML's own error bodies
(validation errors, 404/405, the rare 500) into the same shape, so clients parse one format.

It also closes a keep-alive connection after ``keepalive_requests`` requests (as nginx does). The
API workers share one listening socket and the first to wake accepts every connection waiting, so
a client opening a few connections at once (a proxy, a pool, Locust) can land them all on one
worker while the others idle: seen on the 2-core box, 8 connections on one of two workers and about
510 instead of 690 req/s (demo model). The client reconnects and the least busy worker, first to
wake, takes the connection.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import typing as t

from starlette.responses import JSONResponse

from service import metrics

log = logging.getLogger(__name__)

Scope = t.MutableMapping[str, t.Any]
Message = t.MutableMapping[str, t.Any]
Receive = t.Callable[[], t.Awaitable[Message]]
Send = t.Callable[[Message], t.Awaitable[None]]
ASGIApp = t.Callable[[Scope, Receive, Send], t.Awaitable[None]]

#: Codes for statuses that reach the guard in another shape (BentoML's or Starlette's own errors).
STATUS_CODES = {
    400: ("invalid_request", "The request could not be read; send multipart/form-data with a file field `image`."),
    404: ("not_found", "No such endpoint; see /docs for the API (POST /classify, POST /classify_batch)."),
    405: ("method_not_allowed", "Use POST with multipart/form-data; see /docs."),
    413: ("body_too_large", "The request body is too large; send a smaller image."),
    415: ("unsupported_media_type", "Send multipart/form-data with a file field `image`."),
    429: ("overloaded", "The server is busy; retry after the number of seconds in Retry-After."),
    500: ("internal_error", "The server failed to handle this request; it is logged. Retry, or report it."),
    503: ("overloaded", "The server is busy; retry after the number of seconds in Retry-After."),
    504: ("timeout", "The request took too long to process; retry later."),
}


def error_body(code: str, detail: str) -> dict[str, str]:
    """The one error shape."""
    return {"error": code, "detail": detail}


def error_response(status: int, code: str, detail: str, retry_after: int | None = None) -> JSONResponse:
    """A JSON error response; counts the refusal in ``imgcls_rejected_total{reason=code}``."""
    metrics.reject(code)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(error_body(code, detail), status_code=status, headers=headers)


def _is_our_shape(body: t.Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("detail"), str)


def _validation_detail(errors: list[t.Any]) -> tuple[str, str]:
    """Code and detail for a pydantic error list from BentoML's input validation."""
    missing = [str(e["loc"][-1]) for e in errors if isinstance(e, dict) and e.get("type") == "missing" and e.get("loc")]
    if missing:
        names = ", ".join(f"`{m}`" for m in missing)
        return "missing_field", f"Required field {names} is missing; send it as a multipart/form-data field."
    parts = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in errors[:5] if isinstance(e, dict)] or [
        "invalid input"
    ]
    return "invalid_request", "Invalid request: " + "; ".join(parts) + ". See /docs for the expected fields."


def rewrite(status: int, raw: bytes, retry_after: int) -> tuple[dict[str, str], dict[str, str]]:
    """Our error body (and extra headers) for an error response produced by BentoML or Starlette."""
    code, detail = STATUS_CODES.get(status, (f"http_{status}", f"The request failed with HTTP status {status}."))
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    if isinstance(body, list) and len(body) == 1:  # BentoMLException bodies come as [{"error": ...}]
        body = body[0]
    if isinstance(body, dict):
        if status == 400 and isinstance(body.get("detail"), list):
            code, detail = _validation_detail(body["detail"])
        elif status < 500 and isinstance(body.get("error"), str):
            detail = f"{body['error']}. {detail}"
    extra = {"Retry-After": str(retry_after)} if status in (429, 503) else {}
    return error_body(code, detail), extra


class RequestGuard:
    """ASGI middleware for the API routes: size limit, concurrency limit, timeout, one error shape."""

    def __init__(
        self,
        app: ASGIApp,
        paths: t.Collection[str],
        max_body_bytes: int,
        max_concurrency: int,
        timeout_s: float,
        retry_after_s: int = 1,
        keepalive_requests: int = 0,
    ):
        self.app, self.paths = app, frozenset(paths)
        self.max_body_bytes, self.max_concurrency = max_body_bytes, max_concurrency
        self.timeout_s, self.retry_after_s = timeout_s, retry_after_s
        self.keepalive_requests = keepalive_requests
        self.in_flight = 0
        self._served: collections.OrderedDict[tuple, int] = collections.OrderedDict()  # per client (host, port)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") not in self.paths:
            return await self.app(scope, receive, send)
        if self._last_on_connection(scope):
            send = _closing_connection(send)
        if scope["method"] != "POST":
            return await self._rewriting(scope, receive, send)
        refusal, receive = await self._check_body(scope, receive)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if self.in_flight >= self.max_concurrency:
            detail = (
                f"This worker already handles {self.in_flight} requests (IMGCLS_MAX_CONCURRENCY); "
                f"retry in {self.retry_after_s} s or lower the request rate."
            )
            resp = error_response(503, "overloaded", detail, retry_after=self.retry_after_s)
            return await resp(scope, receive, send)
        self.in_flight += 1
        try:
            await self._with_timeout(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _last_on_connection(self, scope: Scope) -> bool:
        """Count the request on its connection; True when it is to be the connection's last."""
        client = scope.get("client")
        if not self.keepalive_requests or not client:
            return False
        key = tuple(client)
        served = self._served.pop(key, 0) + 1
        if served >= self.keepalive_requests:
            return True
        self._served[key] = served
        if len(self._served) > 4096:  # connections the clients closed themselves are never seen again
            self._served.popitem(last=False)
        return False

    async def _check_body(self, scope: Scope, receive: Receive) -> tuple[JSONResponse | None, Receive]:
        """Refuse an oversized body from its Content-Length; buffer (bounded) a body that has none."""
        headers = dict(scope["headers"])
        limit = self.max_body_bytes
        too_large = (
            f"The request body is larger than the {limit} byte limit (IMGCLS_MAX_BODY_BYTES); "
            "send a smaller image or raise the limit."
        )
        length = headers.get(b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return error_response(400, "invalid_request", "The Content-Length header is not a number."), receive
            if size > limit:
                return error_response(413, "body_too_large", too_large), receive
            return None, receive
        # Chunked upload: read at most limit + 1 bytes, then replay what was read to the application.
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return error_response(400, "invalid_request", "The client disconnected during the upload."), receive
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                return error_response(413, "body_too_large", too_large), receive
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # http.disconnect when the client goes away
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return None, replay

    async def _with_timeout(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            async with asyncio.timeout(self.timeout_s):  # unlike wait_for, no task per request
                await self._rewriting(scope, receive, send_tracking)
        except TimeoutError:
            if started:  # too late for a clean error response; the client sees a cut connection
                raise
            detail = f"The request was not processed within {self.timeout_s:g} s (IMGCLS_TIMEOUT_S); retry later."
            await error_response(504, "timeout", detail)(scope, receive, send)

    async def _rewriting(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass successes straight through; bring error bodies of other shapes into ours."""
        held: Message | None = None
        chunks: list[bytes] = []

        async def send_rewriting(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                if message["status"] < 400:
                    return await send(message)
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            await send_error(held, b"".join(chunks))

        async def send_error(start: Message, raw: bytes) -> None:
            status = start["status"]
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            content_type = dict(headers).get(b"content-type", b"")
            body: t.Any = None
            if content_type.startswith(b"application/json"):
                try:
                    body = json.loads(raw)
                except ValueError:
                    pass
            if not _is_our_shape(body):
                new, extra = rewrite(status, raw, self.retry_after_s)
                metrics.reject(new["error"])
                if status >= 500:
                    log.warning("%s %s answered %d: %s", scope["method"], scope["path"], status, raw[:500])
                raw = json.dumps(new).encode()
                headers = [(k, v) for k, v in headers if k.lower() != b"content-type"]
                headers += [(b"content-type", b"application/json")]
                headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
            headers.append((b"content-length", str(len(raw)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": raw, "more_body": False})

        await self.app(scope, receive, send_rewriting)


def _closing_connection(send: Send) -> Send:
    """``send`` with ``Connection: close`` added to the response, so the server closes the connection after it."""

    async def closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await send(message)

    return closing
