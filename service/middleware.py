"""ASGI middlewares in front of the API, one job each, in the order a request meets them:

1. :class:`KeepAliveLimit`: closes a keep-alive connection after N requests (as nginx does), so long-lived
   connections also reach pods started later, and while this worker holds more than its share of the
   connections (``service/balance.py``), so they spread evenly over the API workers.
2. :class:`ErrorShape`: brings error bodies BentoML or Starlette produce (validation errors, 404, 405, the
   rare 500) into the one shape, ``{"error": code, "detail": what to do}``.
3. :class:`ApiKeyAuth`: with an API key set, refuses requests to the protected paths without it (401).
4. :class:`UploadReceiver`: reads the whole body within a size and a time bound (413, 408) and parses the
   upload (:mod:`service.parse`), before the request takes a processing slot: a slow client holds a
   connection, never a slot a complete request could use.
5. :class:`ConcurrencyLimit`: at most N requests per worker being processed; beyond that 503 + Retry-After.
6. :class:`Deadline`: a request not answered within the time limit gets 504.
7. :class:`DirectRoute`: the parsed upload handed straight to the API's handler. Past this point BentoML would
   set up its request context, route the request and read the upload again through its IO descriptor, work
   nothing in this service uses; its own routes stay, for the OpenAPI page and anything this one does not take.

Every refusal is an :class:`~imgcls.errors.ApiError` answered by :func:`service.answers.error_response`.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import typing as t
from base64 import b64decode
from collections.abc import Callable, Collection, Mapping

from imgcls.errors import ApiError
from service import balance, metrics
from service.answers import error_response
from service.parse import UPLOAD_KEY, Upload, UploadSpec, parse_upload

log = logging.getLogger(__name__)

Scope = t.MutableMapping[str, t.Any]
Message = t.MutableMapping[str, t.Any]
Receive = t.Callable[[], t.Awaitable[Message]]
Send = t.Callable[[Message], t.Awaitable[None]]
ASGIApp = t.Callable[[Scope, Receive, Send], t.Awaitable[None]]
Handler = t.Callable[[Upload], t.Awaitable[ASGIApp]]

#: Probes and metrics keep BentoML's own answers (plain, cheap, what Kubernetes and Prometheus expect).
PROBE_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})


async def _answer(err: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(err)(scope, receive, send)


def _path(scope: Scope) -> str:
    return scope["path"].rstrip("/") or "/"


class KeepAliveLimit:
    """``Connection: close`` on the ``max_requests``-th response of a connection (0: no limit), and on one response
    every ``balance.CLOSE_INTERVAL_S`` while this worker holds more than its share of the connections."""

    def __init__(self, app: ASGIApp, max_requests: int):
        self.app, self.max_requests = app, max_requests
        self._served: collections.OrderedDict[tuple, int] = collections.OrderedDict()  # per client (host, port)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("client"):
            return await self.app(scope, receive, send)
        census = balance.CENSUS
        if not self._last_request(tuple(scope["client"])) and not (census is not None and census.close_one()):
            return await self.app(scope, receive, send)

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)

    def _last_request(self, client: tuple) -> bool:
        """Whether this is the ``max_requests``-th request of the connection from ``client`` (host, port)."""
        if not self.max_requests:
            return False
        served = self._served.pop(client, 0) + 1
        if served >= self.max_requests:
            return True
        self._served[client] = served
        if len(self._served) > 4096:  # connections the clients closed themselves are never seen again
            self._served.popitem(last=False)
        return False


#: Codes and details for statuses that reach :class:`ErrorShape` in another shape.
STATUS_CODES = {
    400: ("invalid_request", "The request could not be read; see /docs for the expected fields."),
    401: ("unauthorized", "This endpoint needs the API key; send it as `Authorization: Bearer KEY`."),
    404: ("not_found", "No such endpoint; see /docs for the API (POST /classify, POST /classify_batch)."),
    405: ("method_not_allowed", "Use POST with multipart/form-data; see /docs."),
    413: ("body_too_large", "The request body is too large; send a smaller image."),
    415: ("unsupported_media_type", "Send multipart/form-data; see /docs."),
    429: ("overloaded", "The server is busy; retry after the number of seconds in Retry-After."),
    500: ("internal_error", "The server failed to handle this request; it is logged. Retry, or report it."),
    503: ("overloaded", "The server is busy; retry after the number of seconds in Retry-After."),
    504: ("timeout", "The request took too long to process; retry later."),
}


def _validation_detail(errors: list[t.Any]) -> tuple[str, str]:
    """Code and detail for a pydantic error list from BentoML's input validation."""
    missing = [str(e["loc"][-1]) for e in errors if isinstance(e, dict) and e.get("type") == "missing" and e.get("loc")]
    if missing:
        names = ", ".join(f"`{m}`" for m in missing)
        return "missing_field", f"Required field {names} is missing; send it as a multipart/form-data field."
    parts = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in errors[:5] if isinstance(e, dict)]
    return "invalid_request", "Invalid request: " + ("; ".join(parts) or "invalid input") + ". See /docs."


