"""Reading the uploads: BentoML IO specs for ``/classify`` and ``/classify_batch`` that parse multipart themselves.

The specs declare the fields BentoML shows in its OpenAPI page and uses in ``bentoml.SyncHTTPClient``
(``image: Path``, ``top_k: int``; ``images: list[Path]``), but read the request themselves:

- BentoML's own parser answers 500 for a malformed multipart body and can fetch URLs given in
  place of a file; here every problem becomes an :class:`~service.preprocess.ImageError` (4xx).
- Files stay in memory as bytes (no temporary file per upload, no second read from disk).

A problem is not raised (BentoML would log a traceback per bad request): it is handed to the API
method in place of the upload, which answers it as a JSON error.
"""

from __future__ import annotations

import pathlib
import typing as t

from _bentoml_sdk.io_models import IODescriptor
from pydantic import Field
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.preprocess import ImageError

if t.TYPE_CHECKING:
    from starlette.requests import Request

DEFAULT_TOP_K = 5
CURL_HINT = "e.g. curl -F image=@photo.jpg http://localhost:3000/classify"


class _InMemoryParser(MultiPartParser):
    # Uploads are already capped by IMGCLS_MAX_BODY_BYTES, so keep them in memory instead of spilling to disk.
    spool_max_size = 1 << 30


async def read_form(request: Request, file_field: str, max_files: int) -> tuple[list[bytes], dict[str, str]]:
    """The bytes of every file in ``file_field`` and the other fields as text; ImageError for anything unusable."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ImageError(
            400,
            "not_multipart",
            f"Expected a multipart/form-data upload with a file field `{file_field}` but got Content-Type "
            f"{content_type or '(none)'!r}; {CURL_HINT}.",
        )
    try:
        form = await _InMemoryParser(
            request.headers, request.stream(), max_files=max_files + 1, max_fields=16, max_part_size=64 << 10
        ).parse()
    except MultiPartException as exc:
        if "files" in exc.message.lower() and "too many" in exc.message.lower():
            raise ImageError(
                413, "too_many_files", f"At most {max_files} files per request (IMGCLS_MAX_FILES); split the request."
            ) from exc
        detail = f"The multipart body is malformed ({exc.message}); {CURL_HINT}."
        raise ImageError(400, "invalid_multipart", detail) from exc
    except (ValueError, KeyError, UnicodeDecodeError) as exc:  # python-multipart rejects some garbage this way
        raise ImageError(400, "invalid_multipart", f"The multipart body is malformed ({exc}); {CURL_HINT}.") from exc
    files: list[bytes] = []
    fields: dict[str, str] = {}
    try:
        for key, value in form.multi_items():
            if key == file_field:
                if isinstance(value, UploadFile):
                    files.append(await value.read())
                else:
                    raise ImageError(
                        400,
                        "not_a_file",
                        f"Field `{file_field}` must be a file part (with a filename), not a text value; {CURL_HINT}.",
                    )
            elif isinstance(value, str):
                fields[key] = value
    finally:
        await form.close()
    if not files:
        raise ImageError(400, "missing_field", f"Required file field `{file_field}` is missing; {CURL_HINT}.")
    if len(files) > max_files:
        raise ImageError(
            413, "too_many_files", f"{len(files)} files sent; at most {max_files} per request (IMGCLS_MAX_FILES)."
        )
    return files, fields


def is_raw_image(content_type: str) -> bool:
    """A body that is the image itself (``image/*`` or ``application/octet-stream``) rather than a form."""
    kind = content_type.split(";")[0].strip().lower()
    return kind.startswith("image/") or kind == "application/octet-stream"


def parse_top_k(fields: dict[str, str], query: t.Mapping[str, str]) -> int:
    """``top_k`` from the form (or the query string), default 5; ImageError when it is not a positive integer."""
    raw = fields.get("top_k", query.get("top_k"))
    if raw is None or raw.strip() == "":
        return DEFAULT_TOP_K
    try:
        value = int(raw.strip().strip('"'))
    except ValueError:
        value = 0
    if value < 1:
        raise ImageError(400, "invalid_top_k", f"top_k must be a positive integer, got {raw!r}.")
    return value


class ImageUpload(IODescriptor):
    """``POST /classify``: one image file and how many labels to return.

    Besides multipart, the body may be the image itself (``Content-Type: image/*``), ``top_k`` then in the query.
    """

    image: pathlib.Path = Field(description="The photo: JPEG, PNG, WebP, BMP, GIF (first frame) or TIFF.")
    top_k: int = Field(default=DEFAULT_TOP_K, ge=1, description="How many of the most likely labels to return.")

    @classmethod
    async def from_http_request(cls, request: Request, serde: t.Any) -> IODescriptor:
        """Parse the upload; a problem travels to the API method in place of the image."""
        try:
            if is_raw_image(request.headers.get("content-type", "")):  # curl --data-binary @photo.jpg ...
                return cls.model_construct(image=await request.body(), top_k=parse_top_k({}, request.query_params))
            files, fields = await read_form(request, "image", max_files=1)
            return cls.model_construct(image=files[0], top_k=parse_top_k(fields, request.query_params))
        except ImageError as exc:
            return cls.model_construct(image=exc, top_k=DEFAULT_TOP_K)


class ImageBatchUpload(IODescriptor):
    """``POST /classify_batch``: several image files (field ``images``), classified in order."""

    images: list[pathlib.Path] = Field(description="The photos, in the order the results should come back.")
    top_k: int = Field(default=DEFAULT_TOP_K, ge=1, description="How many of the most likely labels per image.")

    #: the most files one request may carry; the service sets it from IMGCLS_MAX_FILES
    max_files: t.ClassVar[int] = 64

    @classmethod
    async def from_http_request(cls, request: Request, serde: t.Any) -> IODescriptor:
        """Parse the uploads; a problem travels to the API method in place of the images."""
        try:
            files, fields = await read_form(request, "images", max_files=cls.max_files)
            return cls.model_construct(images=files, top_k=parse_top_k(fields, request.query_params))
        except ImageError as exc:
            return cls.model_construct(images=exc, top_k=DEFAULT_TOP_K)
