"""What each scenario sends and how each response is judged; the Locust users in locustfile.py call these.

Multipart bodies are built once per image and reused, so the load generator spends its CPU on sending,
not on encoding (it usually shares the machine with the service).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from loadtest.images import TestImage

#: Statuses a bad input may get: any 4xx except "not found", "method not allowed" and "overloaded".
BAD_INPUT_OK = frozenset(range(400, 500)) - {404, 405, 429}


@dataclass(frozen=True)
class Payload:
    """A ready-to-send multipart body."""

    body: bytes
    content_type: str
    files: int


def multipart(fields: Iterable[tuple[str, str | None, str | None, bytes]]) -> Payload:
    """Encode (field name, filename or None, content type or None, bytes) parts as multipart/form-data."""
    boundary = uuid.uuid4().hex
    chunks, files = [], 0
    for name, filename, ctype, data in fields:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
            files += 1
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if ctype:
            head += f"Content-Type: {ctype}\r\n"
        chunks += [head.encode(), b"\r\n", data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return Payload(b"".join(chunks), f"multipart/form-data; boundary={boundary}", files)


def single_payload(image: TestImage, top_k: int) -> Payload:
    """Body for POST /classify: one ``image`` file and ``top_k``."""
    return multipart(
        [("image", image.filename, image.content_type, image.data), ("top_k", None, None, str(top_k).encode())]
    )


def batch_payload(images: list[TestImage], top_k: int) -> Payload:
    """Body for POST /classify_batch: several ``images`` files and ``top_k``."""
    parts = [("images", img.filename, img.content_type, img.data) for img in images]
    return multipart(parts + [("top_k", None, None, str(top_k).encode())])


def bad_payloads(good_jpeg: bytes) -> dict[str, Payload]:
    """Inputs a correct service refuses with a 4xx (never a 500): one per kind of client mistake."""
    return {
        "not_an_image": multipart([("image", "notes.jpg", "image/jpeg", b"this is a text file, not a photo\n" * 20)]),
        "empty_file": multipart([("image", "empty.jpg", "image/jpeg", b"")]),
        "truncated_jpeg": multipart([("image", "cut.jpg", "image/jpeg", good_jpeg[: len(good_jpeg) // 3])]),
        "missing_field": multipart([("picture", "photo.jpg", "image/jpeg", good_jpeg)]),
    }


def load_labels(spec: str) -> frozenset[str] | None:
    """Allowed labels from a labels.json path, a model folder holding one, or a comma list; None when empty."""
    if not spec:
        return None
    path = Path(spec)
    if path.is_dir():
        path = path / "labels.json"
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise ValueError(f"Labels file {path} does not exist; pass a labels.json, a model folder or a comma list.")
        labels = json.loads(path.read_text())
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"{path} is not a JSON list of class names.")
        return frozenset(labels)
    return frozenset(x.strip() for x in spec.split(",") if x.strip())


def check_prediction(pred: object, labels: frozenset[str] | None, top_k: int) -> str | None:
    """Why one prediction object is wrong, or None when it is valid.

    Checked: ``label`` is a non-empty string (in ``labels`` when given), ``score`` and every ``top_k`` score lie
    in [0, 1], ``top_k`` has 1..top_k entries in descending score order and starts with the top label.
    """
    if not isinstance(pred, dict):
        return f"prediction is {type(pred).__name__}, not an object"
    label, score, top = pred.get("label"), pred.get("score"), pred.get("top_k")
    if not isinstance(label, str) or not label:
        return f"label {label!r} is not a non-empty string"
    if labels is not None and label not in labels:
        return f"label {label!r} is not one of the model's labels"
    if not _is_prob(score):
        return f"score {score!r} is not in [0, 1]"
    if not isinstance(top, list) or not 1 <= len(top) <= top_k:
        return f"top_k has {len(top) if isinstance(top, list) else type(top).__name__} entries, expected 1..{top_k}"
    scores = []
    for entry in top:
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), str) or not _is_prob(entry.get("score")):
            return f"top_k entry {entry!r} is not {{label, score in [0, 1]}}"
        if labels is not None and entry["label"] not in labels:
            return f"top_k label {entry['label']!r} is not one of the model's labels"
        scores.append(entry["score"])
    if any(a < b for a, b in zip(scores, scores[1:], strict=False)):
        return f"top_k scores are not in descending order: {scores}"
    if top[0]["label"] != label or not math.isclose(top[0]["score"], score, rel_tol=1e-6, abs_tol=1e-6):
        return "top_k[0] is not the top label and score"
    return None


def check_single(body: bytes, labels: frozenset[str] | None, top_k: int) -> str | None:
    """Why a /classify 200 body is wrong, or None."""
    try:
        data = json.loads(body)
    except ValueError:
        return "response is not JSON"
    problem = check_prediction(data, labels, top_k)
    if problem:
        return problem
    if not isinstance(data.get("model"), str) or not data["model"]:
        return "response has no model tag"
    return None


def check_batch(body: bytes, labels: frozenset[str] | None, top_k: int, count: int) -> str | None:
    """Why a /classify_batch 200 body is wrong, or None; accepts a list or ``{"results": [...]}``."""
    try:
        data = json.loads(body)
    except ValueError:
        return "response is not JSON"
    results = data.get("results") if isinstance(data, dict) else data
    if not isinstance(results, list) or len(results) != count:
        return f"expected {count} results in order, got {len(results) if isinstance(results, list) else results!r}"
    for i, pred in enumerate(results):
        problem = check_prediction(pred, labels, top_k)
        if problem:
            return f"result {i}: {problem}"
    return None


def _is_prob(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and 0.0 <= x <= 1.0
