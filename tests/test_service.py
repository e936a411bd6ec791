"""The service through a real `bentoml serve` subprocess and real HTTP (one server for the whole module)."""

from __future__ import annotations

import functools
import http.client
import io
import json
import re
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from imgcls import __version__
from imgcls.inference_log import REQUIRED_FIELDS, log_files, parse_line
from imgcls.model_files import open_model
from service.settings import cpu_count
from tests.helpers import (
    assert_error,
    classify,
    encode,
    exif_rotated_jpeg,
    jpeg,
    metric_values,
    photo,
    png_bomb,
    scan_bomb,
    start_server,
    text_chunk_png,
    total,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@functools.cache
def unusual_images() -> dict[str, tuple[bytes, str]]:
    """Valid but unusual uploads, with the content type a client might (wrongly) send."""
    rgba = photo(64, 48, "RGBA")
    rgba.putalpha(128)
    palette = photo(64, 48).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    gray16 = Image.fromarray((np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16))
    assert gray16.mode.startswith("I;16")
    frames = [photo(64, 48), photo(64, 48, "L").convert("RGB")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    return {
        "cmyk_jpeg": (encode(photo(mode="CMYK"), "JPEG"), "image/jpeg"),
        "grayscale_png": (encode(photo(mode="L"), "PNG"), "image/png"),
        "gray16_png": (encode(gray16, "PNG"), "image/png"),
        "la_png": (encode(photo(64, 48, "LA"), "PNG"), "image/png"),
        "palette_transparency_png": (encode(palette, "PNG"), "image/png"),
        "rgba_png": (encode(rgba, "PNG"), "image/png"),
        "one_pixel": (encode(photo(1, 1), "PNG"), "image/png"),
        "wide_4000x3": (encode(photo(4000, 3), "PNG"), "image/png"),
        "tall_3x4000": (encode(photo(3, 4000), "JPEG"), "image/jpeg"),
        "exif_rotated_jpeg": (exif_rotated_jpeg(), "image/jpeg"),
        "progressive_jpeg": (encode(photo(), "JPEG", progressive=True, quality=85), "image/jpeg"),
        "jpeg_as_png": (encode(photo(), "JPEG"), "image/png"),
        "jpeg_as_octet_stream": (encode(photo(), "JPEG"), "application/octet-stream"),
        "webp": (encode(photo(), "WEBP"), "image/webp"),
        "bmp": (encode(photo(120, 80), "BMP"), "image/bmp"),
        "animated_gif": (gif.getvalue(), "image/gif"),
        "tiff": (encode(photo(120, 80), "TIFF"), "image/tiff"),
    }


@pytest.fixture(scope="module")
def photo_jpeg() -> bytes:
    return jpeg()


def test_classify_jpeg_returns_label_scores_model_and_request_id(server, tiny_model, photo_jpeg):
    resp = classify(server, photo_jpeg)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"label", "score", "top_k", "unfamiliar", "ood_score", "model", "request_id"}
    assert isinstance(body["unfamiliar"], bool) and body["ood_score"] >= 0
    assert body["model"] == tiny_model
    assert len(body["top_k"]) == 5 and body["top_k"][0] == {"label": body["label"], "score": body["score"]}
    scores = [p["score"] for p in body["top_k"]]
    assert scores == sorted(scores, reverse=True) and 0 < body["score"] <= 1
    assert classify(server, photo_jpeg, top_k="2").json()["top_k"][:1] == body["top_k"][:1]
    assert len(classify(server, photo_jpeg, top_k="2").json()["top_k"]) == 2


def test_a_client_alone_gets_the_same_answers_from_every_core(server, photo_jpeg):
    """One request at a time, the other workers idle, runs on the session with a thread per core
    (service/session.py: Model); its answers are those of the one-thread session that concurrent requests use."""
    if cpu_count() > 1:
        assert re.search(r"an image that finds the other workers idle runs with \d+ threads", server.output())
    time.sleep(1.2)
    alone = classify(server, photo_jpeg, top_k="3").json()["top_k"]
    with ThreadPoolExecutor(4) as pool:
        together = [r.json()["top_k"] for r in pool.map(lambda _: classify(server, photo_jpeg, top_k="3"), range(8))]
    for answer in together:
        assert [p["label"] for p in answer] == [p["label"] for p in alone]
        assert np.allclose([p["score"] for p in answer], [p["score"] for p in alone], atol=1e-4)


def test_curl_upload_just_works(server, photo_jpeg, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    path = tmp_path / "bird.jpg"
    path.write_bytes(photo_jpeg)
    out = subprocess.run(["curl", "-sf", "-F", f"image=@{path}", server.url + "/classify"], capture_output=True)
    assert out.returncode == 0 and b'"label"' in out.stdout


def test_raw_image_body_is_accepted(server, photo_jpeg):
    resp = requests.post(server.url + "/classify?top_k=1", data=photo_jpeg, headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 200 and len(resp.json()["top_k"]) == 1


@pytest.mark.parametrize("name", sorted(unusual_images()))
def test_unusual_valid_images_are_classified(server, name):
    data, content_type = unusual_images()[name]
    resp = classify(server, data, content_type)
    assert resp.status_code == 200, f"{name}: {resp.text}"
    assert resp.json()["label"]


def test_exif_orientation_is_applied(server):
    """A photo stored sideways with an EXIF rotation classifies like the upright one."""
    upright = photo(400, 100).rotate(-90, expand=True)  # what a viewer shows for orientation 6
    a = classify(server, exif_rotated_jpeg()).json()["top_k"]
    b = classify(server, encode(upright, "JPEG")).json()["top_k"]
    assert [p["label"] for p in a] == [p["label"] for p in b]
    assert all(abs(x["score"] - y["score"]) < 0.05 for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "empty_image"),
        (b"this is not an image at all", 400, "undecodable_image"),
        (encode(photo(), "JPEG")[:3000], 400, "undecodable_image"),  # truncated
        (encode(photo(64, 48), "PPM"), 415, "unsupported_format"),
        (png_bomb(), 413, "too_many_pixels"),
        (png_bomb(12_000, 12_000), 413, "too_many_pixels"),  # past Pillow's own ceiling: our words and limit
        (encode(photo(900, 900), "JPEG")[:1500] + b"\xff\xd9", 400, "undecodable_image"),  # ends early, "complete"
        (scan_bomb(2000, 300), 413, "too_costly_to_decode"),
        (text_chunk_png(4), 413, "too_costly_to_decode"),
    ],
    ids=[
        "empty",
        "garbage",
        "truncated_jpeg",
        "ppm_unsupported",
        "png_bomb_40000x40000",
        "png_bomb_144mp",
        "declares_more_than_it_holds",
        "progressive_scan_bomb",
        "png_text_bomb",
    ],  # fmt: skip
)
def test_bad_uploads_get_4xx_json(server, data, status, code):
    assert_error(classify(server, data), status, code)


def test_oversized_images_are_refused_in_our_words_and_limit(server):
    """Over Pillow's own ceiling as under it: the project's message, its limit and its setting."""
    for side in (7500, 12_000):
        detail = classify(server, png_bomb(side, side)).json()["detail"]
        assert f"{side * side:,} pixels; the limit is 50,000,000 (IMGCLS_MAX_PIXELS)" in detail, detail
        assert "DOS" not in detail


def test_limits_are_per_image_and_per_request(server):
    """An image over 10 MiB is refused; four 5 MB phone photos in one batch are not; a 70 MB body is refused from
    its Content-Length before it is read."""
    big = b"\xff\xd8" + b"\0" * (10 * 1024 * 1024 + 10)
    assert_error(classify(server, big), 413, "image_too_large")
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8))
    phone = encode(noisy, "JPEG", quality=95)
    assert 2_000_000 < len(phone) < 10 << 20
    files = [("images", (f"{i}.jpg", phone, "image/jpeg")) for i in range(4)]
    resp = requests.post(server.url + "/classify_batch", files=files, timeout=120)
    assert resp.status_code == 200 and all("label" in r for r in resp.json()["results"]), resp.text[:300]
    conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=10)
    conn.putrequest("POST", "/classify_batch")
    conn.putheader("Content-Type", "multipart/form-data; boundary=b")
    conn.putheader("Content-Length", "70000000")
    conn.endheaders()  # and no body: the refusal must come from the header alone
    refused = conn.getresponse()
    assert refused.status == 413 and json.loads(refused.read())["error"] == "body_too_large"
    conn.close()


