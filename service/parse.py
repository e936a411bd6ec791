"""Parsing the uploads of ``/classify`` and ``/classify_batch``: the request body to image files and ``top_k``.

:class:`~service.middleware.UploadReceiver` reads the body and calls :func:`parse_upload`; every problem is an
:class:`~imgcls.errors.ApiError` (4xx) that names what to send instead. Files stay in memory as bytes (they
are bounded by ``IMGCLS_MAX_IMAGE_BYTES`` each and ``IMGCLS_MAX_BODY_BYTES`` together).

The BentoML IO specs below declare the fields BentoML shows on its OpenAPI page and uses in
``bentoml.SyncHTTPClient`` (``image: Path``, ``top_k: int``; ``images: list[Path]``), and hand the API
method the parsed files. BentoML's own parser would answer 500 for a malformed multipart body and can fetch
URLs given in place of a file.
"""

from __future__ import annotations

import pathlib
import re
import typing as t
from dataclasses import dataclass

import bentoml
from pydantic import Field
from starlette.datastructures import Headers, QueryParams, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from imgcls.errors import ApiError
from imgcls.inference_log import PRODUCTION
from imgcls.preprocess import ACCEPTED_NAMES

if t.TYPE_CHECKING:
    from starlette.requests import Request

DEFAULT_TOP_K = 5
#: Where the receiver leaves the parsed upload in the ASGI scope.
UPLOAD_KEY = "imgcls.upload"
_SOURCE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")


@dataclass(frozen=True)
class UploadSpec:
    """What one endpoint accepts: the file field's name, how many files, how large each, and raw bodies or not."""

    field: str
    max_files: int
    max_image_bytes: int
    raw_body: bool = False  # the body may be the image itself (Content-Type image/* or octet-stream)


@dataclass(frozen=True)
class Upload:
    """A parsed request: the image files, ``top_k`` and the traffic source."""

    files: list[bytes]
    top_k: int
    source: str


class _InMemoryParser(MultiPartParser):
    # Uploads are already capped by IMGCLS_MAX_BODY_BYTES, so keep them in memory instead of spilling to disk.
    spool_max_size = 1 << 30


def _hint(spec: UploadSpec, scope: t.Mapping[str, t.Any]) -> str:
    host = Headers(scope=scope).get("host", "HOST:PORT")
    example = f"curl -F {spec.field}=@photo.jpg http://{host}{scope['path']}"
    if spec.raw_body:
        example += f", or the image itself as the body with Content-Type image/jpeg (curl --data-binary @photo.jpg " \
                   f"-H 'Content-Type: image/jpeg' http://{host}{scope['path']})"  # fmt: skip
    return f"e.g. {example}"


def is_raw_image(content_type: str) -> bool:
    """A body that is the image itself (``image/*`` or ``application/octet-stream``) rather than a form."""
    kind = content_type.split(";")[0].strip().lower()
    return kind.startswith("image/") or kind == "application/octet-stream"


