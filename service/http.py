"""The HTTP edge around the API methods: the one error response, the API key, and error bodies of other shapes.

:func:`error_response` turns an :class:`~imgcls.errors.ApiError` into the response every refusal gets,
``{"error": code, "detail": what to do}`` (with ``Retry-After`` where the client should come back), counted by
its code. Two ASGI middlewares, added to the service in this order:

1. :class:`ErrorShape`: brings error bodies that Starlette or BentoML produce themselves (404, 405, a validation
   error, the rare 500) into that shape.
2. :class:`ApiKeyAuth`: with an API key set, refuses requests to the protected paths without it (401), before
   their body is read.
"""

from __future__ import annotations

import hmac
import json
import logging
import typing as t
from base64 import b64decode
from collections.abc import Collection, Mapping

from starlette.responses import JSONResponse

from imgcls.errors import ApiError
from service import metrics

log = logging.getLogger(__name__)

Scope = t.MutableMapping[str, t.Any]
Message = t.MutableMapping[str, t.Any]
Receive = t.Callable[[], t.Awaitable[Message]]
Send = t.Callable[[Message], t.Awaitable[None]]
ASGIApp = t.Callable[[Scope, Receive, Send], t.Awaitable[None]]

#: Probes and metrics keep BentoML's own answers (plain, cheap, what Kubernetes and Prometheus expect).
PROBE_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})


def error_response(err: ApiError) -> JSONResponse:
    """The JSON error response for ``err`` (with Retry-After when it has one); counted by its code."""
    metrics.reject(err.code)
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


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


def validation_detail(errors: list[t.Any]) -> tuple[str, str]:
    """Code and detail for a pydantic error list from BentoML's input validation."""
    missing = [str(e["loc"][-1]) for e in errors if isinstance(e, dict) and e.get("type") == "missing" and e.get("loc")]
    if missing:
        names = ", ".join(f"`{m}`" for m in missing)
        return "missing_field", f"Required field {names} is missing; see /docs for what to send."
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
            code, detail = validation_detail(body["detail"])
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
        if scope["type"] != "http" or (scope["path"].rstrip("/") or "/") in self.exclude:
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

    def allows(self, headers: Mapping[bytes, bytes]) -> bool:
        """Whether these request headers carry the key (always, when no key is set)."""
        key = presented_key(headers)
        return not self.key or (key is not None and hmac.compare_digest(key.encode(), self.key))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.key or not self._protected(scope["path"].rstrip("/") or "/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.allows(headers):
            return await self.app(scope, receive, send)
        detail = (
            "This endpoint needs the API key (IMGCLS_API_KEY on the server): send `Authorization: Bearer KEY` or "
            "`X-API-Key: KEY`." + (" The key sent is wrong." if presented_key(headers) else "")
        )
        err = error_response(ApiError(401, "unauthorized", detail))
        err.headers["WWW-Authenticate"] = 'Basic realm="image classifier", charset="UTF-8"'
        await err(scope, receive, send)
