"""Labels that arrive later: ``POST /feedback`` with the ``request_id`` of an answer and the image's true label.

A request id is 16 random hex digits and 16 of their HMAC-SHA256 under the deployment's key, so the service can
tell an id it issued from one it did not without keeping a list of them (a batch's images are ``<id>/<index>``).
The key is read from ``IMGCLS_REQUEST_ID_KEY_FILE``, created there (owner-only) on the first start; pods that share
it accept feedback on each other's answers. Accepted labels go to their own files beside the inference log
(``feedback-*.jsonl``), written and pruned like it (``imgcls/inference_log.py``); the accuracy job
(``python -m drift.accuracy``) joins them to the predictions.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from pydantic import BaseModel, Field

from imgcls.errors import ApiError
from imgcls.inference_log import InferenceLogWriter, make_feedback

_ID = re.compile(r"^([0-9a-f]{16})([0-9a-f]{16})(?:/(\d{1,5}))?$")
#: Labels one request may send.
MAX_ITEMS = 1000


def load_key(path: str | os.PathLike) -> bytes:
    """The key in ``path``, created (32 random bytes, readable by this user only) when there is none."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < 16:
            raise OSError(
                f"{path} holds {len(key)} bytes, too short for a key; delete it to have a new one made"
            ) from None
        return key
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path.read_bytes()


class RequestIds:
    """Issues request ids and tells whether an id was issued under the same key."""

    def __init__(self, key: bytes):
        self.key = key

    def _mac(self, nonce: str) -> str:
        return hmac.new(self.key, nonce.encode(), hashlib.sha256).hexdigest()[:16]

    def new(self) -> str:
        nonce = secrets.token_hex(8)
        return nonce + self._mac(nonce)

    def issued(self, request_id: str) -> bool:
        match = _ID.match(request_id)
        return bool(match) and hmac.compare_digest(self._mac(match.group(1)), match.group(2))


class Label(BaseModel):
    request_id: str = Field(description="The request_id of an answer (a batch image's: `<request_id>/<index>`)")
    label: str = Field(description="The image's true label, one of the model's labels (GET /info)")


class FeedbackResult(BaseModel):
    recorded: int = Field(description="Labels recorded")


class Feedback:
    """Validates labels and records them beside the inference log."""

    def __init__(self, ids: RequestIds, labels: list[str], model: str, writer: InferenceLogWriter):
        self.ids, self.labels, self.model, self.writer = ids, set(labels), model, writer

    def record(self, request_id: str, label: str, items: list[Label]) -> dict:
        """Record the label of ``request_id`` and every one of ``items``, or none (ApiError 4xx naming the first bad
        one)."""
        if request_id or label:
            if not (request_id and label):
                raise ApiError(
                    400, "missing_field", "Send both `request_id` and `label` (or `items`, a list of those)."
                )
            items = [*items, Label(request_id=request_id, label=label)]
        if not items:
            raise ApiError(400, "missing_field", "Send `request_id` and `label`, or `items`: a list of those.")
        if len(items) > MAX_ITEMS:
            raise ApiError(413, "too_many_items", f"At most {MAX_ITEMS} labels per request; split it.")
        for i, item in enumerate(items):
            where = f"Item {i + 1}: " if len(items) > 1 else ""
            if not self.ids.issued(item.request_id):
                raise ApiError(
                    404,
                    "unknown_request_id",
                    f"{where}request_id {item.request_id[:80]!r} is not one this service issued: send the request_id "
                    "of an answer of /classify or /classify_batch (for a batch image, `<request_id>/<index>`).",
                )
            if item.label not in self.labels:
                shown = ", ".join(sorted(self.labels)[:20])
                raise ApiError(
                    400,
                    "unknown_label",
                    f"{where}label {item.label[:80]!r} is not one of the model's labels ({shown}; GET /info lists "
                    "them).",
                )
        for item in items:
            self.writer.write(make_feedback(item.request_id, item.label, self.model))
        return {"recorded": len(items)}
