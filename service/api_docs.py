"""The OpenAPI document at ``/docs.json``: BentoML's, completed with what BentoML cannot know.

BentoML 1.4.39 generates the paths and schemas from the API methods, but titles the document with the service's
name, gives it the version "None" outside a built Bento, describes it with its own README (badges loaded from
third-party hosts), and lists the error bodies of its own exceptions. This module sets the project's title,
version and description, documents the error responses the service really gives (one shape,
``{"error": code, "detail": what to do}``, with the codes each status carries), and adds ``/info`` and ``/ui``.
"""

from __future__ import annotations

import copy
import typing as t

from pydantic import BaseModel

TITLE = "Image classifier"
#: Where the description's examples name the server; ``/docs.json`` puts the host the page was asked from instead.
HOST_PLACEHOLDER = "HOST:PORT"
DESCRIPTION = """\
Upload photos, get labels. `POST /classify` takes one image (multipart field `image`, or the image itself as the
body with `Content-Type: image/jpeg`), `POST /classify_batch` several (repeated field `images`). Each answer has
the most likely label, the `top_k` most likely with their probabilities, and `unfamiliar` / `ood_score`: whether
the image is unlike anything the model was trained on (then treat the labels with caution).

```
curl -F image=@photo.jpg http://HOST:PORT/classify
curl -F images=@a.jpg -F images=@b.png http://HOST:PORT/classify_batch
```

Every error is JSON `{"error": code, "detail": what to do}`; each endpoint lists its statuses and codes below.

Try the model in a browser at [/ui](/ui). [/info](/info) describes the model served (tag, labels, input size,
variant, provider, test accuracy). Prometheus metrics are at `/metrics`, the probes at `/livez` and `/readyz`.
"""

TAG_DESCRIPTIONS = {
    "Service APIs": "Upload images, get labels",
    "Infrastructure": "Probes and metrics, for Kubernetes and Prometheus",
    "Pages": "For people, and for scripts that need to know the model",
}
ERROR_SCHEMA = {
    "type": "object",
    "title": "Error",
    "description": "Every error response of the service.",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "description": "A short machine-readable code, e.g. unsupported_format"},
        "detail": {"type": "string", "description": "What was wrong and what to do about it, for a person"},
    },
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}}

#: Status -> (what it means, the codes it carries, the detail of the first code as an example). One list for both
#: upload endpoints.
ERRORS: dict[int, tuple[str, list[str], str]] = {
    400: (
        "The request or the image cannot be used",
        [
            "undecodable_image",
            "empty_image",
            "missing_field",
            "not_multipart",
            "invalid_multipart",
            "not_a_file",
            "invalid_top_k",
            "invalid_traffic_source",
            "invalid_request",
            "invalid_http",
        ],
        "The file is not an image that can be read; send JPEG, PNG, WebP, BMP, GIF (first frame) or TIFF.",
    ),  # fmt: skip
    401: (
        "The server has an API key (IMGCLS_API_KEY) and the request did not carry it: send "
        "`Authorization: Bearer KEY` or `X-API-Key: KEY`",
        ["unauthorized"],
        "This endpoint needs the API key (IMGCLS_API_KEY on the server): send `Authorization: Bearer KEY` or "
        "`X-API-Key: KEY`.",
    ),
    405: ("The method is not POST", ["method_not_allowed"], "Use POST with multipart/form-data; see /docs."),
    408: (
        "The request headers (IMGCLS_HEADER_TIMEOUT_S) or body (IMGCLS_BODY_TIMEOUT_S) did not arrive in time",
        ["body_timeout", "head_timeout"],
        "The request body did not arrive within 30 s (IMGCLS_BODY_TIMEOUT_S); check the connection, or send "
        "smaller uploads.",
    ),
    413: (
        "Too large: the body, a file, the number of files, or the pixels an image declares in its header "
        "(checked before decoding)",
        ["image_too_large", "body_too_large", "too_many_files", "too_many_pixels", "too_costly_to_decode"],
        "File 1 is 12582912 bytes; each image may be at most 10485760 bytes (IMGCLS_MAX_IMAGE_BYTES). Send a "
        "smaller file (a JPEG of the photo, for example).",
    ),
    431: (
        "The request line and headers are too large (IMGCLS_MAX_HEADER_BYTES) or too many (IMGCLS_MAX_HEADERS)",
        ["headers_too_large", "too_many_headers"],
        "The request line and headers are over 32768 bytes (IMGCLS_MAX_HEADER_BYTES).",
    ),
    415: (
        "An image format the service does not read",
        ["unsupported_format"],
        "Image format ICO is not supported; send JPEG, PNG, WebP, BMP, GIF (first frame) or TIFF.",
    ),
    500: (
        "The server failed; it is logged",
        ["internal_error", "model_error"],
        "The server failed to handle this request; it is logged. Retry, or report it.",
    ),
    503: (
        "Overloaded or the model is restarting: retry after the seconds in Retry-After",
        ["overloaded", "model_unavailable"],
        "The model is saturated; retry after the number of seconds in Retry-After.",
    ),
    504: (
        "Not processed within IMGCLS_TIMEOUT_S",
        ["timeout"],
        "The request was not processed within 30 s (IMGCLS_TIMEOUT_S); retry later.",
    ),
}
#: ``POST /feedback``: status -> (what it means, its codes, the detail of the first code as an example).
FEEDBACK_ERRORS: dict[int, tuple[str, list[str], str]] = {
    400: (
        "A field is missing, or a label is not one of the model's",
        ["missing_field", "unknown_label", "invalid_request"],
        "Send both `request_id` and `label` (or `items`, a list of those).",
    ),
    404: (
        "A request_id this service did not issue",
        ["unknown_request_id"],
        "request_id '0123' is not one this service issued: send the request_id of an answer of /classify or "
        "/classify_batch (for a batch image, `<request_id>/<index>`).",
    ),
    413: ("Too many labels in one request", ["too_many_items"], "At most 1000 labels per request; split it."),
}
#: In a batch, an image that cannot be decoded is refused in its own entry of the results (with its error and
#: detail), not by a status of the whole request.
PER_IMAGE = {415}
#: With IMGCLS_API_KEY set, the ways a request may carry the key (service/http.py: ApiKeyAuth); any one.
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "The API key (IMGCLS_API_KEY)"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "basic": {"type": "http", "scheme": "basic", "description": "Any user name, the API key as the password"},
}
SECURITY = [{name: []} for name in SECURITY_SCHEMES]
BATCH_OK = (
    "One entry per uploaded image, in upload order. An image that was refused has `error` and `detail` (the codes "
    "of 400, 413 and 415 below) instead of a label; the others are still classified."
)