def reshape(status: int, raw: bytes, retry_after: int) -> ApiError:
    """The error, in our terms, of an error response BentoML or Starlette produced."""
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
    return ApiError(status, code, detail, retry_after=retry_after if status in (429, 503) else None)


def _is_our_shape(body: t.Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("detail"), str)


class ErrorShape:
    """Error responses of other shapes, on every path but the probes, rewritten into ours (and counted)."""

    def __init__(self, app: ASGIApp, retry_after_s: int = 1, exclude: Collection[str] = PROBE_PATHS):
        self.app, self.retry_after_s, self.exclude = app, retry_after_s, frozenset(exclude)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _path(scope) in self.exclude:
            return await self.app(scope, receive, send)
        held: Message | None = None
        chunks: list[bytes] = []

        async def send_reshaping(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                if message["status"] < 400:
                    return await send(message)
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                await self._send_error(scope, held, b"".join(chunks), send)

        await self.app(scope, receive, send_reshaping)

    async def _send_error(self, scope: Scope, start: Message, raw: bytes, send: Send) -> None:
        status = start["status"]
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        body: t.Any = None
        if dict(headers).get(b"content-type", b"").startswith(b"application/json"):
            try:
                body = json.loads(raw)
            except ValueError:
                pass
        if not _is_our_shape(body):
            err = reshape(status, raw, self.retry_after_s)
            metrics.reject(err.code)
            if status >= 500:
                log.warning("%s %s answered %d: %s", scope["method"], scope["path"], status, raw[:500])
            raw = json.dumps(err.body()).encode()
            headers = [(k, v) for k, v in headers if k.lower() != b"content-type"]
            headers.append((b"content-type", b"application/json"))
            if err.retry_after is not None:
                headers.append((b"retry-after", str(err.retry_after).encode()))
        headers.append((b"content-length", str(len(raw)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": raw, "more_body": False})


def presented_key(headers: Mapping[bytes, bytes]) -> str | None:
    """The API key a request carries: ``Authorization: Bearer KEY``, ``X-API-Key: KEY`` or Basic with KEY as
    the password (what a browser sends after its login prompt)."""
    if b"x-api-key" in headers:
        return headers[b"x-api-key"].decode("latin-1").strip()
    scheme, _, value = headers.get(b"authorization", b"").decode("latin-1").strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except ValueError:
            return None
    return None


class ApiKeyAuth:
    """401 for the ``paths`` (exact, or below a path ending in ``/``) unless the request carries ``key``."""

    def __init__(self, app: ASGIApp, key: str, paths: Collection[str]):
        self.app, self.key, self.paths = app, key.encode(), tuple(paths)

    def _protected(self, path: str) -> bool:
        return any(path == p.rstrip("/") or (p.endswith("/") and path.startswith(p)) for p in self.paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.key or not self._protected(scope["path"].rstrip("/") or "/"):
            return await self.app(scope, receive, send)
        key = presented_key(dict(scope["headers"]))
        if key is not None and hmac.compare_digest(key.encode(), self.key):
            return await self.app(scope, receive, send)
        detail = (
            "This endpoint needs the API key (IMGCLS_API_KEY on the server): send `Authorization: Bearer KEY` or "
            "`X-API-Key: KEY`." + (" The key sent is wrong." if key else "")
        )
        err = error_response(ApiError(401, "unauthorized", detail))
        err.headers["WWW-Authenticate"] = 'Basic realm="image classifier", charset="UTF-8"'
        await err(scope, receive, send)


class UploadReceiver:
    """Reads and parses the upload of a POST to an API path before anything else runs for it.

    The body must arrive within ``timeout_s`` (408) and hold at most ``max_body_bytes`` (413, from
    ``Content-Length`` before reading when there is one). All bodies being received by this worker together
    stay within ``buffer_bytes`` (503 beyond), so many slow clients cannot exhaust memory. The parsed
    :class:`~service.parse.Upload` is handed on in the scope.
    """

    def __init__(
        self,
        app: ASGIApp,
        specs: Mapping[str, UploadSpec],
        max_body_bytes: int,
        timeout_s: float,
        buffer_bytes: int,
        retry_after_s: int = 1,
    ):
        self.app, self.specs = app, dict(specs)
        self.max_body_bytes, self.timeout_s, self.buffer_bytes = max_body_bytes, timeout_s, buffer_bytes
        self.retry_after_s = retry_after_s
        self.buffered = 0  # bytes reserved by bodies being received now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        spec = self.specs.get(_path(scope)) if scope["type"] == "http" else None
        if spec is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            body = await self._read_body(scope, receive)
            scope[UPLOAD_KEY] = await parse_upload(spec, scope, body)
        except ApiError as err:
            return await _answer(err, scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # http.disconnect when the client goes away
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.max_body_bytes
        too_large = ApiError(
            413,
            "body_too_large",
            f"The request body is larger than the {limit} byte limit (IMGCLS_MAX_BODY_BYTES); "
            "send fewer or smaller images per request.",
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "invalid_request", "The Content-Length header is not a number.")
            if int(length) > limit:
                raise too_large
        reserved = int(length) if length is not None else 0
        if self.buffered + reserved > self.buffer_bytes:
            raise ApiError(
                503,
                "overloaded",
                "This worker is receiving too many uploads at once; retry after the number of seconds in Retry-After.",
                retry_after=self.retry_after_s,
            )
        self.buffered += reserved
        chunks, total = [], 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        raise ApiError(400, "client_disconnected", "The client disconnected during the upload.")
                    chunk = message.get("body", b"")
                    total += len(chunk)
                    if total > limit:
                        raise too_large
                    if total > reserved:  # a body without Content-Length reserves as it arrives
                        self.buffered += total - reserved
                        reserved = total
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise ApiError(
                408,
                "body_timeout",
                f"The request body did not arrive within {self.timeout_s:g} s (IMGCLS_BODY_TIMEOUT_S); "
                "check the connection, or send smaller uploads.",
            ) from None
        finally:
            self.buffered -= reserved


class ConcurrencyLimit:
    """At most ``max_concurrency`` requests to ``paths`` processed at once by this worker; 503 beyond.

    ``on_change(delta)`` sees every change of the count (the in-flight gauge the autoscaler reads).
    """

    def __init__(
        self,
        app: ASGIApp,
        paths: Collection[str],
        max_concurrency: int,
        retry_after_s: int = 1,
        on_change: Callable[[int], None] = lambda _: None,
    ):
        self.app, self.paths = app, frozenset(paths)
        self.max_concurrency, self.retry_after_s, self.on_change = max_concurrency, retry_after_s, on_change
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or _path(scope) not in self.paths:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_concurrency:
            detail = (
                f"This worker already processes {self.in_flight} requests (IMGCLS_MAX_CONCURRENCY); "
                f"retry in {self.retry_after_s} s or lower the request rate."
            )
            return await _answer(ApiError(503, "overloaded", detail, self.retry_after_s), scope, receive, send)
        self.in_flight += 1
        self.on_change(1)
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.on_change(-1)


class Deadline:
    """504 for a request to ``paths`` not answered within ``timeout_s``."""

    def __init__(self, app: ASGIApp, paths: Collection[str], timeout_s: float):
        self.app, self.paths, self.timeout_s = app, frozenset(paths), timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _path(scope) not in self.paths:
            return await self.app(scope, receive, send)
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            async with asyncio.timeout(self.timeout_s):  # unlike wait_for, no task per request
                await self.app(scope, receive, tracking)
        except TimeoutError:
            if started:  # too late for a clean error response; the client sees a cut connection
                raise
            detail = f"The request was not processed within {self.timeout_s:g} s (IMGCLS_TIMEOUT_S); retry later."
            await _answer(ApiError(504, "timeout", detail), scope, receive, send)


class DirectRoute:
    """``POST`` to one of ``handlers``' paths, with its upload parsed (:class:`UploadReceiver`), answered with the
    response ``handlers[path](upload)`` returns."""

    def __init__(self, app: ASGIApp, handlers: Mapping[str, Handler]):
        self.app, self.handlers = app, dict(handlers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        upload = scope.get(UPLOAD_KEY) if scope["type"] == "http" else None
        handler = self.handlers.get(_path(scope)) if upload is not None else None
        if handler is None:
            return await self.app(scope, receive, send)
        response = await handler(upload)
        await response(scope, receive, send)