def test_request_errors_get_400_json(server, photo_jpeg):
    assert_error(requests.post(server.url + "/classify", files={"photo": ("a.jpg", photo_jpeg)}), 400, "missing_field")
    assert_error(requests.post(server.url + "/classify", data={"top_k": "3"}), 400, "not_multipart")
    assert_error(classify(server, photo_jpeg, top_k="zero"), 400, "invalid_top_k")
    garbage = requests.post(
        server.url + "/classify", data=b"--x\r\ngarbage", headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert garbage.status_code == 400 and garbage.json()["error"] in ("invalid_multipart", "missing_field")
    url_instead_of_file = requests.post(server.url + "/classify", json={"image": "http://example.com/a.jpg"})
    assert_error(url_instead_of_file, 400, "not_multipart")


def test_batch_endpoint_returns_results_in_order(server, tiny_model, photo_jpeg):
    single = classify(server, photo_jpeg).json()
    files = [
        ("images", ("a.jpg", photo_jpeg, "image/jpeg")),
        ("images", ("b.txt", b"not an image", "text/plain")),
        ("images", ("c.png", unusual_images()["rgba_png"][0], "image/png")),
    ]
    resp = requests.post(server.url + "/classify_batch", files=files, data={"top_k": "3"}, timeout=60)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == tiny_model and len(body["results"]) == 3
    first, second, third = body["results"]
    assert first["label"] == single["label"] and len(first["top_k"]) == 3
    assert second["error"] == "undecodable_image" and "Image 2" in second["detail"]
    assert third["label"]


def test_batch_endpoint_limits_the_number_of_files(server, photo_jpeg):
    files = [("images", (f"{i}.jpg", photo_jpeg, "image/jpeg")) for i in range(65)]
    assert_error(requests.post(server.url + "/classify_batch", files=files, timeout=60), 413, "too_many_files")
    assert_error(
        requests.post(server.url + "/classify_batch", files={"image": ("a.jpg", photo_jpeg)}), 400, "missing_field"
    )


def test_sync_http_client_works(server, tiny_model, photo_jpeg, tmp_path):
    import bentoml

    path = tmp_path / "photo.jpg"
    path.write_bytes(photo_jpeg)
    with bentoml.SyncHTTPClient(server.url) as client:
        result = client.classify(image=path, top_k=2)
        batch = client.classify_batch(images=[path, path])
    assert result["model"] == tiny_model and len(result["top_k"]) == 2
    assert [r["label"] for r in batch["results"]] == [result["label"]] * 2


def test_probes(server):
    assert requests.get(server.url + "/livez", timeout=10).status_code == 200
    assert requests.get(server.url + "/readyz", timeout=10).status_code == 200


def test_docs_are_this_projects_and_load_nothing_from_other_hosts(server):
    root = requests.get(server.url + "/", timeout=10)
    assert root.url == server.url + "/docs" and root.history[0].status_code == 307
    for path in ("/", "/docs", "/docs.json", "/docs/docs.js"):
        text = requests.get(server.url + path, timeout=10).text
        assert "googletagmanager" not in text.lower(), path
        assert not re.search(r"<script[^>]*\bsrc=[\"']?(https?:)?//", text, re.IGNORECASE), path
    page = requests.get(server.url + "/docs", timeout=10)
    assert "docs/swagger-ui-bundle.js" in page.text and page.headers["content-security-policy"].startswith(
        "default-src 'self'"
    )
    assert requests.get(server.url + "/docs/swagger-ui-bundle.js", timeout=10).status_code == 200

    spec = requests.get(server.url + "/docs.json", timeout=10).json()
    assert spec["info"]["title"] == "Image classifier" and spec["info"]["version"] == __version__
    assert "POST /classify" in spec["info"]["description"] and "BentoML" not in spec["info"]["description"]
    assert f"curl -F image=@photo.jpg {server.url}/classify" in spec["info"]["description"]  # this server's port
    assert "/classify" in spec["paths"] and "/classify_batch" in spec["paths"] and "/info" in spec["paths"]
    error = {"$ref": "#/components/schemas/Error"}
    for status in ("400", "405", "413", "415", "503", "504"):
        assert spec["paths"]["/classify"]["post"]["responses"][status]["content"]["application/json"]["schema"] == error
    assert spec["components"]["schemas"]["Error"]["required"] == ["error", "detail"]
    assert_error(requests.get(server.url + "/classify", timeout=10), 405, "method_not_allowed")


def test_info_describes_the_model_served(server, tiny_model):
    import bentoml

    info = requests.get(server.url + "/info", timeout=10).json()
    files = open_model(bentoml.models.get(tiny_model).path)
    metrics = json.loads((files.folder / "metrics.json").read_text())
    assert info == {
        "model": tiny_model,
        "version": __version__,
        "labels": files.labels,
        "input_size": files.spec.size,
        "variant": "int8",
        "provider": "CPUExecutionProvider",
        "accuracy": metrics["accuracy"]["int8"],
        "test_images": metrics["test_images"],
        "unfamiliar_threshold": 1.0,
        "max_files": 64,
        "max_image_bytes": 10 << 20,
    }
    page = requests.get(server.url + "/ui", timeout=10)
    assert page.url == server.url + "/ui/" and '<script src="app.js"' in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    missing = requests.get(server.url + "/ui/secrets.txt", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


def test_metrics_move_and_pass_promtool(server, photo_jpeg):
    before = metric_values(server.url)
    label = classify(server, photo_jpeg).json()["label"]
    classify(server, b"")
    after = metric_values(server.url)
    counts = {
        ("imgcls_predictions_total", ("label", label)),
        ("imgcls_confidence_count", None),
        ("imgcls_rejected_total", ("reason", "empty_image")),
        ("imgcls_preprocess_seconds_count", None),
        ("imgcls_model_seconds_count", None),
        ("imgcls_batch_size_count", None),
        ("imgcls_ood_score_count", None),
        ("imgcls_images_total", ("source", "production")),
    }
    grew = {}
    for name, label_pair in counts:
        labels = dict([label_pair]) if label_pair else {}
        grew[name] = total(after, name, **labels) > total(before, name, **labels)
    assert all(grew.values()), grew
    info = [lbls for (n, lbls), v in after.items() if n == "imgcls_model_info" and v == 1]
    assert info and ("provider", "CPUExecutionProvider") in info[0] and ("variant", "int8") in info[0]
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run `make system-deps` (Debian package prometheus)"
    text = requests.get(server.url + "/metrics", timeout=10).text
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_second_server_on_the_same_home_leaves_the_first_ones_metrics_alone(server, tiny_model, tmp_path):
    """`bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir when it starts; each server here keeps its
    metrics in a folder of its own, so a second one (the fp32 variant of the same model) changes nothing on the
    first one's /metrics."""
    classify(server, jpeg())
    before = metric_values(server.url)
    second = start_server(".", {"IMGCLS_MODEL": tiny_model, "IMGCLS_DEVICE": "cpu", "IMGCLS_VARIANT": "fp32"}, tmp_path)
    try:
        classify(second, jpeg())
        first, other = metric_values(server.url), metric_values(second.url)
    finally:
        second.stop()
    variants = lambda values: {dict(lbls)["variant"] for (n, lbls), v in values.items() if n == "imgcls_model_info"}  # noqa: E731
    assert variants(first) == {"int8"} and variants(other) == {"fp32"}
    assert total(first, "imgcls_ready") == total(before, "imgcls_ready") >= 1
    assert total(first, "imgcls_predictions_total") >= total(before, "imgcls_predictions_total") > 0


def test_every_classified_image_is_logged_within_seconds(server, tiny_model, photo_jpeg):
    ids = [classify(server, photo_jpeg).json()["request_id"] for _ in range(3)]
    deadline, found = time.monotonic() + 10, {}
    while time.monotonic() < deadline and len(found) < 3:
        time.sleep(0.5)
        for path in log_files(server.log_dir):
            for line in Path(path).read_bytes().splitlines():
                record = parse_line(line)
                assert record is not None, f"unparseable line in {path}: {line[:200]!r}"
                if record["request_id"] in ids:
                    found[record["request_id"]] = record
    assert set(found) == set(ids)
    record = found[ids[0]]
    assert all(k in record for k in REQUIRED_FIELDS) and record["model"] == tiny_model
    assert len(record["embedding"]) > 0 and record["width"] == 500.0 and record["height"] == 375.0
    assert (record["source"], record["variant"]) == ("production", "int8") and record["ood_score"] >= 0


def test_request_heads_are_bounded_in_size_and_fields(server, photo_jpeg):
    files = {"image": ("a.jpg", photo_jpeg, "image/jpeg")}
    big = requests.post(server.url + "/classify", files=files, headers={"X-Big": "a" * 40_000}, timeout=30)
    assert_error(big, 431, "headers_too_large")
    many = requests.post(
        server.url + "/classify", files=files, headers={f"X-H{i}": "v" for i in range(150)}, timeout=30
    )
    assert_error(many, 431, "too_many_headers")
    # Bodies far larger than the head limit still pass on a kept-alive connection, request after request.
    with requests.Session() as session:
        photo = jpeg(2000, 1500)
        codes = [session.post(server.url + "/classify", files={"image": ("b.jpg", photo)}, timeout=30).status_code
                 for _ in range(4)]  # fmt: skip
    assert codes == [200] * 4 and len(photo) > 64 << 10


def test_a_huge_header_is_cut_off_after_the_limit_not_buffered(server):
    host, port = server.url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nX-Huge: ")
        with pytest.raises(OSError):  # the server closes the connection: the send fails, reset or broken pipe
            while sent < 100 << 20:
                conn.sendall(b"a" * 65536)
                sent += 65536
    assert sent < 4 << 20, f"{sent} bytes of one header were accepted"


def test_a_websocket_upgrade_gets_an_answer_not_a_hung_connection(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            b"GET /classify HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        reply = conn.recv(4096)  # the timeout above fails the test if nothing comes
    assert reply.startswith(b"HTTP/1.1 ")