def traffic_source(raw: str | None) -> str:
    """Who sent a request (form field ``source`` or header ``X-Traffic-Source``; ``production`` when neither);
    400 when it is not a short name."""
    if raw is None or not raw.strip():
        return PRODUCTION
    value = raw.strip().lower()
    if not _SOURCE.match(value):
        raise ApiError(
            400,
            "invalid_traffic_source",
            f"Traffic source {raw[:40]!r} is not a short name (letters, digits, '_', '-', '.', at most 32); "
            "e.g. loadtest.",
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


def _check_size(spec: UploadSpec, data: bytes, index: int) -> None:
    if len(data) > spec.max_image_bytes:
        raise ApiError(
            413,
            "image_too_large",
            f"File {index + 1} is {len(data)} bytes; each image may be at most {spec.max_image_bytes} bytes "
            "(IMGCLS_MAX_IMAGE_BYTES). Send a smaller file (a JPEG of the photo, for example).",
        )


async def parse_upload(spec: UploadSpec, scope: t.Mapping[str, t.Any], body: bytes) -> Upload:
    """The files and fields of a request body; ApiError (4xx) for anything unusable."""
    headers = Headers(scope=scope)
    query = QueryParams(scope.get("query_string", b""))
    content_type = headers.get("content-type", "")
    if spec.raw_body and is_raw_image(content_type):
        _check_size(spec, body, 0)
        return Upload([body], parse_top_k(query.get("top_k")), traffic_source(headers.get("x-traffic-source")))
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(
            400,
            "not_multipart",
            f"Expected a multipart/form-data upload with a file field `{spec.field}` but got Content-Type "
            f"{content_type[:80] or '(none)'!r}; {_hint(spec, scope)}.",
        )

    async def stream() -> t.AsyncGenerator[bytes, None]:
        yield body

    parser = _InMemoryParser(headers, stream(), max_files=spec.max_files + 1, max_fields=16, max_part_size=64 << 10)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "too many files" in exc.message.lower():
            raise ApiError(
                413, "too_many_files", f"At most {spec.max_files} files per request (IMGCLS_MAX_FILES); split it."
            ) from None
        raise ApiError(
            400, "invalid_multipart", f"The multipart body is malformed ({exc.message}); {_hint(spec, scope)}."
        ) from None
    except (ValueError, KeyError, UnicodeDecodeError) as exc:  # python-multipart rejects some garbage this way
        raise ApiError(
            400, "invalid_multipart", f"The multipart body is malformed ({exc}); {_hint(spec, scope)}."
        ) from None
    files: list[bytes] = []
    fields: dict[str, str] = {}
    others: list[str] = []
    try:
        for key, value in form.multi_items():
            if key == spec.field and isinstance(value, UploadFile):
                files.append(await value.read())
                _check_size(spec, files[-1], len(files) - 1)
            elif key == spec.field:
                raise ApiError(
                    400,
                    "not_a_file",
                    f"Field `{spec.field}` must be a file part (with a filename), not a text value; "
                    f"{_hint(spec, scope)}.",
                )
            elif isinstance(value, str):
                fields[key] = value
            else:
                others.append(key)
    finally:
        await form.close()
    if not files:
        sent = sorted(set(others) | (set(fields) - {"top_k", "source"}))
        named = f" (the request has {', '.join(f'`{k}`' for k in sent)} instead)" if sent else ""
        raise ApiError(
            400, "missing_field", f"Required file field `{spec.field}` is missing{named}; {_hint(spec, scope)}."
        )
    if len(files) > spec.max_files:
        raise ApiError(
            413, "too_many_files", f"{len(files)} files sent; at most {spec.max_files} per request (IMGCLS_MAX_FILES)."
        )
    top_k = parse_top_k(fields.get("top_k", query.get("top_k")))
    return Upload(files, top_k, traffic_source(fields.get("source", headers.get("x-traffic-source"))))


def _parsed(request: Request) -> Upload:
    upload = request.scope.get(UPLOAD_KEY)
    if upload is None:  # the receiver middleware parses every POST to the API paths
        raise RuntimeError("no parsed upload in the request scope: is UploadReceiver installed?")
    return upload


class ImageUpload(bentoml.IODescriptor):
    """``POST /classify``: one image file and how many labels to return.

    Besides multipart, the body may be the image itself (``Content-Type: image/*``), ``top_k`` then in the query.
    """

    image: pathlib.Path = Field(description=f"The photo: {ACCEPTED_NAMES}.")
    top_k: int = Field(default=DEFAULT_TOP_K, ge=1, description="How many of the most likely labels to return.")
    source: str = Field(
        default=PRODUCTION,
        description="Who sends this request, recorded in the inference log: production, or a name such as "
        "loadtest that the drift job leaves out. The header X-Traffic-Source sets it too.",
    )

    @classmethod
    async def from_http_request(cls, request: Request, serde: t.Any) -> ImageUpload:
        """The upload the receiver parsed; the API method gets the file's bytes, ``top_k`` and ``source``."""
        upload = _parsed(request)
        return cls.model_construct(image=upload.files[0], top_k=upload.top_k, source=upload.source)


class ImageBatchUpload(bentoml.IODescriptor):
    """``POST /classify_batch``: several image files (field ``images``), classified in order."""

    images: list[pathlib.Path] = Field(description="The photos, in the order the results should come back.")
    top_k: int = Field(default=DEFAULT_TOP_K, ge=1, description="How many of the most likely labels per image.")
    source: str = Field(
        default=PRODUCTION,
        description="Who sends this request, recorded in the inference log: production, or a name such as "
        "loadtest that the drift job leaves out. The header X-Traffic-Source sets it too.",
    )

    @classmethod
    async def from_http_request(cls, request: Request, serde: t.Any) -> ImageBatchUpload:
        """The uploads the receiver parsed; the API method gets the files' bytes, ``top_k`` and ``source``."""
        upload = _parsed(request)
        return cls.model_construct(images=upload.files, top_k=upload.top_k, source=upload.source)
