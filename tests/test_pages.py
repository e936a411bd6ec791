"""Fast, in-process checks of the pages app (``service/pages.py``) and the OpenAPI completion
(``service/api_docs.py``): fixed files only, the security and cache headers, /info, and the documented errors."""

from __future__ import annotations

import asyncio
import gzip
import re

import httpx
import pytest
from starlette.routing import Match

from imgcls import __version__
from service import api_docs, pages

INFO = pages.ModelInfo(
    model="image-classifier:abc",
    version=__version__,
    labels=["cat", "dog"],
    input_size=32,
    variant="int8",
    provider="CPUExecutionProvider",
    accuracy=0.9,
    test_images=100,
    unfamiliar_threshold=1.0,
    max_files=64,
    max_image_bytes=1 << 20,
)
#: The parts of BentoML's generated document that complete() reads.
BENTOML_SPEC = {
    "openapi": "3.0.2",
    "info": {"title": "image_classifier", "version": "None", "description": "# BentoML README with badges"},
    "servers": [{"url": "."}],
    "tags": [{"name": "Service APIs", "description": "BentoML Service API endpoints for inference."}],
    "paths": {
        path: {"post": {"responses": {200: {"description": "Successful Response"}, 400: {}, 404: {}, 500: {}}}}
        for path in ("/classify", "/classify_batch", "/feedback")
    },
    "components": {"schemas": {"InvalidArgument": {}}},
}


def get(app, path: str, **headers) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def app():
    return pages.create_app(lambda: INFO, lambda: BENTOML_SPEC, api_key=False)


def test_the_page_and_its_files_have_their_types_and_a_strict_policy(app):
    expected = {
        "/ui/": "text/html",
        "/ui/app.js": "text/javascript",
        "/ui/style.css": "text/css",
        "/ui/favicon.svg": "image/svg+xml",
        "/docs": "text/html",
        "/docs/docs.js": "text/javascript",
        "/docs/swagger-ui-bundle.js": "text/javascript",
        "/docs/swagger-ui.css": "text/css",
    }
    for path, media_type in expected.items():
        resp = get(app, path)
        assert resp.status_code == 200, path
        assert resp.headers["content-type"].startswith(media_type), path
        assert resp.headers["content-security-policy"] == pages.CSP
        assert "script-src 'self';" in pages.CSP and "unsafe" not in pages.CSP
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["referrer-policy"] == "no-referrer"
        assert resp.headers["cache-control"] and resp.headers["etag"]


def test_only_the_fixed_files_are_served(app):
    for path in (
        "/ui/../service/pages.py",
        "/ui/%2e%2e/pages.py",
        "/ui/..%2fpages.py",
        "/ui/index.html",
        "/ui/api_docs.py",
        "/ui/.%2fapp.js",
        "/docs/..%2f..%2fpages.py",
        "/docs/static_content",
    ):
        resp = get(app, path)
        assert resp.status_code == 404, path
        assert "import" not in resp.text, path


def test_a_browser_that_has_a_file_gets_304_and_a_large_one_comes_gzipped(app):
    first = get(app, "/ui/app.js")
    again = get(app, "/ui/app.js", **{"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    bundle = get(app, "/docs/swagger-ui-bundle.js", **{"Accept-Encoding": "gzip"})
    assert bundle.headers["content-encoding"] == "gzip" and "SwaggerUIBundle" in bundle.text  # httpx unpacks it
    assert len(gzip.compress(bundle.content)) < len(bundle.content) / 2


def test_info_and_redirects(app):
    assert get(app, "/info").json() == INFO.model_dump()
    starting = get(pages.create_app(lambda: None, lambda: BENTOML_SPEC, api_key=False), "/info")
    assert starting.status_code == 503 and starting.json()["error"] == "starting"
    for path, to in (("/", "docs"), ("/ui", "ui/")):
        resp = get(app, path)
        assert resp.status_code == 307 and resp.headers["location"] == to


def test_the_pages_never_claim_an_api_or_probe_path(app):
    """BentoML lists mounted apps after its own routes; this keeps it so even if that order changed."""
    for path in ("/classify", "/classify_batch", "/metrics", "/livez", "/readyz", "/healthz", "/schema.json"):
        for method in ("GET", "POST"):
            scope = {"type": "http", "path": path, "method": method, "root_path": ""}
            assert all(route.matches(scope)[0] == Match.NONE for route in app.routes), (method, path)


def test_our_html_loads_only_our_own_files_and_has_nothing_inline():
    for name in ("index.html", "docs.html"):
        html = (pages.UI_DIR / name).read_text()
        for ref in re.findall(r'(?:src|href)="([^"]*)"', html):
            assert "//" not in ref and not ref.startswith(("http", "data:", "javascript:")), (name, ref)
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), f"{name}: an inline script breaks the CSP"
        assert "<style" not in html and " style=" not in html, f"{name}: inline style breaks the CSP"
    assert (
        '<input id="camera" class="hidden-input" type="file" accept="image/*" capture'
        in (pages.UI_DIR / "index.html").read_text()
    )


def test_the_spec_has_our_title_version_and_real_errors():
    spec = api_docs.complete(BENTOML_SPEC, "1.2.3", pages.ModelInfo, api_key=False)
    assert spec["info"] == {"title": api_docs.TITLE, "version": "1.2.3", "description": api_docs.DESCRIPTION}
    assert "servers" not in spec and BENTOML_SPEC["info"]["title"] == "image_classifier"  # the input is untouched
    classify = spec["paths"]["/classify"]["post"]["responses"]
    assert sorted(classify) == ["200", "400", "405", "408", "413", "415", "431", "500", "503", "504"]
    for status in ("400", "413", "415", "503", "504"):
        content = classify[status]["content"]["application/json"]
        assert content["schema"] == {"$ref": "#/components/schemas/Error"}
        assert set(content["example"]) == {"error", "detail"}
    assert spec["components"]["schemas"]["Error"]["required"] == ["error", "detail"]
    assert "Retry-After" in classify["503"]["headers"]
    assert "`unsupported_format`" in classify["415"]["description"]
    batch = spec["paths"]["/classify_batch"]["post"]["responses"]
    assert "415" not in batch and "refused" in batch["200"]["description"]  # per image, in the results
    assert spec["paths"]["/info"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ModelInfo"
    }
    assert "401" not in classify and "securitySchemes" not in spec["components"]
    feedback = spec["paths"]["/feedback"]["post"]["responses"]
    assert sorted(feedback) == ["200", "400", "404", "413"] and "`unknown_request_id`" in feedback["404"]["description"]


def test_with_an_api_key_the_spec_says_where_it_is_needed():
    spec = api_docs.complete(BENTOML_SPEC, "1.2.3", pages.ModelInfo, api_key=True)
    for path, method in (("/classify", "post"), ("/classify_batch", "post"), ("/feedback", "post"), ("/info", "get"),
                         ("/ui", "get")):  # fmt: skip
        operation = spec["paths"][path][method]
        assert "401" in operation["responses"] and operation["security"] == api_docs.SECURITY, path
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKeyHeader", "basic"}
