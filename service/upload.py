"""The uploads of ``/classify`` and ``/classify_batch``: the request body received within bounds, then parsed.

The two IO descriptors are what BentoML documents on ``/docs`` and calls for each request: their
``from_http_request`` receives the body and hands the API method the image files' bytes, ``top_k`` and the
traffic ``source``. BentoML's own parser would answer 500 for a malformed multipart body, spool files to disk and
fetch URLs given in place of a file; this one keeps the bytes in memory (bounded) and refuses every problem with
an :class:`~imgcls.errors.ApiError` (4xx) that names what to send instead.

Receiving happens before the request is admitted (``service/admission.py``): a slow client holds a connection,
never a slot a complete request could use. The body must arrive within ``IMGCLS_BODY_TIMEOUT_S`` (408) and hold
at most ``IMGCLS_MAX_BODY_BYTES`` (413, from ``Content-Length`` before reading when there is one). The bodies a
worker is receiving share a memory budget (:class:`BodyBudget`), counted in bytes that have arrived, not bytes
announced, so headers that promise large bodies reserve nothing.
"""

from __future__ import annotations

import asyncio
import pathlib
import typing as t
from dataclasses import dataclass

import bentoml
from pydantic import Field
from starlette.datastructures import Headers, QueryParams, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from imgcls.errors import ApiError, size_text
from imgcls.inference_log import PRODUCTION
from imgcls.preprocess import ACCEPTED_NAMES
from service.settings import SOURCE_NAME, Settings

if t.TYPE_CHECKING:
    from starlette.requests import Request

DEFAULT_TOP_K = 5
#: A worker receives up to this many largest bodies at once (IMGCLS_MAX_BODY_BYTES each) before it shares out.
BUDGET_BODIES = 8
#: The text fields of an upload besides its files.
FIELDS = ("top_k", "source")
SOURCE_HELP = (
    "Who sends this request, recorded in the inference log: production, or one of the other names the server "
    "allows (IMGCLS_TRAFFIC_SOURCES, e.g. loadtest), which the drift job leaves out. The header X-Traffic-Source "
    "sets it too."
)


@dataclass(frozen=True)
class UploadLimits:
    """What one endpoint accepts: the file field's name, how many files and how large, how many labels, which
    traffic sources, and whether the body may be the image itself."""

    field: str
    max_files: int
    max_image_bytes: int
    max_body_bytes: int
    body_timeout_s: float
    sources: frozenset[str] = frozenset({PRODUCTION})
    raw_body: bool = False  # the body may be the image itself (Content-Type image/* or octet-stream)


class BodyBudget:
    """The bytes of the request bodies this worker is receiving, within ``budget`` (503 beyond).

    A body is counted as it arrives. When the total would pass the budget, the body that is adding bytes is refused
    only if it already holds more than an even share of the budget among the bodies being received, so that a few
    huge or slow bodies cannot refuse everyone else's photos (the total stays under twice the budget).
    """

    def __init__(self, budget: int, retry_after_s: int = 1):
        self.budget, self.retry_after_s = budget, retry_after_s
        self.used = 0
        self.receiving = 0

    def add(self, held: int, more: int) -> None:
        """Count ``more`` bytes for a body already holding ``held``; ApiError 503 when it is over its share."""
        if self.used + more > self.budget and held + more > self.budget // max(1, self.receiving):
            raise ApiError(
                503,
                "overloaded",
                f"This worker is receiving more upload data than it has room for ({size_text(self.budget)}); "
                "retry after the number of seconds in Retry-After.",
                retry_after=self.retry_after_s,
            )
        self.used += more


async def receive_body(request: Request, limits: UploadLimits, budget: BodyBudget) -> bytes:
    """The whole body of ``request`` within the limits (413, 408) and the worker's budget (503)."""
    too_large = ApiError(
        413,
        "body_too_large",
        f"The request body is larger than {size_text(limits.max_body_bytes)} (IMGCLS_MAX_BODY_BYTES); "
        "send fewer or smaller images per request.",
    )
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "invalid_request", "The Content-Length header is not a number.")
        if int(length) > limits.max_body_bytes:
            raise too_large
    chunks: list[bytes] = []
    held = 0
    budget.receiving += 1
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in request.stream():
                if held + len(chunk) > limits.max_body_bytes:
                    raise too_large
                budget.add(held, len(chunk))
                held += len(chunk)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            408,
            "body_timeout",
            f"The request body did not arrive within {limits.body_timeout_s:g} s (IMGCLS_BODY_TIMEOUT_S); "
            "check the connection, or send smaller uploads.",
        ) from None
    except OSError:  # starlette's ClientDisconnect
        raise ApiError(400, "client_disconnected", "The client disconnected during the upload.") from None
    finally:
        budget.receiving -= 1
        budget.used -= held
    return b"".join(chunks)