def error_response(status: int, errors: dict[int, tuple[str, list[str], str]] = ERRORS) -> dict[str, t.Any]:
    """The OpenAPI response object of one error status."""
    meaning, codes, example = errors[status]
    response: dict[str, t.Any] = {
        "description": f"{meaning}. `error` is one of: " + ", ".join(f"`{c}`" for c in codes) + ".",
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/Error"},
                "example": {"error": codes[0], "detail": example},
            }
        },
    }
    if status == 503:
        response["headers"] = RETRY_AFTER
    return response


def _get(summary: str, description: str, content: dict, secured: bool) -> dict:
    operation = {
        "tags": ["Pages"],
        "summary": summary,
        "description": description,
        "responses": {"200": {"description": "OK", "content": content}},
    }
    if secured:
        operation["responses"]["401"] = error_response(401)
        operation["security"] = SECURITY
    return {"get": operation}


def complete(spec: dict, version: str, info_model: type[BaseModel], api_key: bool) -> dict:
    """``spec`` (BentoML's, as a dict) with this project's title, version, description, real error responses and
    pages; ``api_key`` adds the 401 answer and the key's security schemes where the key is needed."""
    spec = copy.deepcopy(spec)
    spec["info"] = {"title": TITLE, "version": version, "description": DESCRIPTION}
    components = spec.setdefault("components", {})
    components.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    components["schemas"]["ModelInfo"] = info_model.model_json_schema(ref_template="#/components/schemas/{model}")
    statuses = [s for s in ERRORS if api_key or s != 401]
    if api_key:
        components["securitySchemes"] = SECURITY_SCHEMES
    for path in ("/classify", "/classify_batch"):
        operation = spec["paths"][path]["post"]
        ok = {**operation["responses"].get(200, operation["responses"].get("200", {}))}
        errors = [s for s in statuses if not (path == "/classify_batch" and s in PER_IMAGE)]
        if path == "/classify_batch":
            ok["description"] = BATCH_OK
        operation["responses"] = {"200": ok, **{str(s): error_response(s) for s in errors}}
        body = operation.setdefault("requestBody", {})
        body["required"] = True  # an upload without a body is refused (400)
        for content in body.get("content", {}).values():
            # BentoML gives every non-file field an encoding, which makes Swagger UI's "Try it out" send it as a file.
            content.pop("encoding", None)
        if api_key:
            operation["security"] = SECURITY
    operation = spec["paths"]["/feedback"]["post"]
    ok = {**operation["responses"].get(200, operation["responses"].get("200", {}))}
    errors = {str(s): error_response(s, FEEDBACK_ERRORS) for s in FEEDBACK_ERRORS}
    operation["responses"] = {"200": ok, **errors, **({"401": error_response(401)} if api_key else {})}
    if api_key:
        operation["security"] = SECURITY
    spec.pop("servers", None)  # BentoML's "." only adds a server menu; without it, the page's own host is used
    tags = [*spec.get("tags", []), {"name": "Pages"}]
    spec["tags"] = [
        {**tag, "description": TAG_DESCRIPTIONS.get(tag["name"], tag.get("description", ""))} for tag in tags
    ]
    spec["paths"]["/info"] = _get(
        "The model served",
        "Tag, labels, input size, variant, provider and test accuracy of the model this server runs, and the "
        "upload limits.",
        {"application/json": {"schema": {"$ref": "#/components/schemas/ModelInfo"}}},
        api_key,
    )
    spec["paths"]["/ui"] = _get(
        "Try the model in a browser",
        "A page to drop or pick images (or take a photo on a phone) and see the labels.",
        {"text/html": {}},
        api_key,
    )
    return spec
