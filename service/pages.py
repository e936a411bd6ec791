"""The pages for people, served beside the API: ``/ui`` to try the model in a browser, ``/info`` about the model
a worker serves, and the API documentation at ``/docs`` (``/`` leads there).

One Starlette app, mounted at "/" by :mod:`service.service`. BentoML puts mounted apps after its own routes in the
router, and matches a mounted Starlette app only on the paths it declares, so an API request never reaches this
code; the service's middlewares (API key, error shape) apply here as everywhere.

What is served is a fixed set of files, read on first use: ``service/ui/`` (plain HTML, JS and CSS, no build
step) and Swagger UI's script and stylesheet as BentoML's wheel ships them. Nothing comes from another host,
and every response says so in its Content-Security-Policy. BentoML's own page at ``/`` loads Google Tag
Manager; this app answers ``/`` first, with a redirect to ``/docs``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import typing as t
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from imgcls import __version__
from imgcls.errors import ApiError
from imgcls.model_files import METRICS_FILE, ModelFiles
from service import api_docs
from service.adaptations import SWAGGER_DIR
from service.http import error_response

UI_DIR = Path(__file__).parent / "ui"

#: Only this host's own files, no inline script or style; images may also be the photos the page previews.
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
#: The project's files change with the project: the browser asks again each time (a 304 when unchanged).
REVALIDATE = "no-cache"
#: Swagger UI's files change only with the pinned BentoML.
KEEP_A_DAY = "public, max-age=86400"


class ModelInfo(BaseModel):
    """What ``GET /info`` answers: the model this worker serves, and the limits of an upload."""

    model: str = Field(description="Tag of the model in the BentoML store")
    version: str = Field(description="Version of this service")
    labels: list[str] = Field(description="The classes the model tells apart, in output order")
    input_size: int = Field(description="Side in pixels of the square the model sees (images are resized to it)")
    variant: str = Field(description="fp32, fp16 or int8: the model file in use")
    provider: str = Field(description="onnxruntime execution provider: CPUExecutionProvider or CUDAExecutionProvider")
    accuracy: float | None = Field(description="Top-1 accuracy of this variant on the held-out test set, 0..1")
    test_images: int | None = Field(description="How many test images that accuracy was measured on")
    unfamiliar_threshold: float = Field(description="An image whose ood_score is above this is `unfamiliar`")
    max_files: int = Field(description="Most images per /classify_batch request")
    max_image_bytes: int = Field(description="Largest file accepted")


def model_info(
    tag: str, files: ModelFiles, variant: str, provider: str, max_files: int, max_image_bytes: int
) -> ModelInfo:
    """The /info of a served model: what the worker opened, plus the test accuracy stored with the model."""
    try:
        metrics = json.loads((files.folder / METRICS_FILE).read_text())
    except (OSError, ValueError):  # an older model without metrics.json still serves; /info says "unknown"
        metrics = {}
    accuracy = (metrics.get("accuracy") or {}).get(variant)
    return ModelInfo(
        model=tag,
        version=__version__,
        labels=files.labels,
        input_size=files.spec.size,
        variant=variant,
        provider=provider,
        accuracy=accuracy,
        test_images=metrics.get("test_images"),
        unfamiliar_threshold=1.0,  # imgcls.ood scales every model's score so that 1.0 is the line
        max_files=max_files,
        max_image_bytes=max_image_bytes,
    )


class Asset:
    """One file served as it is, with its ETag (304 when the browser has it) and a gzip copy for larger text."""

    def __init__(self, path: Path, media_type: str, cache_control: str):
        self.path, self.media_type, self.cache_control = path, media_type, cache_control

    @functools.cached_property
    def _content(self) -> tuple[bytes, bytes | None, str]:
        body = self.path.read_bytes()
        packed = gzip.compress(body, 6, mtime=0) if len(body) > 1024 else None
        return body, packed, '"' + hashlib.sha256(body).hexdigest()[:20] + '"'

    def response(self, request: Request) -> Response:
        body, packed, etag = self._content
        headers = {"ETag": etag, "Cache-Control": self.cache_control, "Vary": "Accept-Encoding", **SECURITY_HEADERS}
        if etag in (tag.strip().removeprefix("W/") for tag in request.headers.get("if-none-match", "").split(",")):
            return Response(status_code=304, headers=headers)
        if packed is not None and "gzip" in request.headers.get("accept-encoding", ""):
            body, headers["Content-Encoding"] = packed, "gzip"
        return Response(body, media_type=self.media_type, headers=headers)


def _ours(name: str, media_type: str) -> Asset:
    return Asset(UI_DIR / name, media_type, REVALIDATE)


HTML, JS = "text/html; charset=utf-8", "text/javascript; charset=utf-8"
CSS, SVG = "text/css; charset=utf-8", "image/svg+xml"
#: Everything /ui/ serves, by the name in the URL; nothing else can be reached (no path is ever joined).
UI_FILES = {
    "": _ours("index.html", HTML),
    "app.js": _ours("app.js", JS),
    "style.css": _ours("style.css", CSS),
    "favicon.svg": _ours("favicon.svg", SVG),
}
#: Everything under /docs/, the same way.
DOCS_FILES = {
    "": _ours("docs.html", HTML),
    "docs.js": _ours("docs.js", JS),
    "docs.css": _ours("docs.css", CSS),
    "favicon.svg": _ours("favicon.svg", SVG),
    "swagger-ui.css": Asset(SWAGGER_DIR / "swagger-ui.css", CSS, KEEP_A_DAY),
    "swagger-ui-bundle.js": Asset(SWAGGER_DIR / "swagger-ui-bundle.js", JS, KEEP_A_DAY),
}


def _files(table: dict[str, Asset], where: str) -> Callable[[Request], t.Awaitable[Response]]:
    async def serve(request: Request) -> Response:
        asset = table.get(request.path_params.get("name", ""))
        if asset is None:
            return error_response(ApiError(404, "not_found", f"No such file under {where}; open {where} itself."))
        return asset.response(request)

    return serve


def _redirect(to: str) -> Callable[[Request], t.Awaitable[Response]]:
    async def redirect(request: Request) -> Response:
        return RedirectResponse(to, status_code=307, headers=SECURITY_HEADERS)

    return redirect


def create_app(info: Callable[[], ModelInfo | None], bentoml_spec: Callable[[], dict], api_key: bool) -> Starlette:
    """The pages app. ``info`` gives this worker's :class:`ModelInfo` (None while it starts); ``bentoml_spec`` the
    OpenAPI document BentoML generates for the service, which ``/docs.json`` completes (title, version, errors,
    these pages); ``api_key`` says whether the API needs a key."""

    @functools.cache
    def spec_json() -> bytes:
        return json.dumps(api_docs.complete(bentoml_spec(), __version__, ModelInfo, api_key)).encode()

    async def info_endpoint(request: Request) -> Response:
        current = info()
        if current is None:
            err = ApiError(503, "starting", "The service is still starting; retry in a few seconds.", retry_after=1)
            return error_response(err)
        return JSONResponse(current.model_dump(), headers={"Cache-Control": REVALIDATE, **SECURITY_HEADERS})

    async def spec_endpoint(request: Request) -> Response:
        headers = {"Cache-Control": REVALIDATE, **SECURITY_HEADERS}
        host = json.dumps(request.headers.get("host", api_docs.HOST_PLACEHOLDER))[1:-1].encode()  # JSON-safe
        body = spec_json().replace(api_docs.HOST_PLACEHOLDER.encode(), host)
        return Response(body, media_type="application/json", headers=headers)

    ui, docs = _files(UI_FILES, "/ui/"), _files(DOCS_FILES, "/docs")
    routes = [
        Route("/", _redirect("docs"), methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/docs/{name}", docs, methods=["GET"]),
        Route("/docs.json", spec_endpoint, methods=["GET"]),
        Route("/info", info_endpoint, methods=["GET"]),
        Route("/ui", _redirect("ui/"), methods=["GET"]),
        Route("/ui/", ui, methods=["GET"]),
        Route("/ui/{name}", ui, methods=["GET"]),
    ]
    return Starlette(routes=routes)