class _InMemoryParser(MultiPartParser):
    # Uploads are already capped by IMGCLS_MAX_BODY_BYTES, so keep them in memory instead of spilling to disk.
    spool_max_size = 1 << 30


def _hint(limits: UploadLimits, headers: Headers, path: str) -> str:
    host = headers.get("host", "HOST:PORT")
    example = f"curl -F {limits.field}=@photo.jpg http://{host}{path}"
    if limits.raw_body:
        example += f", or the image itself as the body with Content-Type image/jpeg (curl --data-binary @photo.jpg " \
                   f"-H 'Content-Type: image/jpeg' http://{host}{path})"  # fmt: skip
    return f"e.g. {example}"


def is_raw_image(content_type: str) -> bool:
    """A body that is the image itself (``image/*`` or ``application/octet-stream``) rather than a form."""
    kind = content_type.split(";")[0].strip().lower()
    return kind.startswith("image/") or kind == "application/octet-stream"


def traffic_source(raw: str | None, allowed: frozenset[str] = frozenset({PRODUCTION})) -> str:
    """Who sent a request (form field ``source`` or header ``X-Traffic-Source``; ``production`` when neither);
    400 when it is not one of the ``allowed`` names."""
    if raw is None or not raw.strip():
        return PRODUCTION
    value = raw.strip().lower()
    if value not in allowed:
        shown = ", ".join(sorted(allowed))
        what = "is not one this server accepts" if SOURCE_NAME.match(value) else "is not a short name"
        raise ApiError(
            400,
            "invalid_traffic_source",
            f"Traffic source {raw[:40]!r} {what}: send one of {shown} (IMGCLS_TRAFFIC_SOURCES), or leave it out "
            "for production traffic.",
        )
    return value


def parse_top_k(raw: str | None) -> int:
    """``top_k`` from the form or the query string, default 5; ApiError when it is not a positive integer."""
    if raw is None or raw.strip() == "":
        return DEFAULT_TOP_K
    try:
        value = int(raw.strip().strip('"'))
    except ValueError:
        value = 0
    if value < 1:
        raise ApiError(400, "invalid_top_k", f"top_k must be a positive integer, got {raw[:40]!r}.")
    return value


def _check_size(limits: UploadLimits, data: bytes, index: int) -> None:
    if len(data) > limits.max_image_bytes:
        raise ApiError(
            413,
            "image_too_large",
            f"File {index + 1} is {size_text(len(data))}; each image may be at most "
            f"{size_text(limits.max_image_bytes)} (IMGCLS_MAX_IMAGE_BYTES). Send a smaller file (a JPEG of the "
            "photo, for example).",
        )


def _files_text(n: int) -> str:
    return f"{n} file" + ("" if n == 1 else "s")


@dataclass(frozen=True)
class Upload:
    """A parsed request: the image files, ``top_k`` and the traffic source."""

    files: list[bytes]
    top_k: int
    source: str


async def parse_upload(limits: UploadLimits, headers: Headers, query: bytes, path: str, body: bytes) -> Upload:
    """The files and fields of a request body (``query``: the raw query string); ApiError (4xx) for anything
    unusable."""
    content_type = headers.get("content-type", "")
    if limits.raw_body and is_raw_image(content_type):
        _check_size(limits, body, 0)
        source = traffic_source(headers.get("x-traffic-source"), limits.sources)
        return Upload([body], parse_top_k(QueryParams(query).get("top_k") if query else None), source)
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(
            400,
            "not_multipart",
            f"Expected a multipart/form-data upload with a file field `{limits.field}` but got Content-Type "
            f"{content_type[:80] or '(none)'!r}; {_hint(limits, headers, path)}.",
        )

    async def stream() -> t.AsyncGenerator[bytes, None]:
        yield body

    # Room for one file more than allowed (to tell "too many" from the count), and for top_k and source sent as file
    # parts, as Swagger UI sends a field whose schema has an encoding.
    parser = _InMemoryParser(headers, stream(), max_files=limits.max_files + 3, max_fields=16, max_part_size=64 << 10)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "too many files" in exc.message.lower():
            raise ApiError(
                413,
                "too_many_files",
                f"At most {_files_text(limits.max_files)} per request (IMGCLS_MAX_FILES); split the request.",
            ) from None
        raise ApiError(
            400,
            "invalid_multipart",
            f"The multipart body is malformed ({exc.message}); {_hint(limits, headers, path)}.",
        ) from None
    except (ValueError, KeyError, UnicodeDecodeError) as exc:  # python-multipart rejects some garbage this way
        raise ApiError(
            400, "invalid_multipart", f"The multipart body is malformed ({exc}); {_hint(limits, headers, path)}."
        ) from None
    files: list[bytes] = []
    fields: dict[str, str] = {}
    others: list[str] = []
    try:
        for key, value in form.multi_items():
            if key == limits.field and isinstance(value, UploadFile):
                files.append(await value.read())
                _check_size(limits, files[-1], len(files) - 1)
            elif key in FIELDS and isinstance(value, UploadFile) and (value.size or 0) <= 64:
                fields[key] = (await value.read()).decode("utf-8", "replace")
            elif key == limits.field:
                raise ApiError(
                    400,
                    "not_a_file",
                    f"Field `{limits.field}` must be a file part (with a filename), not a text value; "
                    f"{_hint(limits, headers, path)}.",
                )
            elif isinstance(value, str):
                fields[key] = value
            else:
                others.append(key)
    finally:
        await form.close()
    if not files:
        sent = sorted(set(others) | (set(fields) - set(FIELDS)))
        named = f" (the request has {', '.join(f'`{k}`' for k in sent)} instead)" if sent else ""
        raise ApiError(
            400,
            "missing_field",
            f"Required file field `{limits.field}` is missing{named}; {_hint(limits, headers, path)}.",
        )
    if len(files) > limits.max_files:
        raise ApiError(
            413,
            "too_many_files",
            f"{_files_text(len(files))} sent; at most {limits.max_files} per request (IMGCLS_MAX_FILES).",
        )
    top_k = parse_top_k(fields.get("top_k", QueryParams(query).get("top_k") if query else None))
    source = traffic_source(fields.get("source", headers.get("x-traffic-source")), limits.sources)
    return Upload(files, top_k, source)


class _Receiving:
    """The limits and budget of the running server's endpoints (set by :func:`configure`)."""

    limits: t.ClassVar[dict[str, UploadLimits]] = {}
    budget: t.ClassVar[BodyBudget] = BodyBudget(1 << 30)


def configure(settings: Settings) -> None:
    """The limits of each endpoint and the worker's body budget, from the service's settings."""

    def limits(field: str, max_files: int, raw_body: bool = False) -> UploadLimits:
        return UploadLimits(
            field, max_files, settings.max_image_bytes, settings.max_body_bytes, settings.body_timeout_s,
            settings.sources, raw_body,
        )  # fmt: skip

    _Receiving.limits = {"ImageUpload": limits("image", 1, raw_body=True),
                         "ImageBatchUpload": limits("images", settings.max_files)}  # fmt: skip
    _Receiving.budget = BodyBudget(BUDGET_BODIES * settings.max_body_bytes, settings.retry_after_s)


async def _upload(cls: type, request: Request) -> Upload:
    limits = _Receiving.limits[cls.__name__]
    body = await receive_body(request, limits, _Receiving.budget)
    scope = request.scope
    return await parse_upload(limits, request.headers, scope.get("query_string", b""), scope["path"], body)


class ImageUpload(bentoml.IODescriptor):
    """``POST /classify``: one image file and how many labels to return.

    Besides multipart, the body may be the image itself (``Content-Type: image/*``), ``top_k`` then in the query.
    """

    image: pathlib.Path = Field(description=f"The photo: {ACCEPTED_NAMES}.")
    top_k: int = Field(default=DEFAULT_TOP_K, ge=1, description="How many of the most likely labels to return.")
    source: str = Field(default=PRODUCTION, description=SOURCE_HELP)

    @classmethod
    async def from_http_request(cls, request: Request, serde: t.Any) -> ImageUpload:
        """The API method gets the file's bytes, ``top_k`` and ``source``."""
        upload = await _upload(cls, request)
        return cls.model_construct(image=upload.files[0], top_k=upload.top_k, source=upload.source)


class ImageBatchUpload(bentoml.IODescriptor):
    """``POST /classify_batch``: several image files (field ``images``), classified in order."""

    images: list[pathlib.Path] = Field(description="The photos, in the order the results should come back.")
    top_k: int = Field(default=DEFAULT_TOP_K, ge=1, description="How many of the most likely labels per image.")
    source: str = Field(default=PRODUCTION, description=SOURCE_HELP)

    @classmethod
    async def from_http_request(cls, request: Request, serde: t.Any) -> ImageBatchUpload:
        """The API method gets the files' bytes, ``top_k`` and ``source``."""
        upload = await _upload(cls, request)
        return cls.model_construct(images=upload.files, top_k=upload.top_k, source=upload.source)
