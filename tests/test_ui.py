"""The /ui page in a real headless browser (Debian's chromium driven by Playwright), against a real server.

Screenshots are saved under the test's tmp_path and copied to ``reports/`` (``ui-screenshot.png``, the page at
desktop width after a photo, a batch and a refused file; ``ui-phone.png`` at 390 px; ``docs-screenshot.png``),
so a person can look at what the page shows.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from playwright.sync_api import sync_playwright

from imgcls.demo_images import CLASSES, DemoParams, render
from tests.helpers import ROOT, encode, start_server

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: As root, without a sandbox; no background connections (this machine's network is closed, and a test must not
#: call out); a fresh profile every launch.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPORTS = ROOT / "reports"
API_KEY = "ui-test-key"


def demo_photo(shape: str, index: int = 7) -> bytes:
    """A demo image of one class, like those the test model was trained on (a JPEG of 128-160 px)."""
    return render(CLASSES.index(shape), index, DemoParams(image_size=160))


def checkerboard() -> bytes:
    """A PNG unlike any training image: the test model's detector scores it far above its threshold."""
    squares = (np.indices((256, 256)) // 16).sum(0) % 2 * 255
    return encode(Image.fromarray(squares.astype(np.uint8)).convert("RGB"), "PNG")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed: run `make system-deps` (or `make test`, which does)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ui-images")
    files = {
        "circle.jpg": demo_photo("circle"),
        "star.jpg": demo_photo("star"),
        "checkerboard.png": checkerboard(),
        "notes.jpg": b"These are my shopping notes, not a photo.\n" * 20,  # a text file with an image's name
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


def watched_page(context, problems: list[str]):
    """A page whose console errors (CSP violations among them), failed requests, answers >= 400 other than the
    API's and requests to other hosts end up in ``problems``."""
    page = context.new_page()

    def console(msg) -> None:
        # Chrome logs every 4xx as "Failed to load resource"; the refusals the test provokes are checked on the
        # page, and any other answer >= 400 is caught below.
        if msg.type == "error" and not msg.text.startswith("Failed to load resource: the server responded"):
            problems.append(f"console {msg.type}: {msg.text}")

    def refused(response) -> None:
        if response.status >= 400 and not response.url.endswith(("/classify", "/classify_batch")):
            problems.append(f"{response.status} for {response.url}")

    page.on("console", console)
    page.on("response", refused)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url} {req.failure}"))

    def outside(request) -> None:
        if not request.url.startswith(("http://127.0.0.1", "blob:", "data:")):
            problems.append(f"request to another host: {request.url}")

    page.on("request", outside)
    return page


def save(page, tmp_path: Path, name: str, full_page: bool = True) -> Path:
    """Screenshot to tmp_path and reports/; prints where."""
    path = tmp_path / name
    if full_page:
        # The viewport made as tall as the page rather than Playwright's full_page, which drops the touch
        # emulation while it captures (a phone's page would be shot as a desktop's).
        width = page.viewport_size["width"]
        page.set_viewport_size({"width": width, "height": page.evaluate("document.documentElement.scrollHeight")})
    page.screenshot(path=str(path))
    REPORTS.mkdir(exist_ok=True)
    shutil.copyfile(path, REPORTS / name)
    print(f"screenshot: {path} (copied to {REPORTS / name})")
    return path


def upload(page, *paths: Path) -> None:
    """Choose files in the page's file input, as a person would, and wait for their round to be answered."""
    rounds = page.locator(".round").count()
    page.set_input_files("#files", [str(p) for p in paths])
    page.locator(".round").nth(0).locator(".round-summary .latency").wait_for()
    assert page.locator(".round").count() == rounds + 1


def test_page_classifies_uploads_and_shows_refusals_plainly(browser, server, tiny_model, images, tmp_path):
    expected = {}
    for name in ("circle.jpg", "star.jpg", "checkerboard.png"):
        files = {"image": (name, images[name].read_bytes())}
        expected[name] = requests.post(server.url + "/classify", files=files, timeout=60).json()
    assert expected["checkerboard.png"]["unfamiliar"], "the test needs one image the model finds unfamiliar"
    info = requests.get(server.url + "/info", timeout=10).json()

    context = browser.new_context(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page = watched_page(context, problems)
    page.goto(server.url + "/ui")
    assert page.url == server.url + "/ui/"
    model = page.locator("#model")
    model.locator(".chip").first.wait_for()
    for shown in (tiny_model, info["variant"], "CPUExecutionProvider", f"{len(info['labels'])}"):
        assert shown in model.inner_text()

    # One photo: its preview, then bars whose top label is what /classify answers for the same file.
    upload(page, images["circle.jpg"])
    card = page.locator(".round").nth(0).locator(".card")
    assert card.count() == 1
    assert card.locator("img.thumb").evaluate("img => img.complete && img.naturalWidth > 0")
    assert card.locator(".bar.top .label").inner_text() == expected["circle.jpg"]["label"]
    assert card.locator(".bar").count() == len(expected["circle.jpg"]["top_k"])
    summary = page.locator(".round").nth(0).locator(".round-summary").inner_text()
    assert re.search(r"\d+ ms round trip", summary) and "POST /classify" in summary and tiny_model in summary
    assert card.locator(".notice").is_visible() == expected["circle.jpg"]["unfamiliar"]

    # A text file named .jpg: the service's code and detail, shown as they are.
    upload(page, images["notes.jpg"])
    refused = page.locator(".round").nth(0).locator(".card")
    assert refused.locator(".error-box").is_visible()
    assert refused.locator(".error-code").inner_text() == "400 undecodable_image"
    assert "not an image that can be read" in refused.locator(".error-detail").inner_text()
    assert refused.locator(".bar").count() == 0

    # Two images: one /classify_batch request, two results in upload order; the unfamiliar one says so.
    upload(page, images["star.jpg"], images["checkerboard.png"])
    batch = page.locator(".round").nth(0)
    assert "POST /classify_batch" in batch.locator(".round-summary").inner_text()
    cards = batch.locator(".card")
    assert cards.count() == 2
    for i, name in enumerate(("star.jpg", "checkerboard.png")):
        assert cards.nth(i).locator(".name").inner_text() == name
        assert cards.nth(i).locator(".bar.top .label").inner_text() == expected[name]["label"]
        assert cards.nth(i).locator(".notice").is_visible() == expected[name]["unfamiliar"]
    assert "unlike anything the model was trained on" in cards.nth(1).locator(".notice").inner_text()

    # The labels are one tap away (no tooltip), and a person can confirm or correct an answer: POST /feedback.
    model.locator("details.labels summary").click()
    assert ", ".join(info["labels"]) in model.locator(".label-list").inner_text()
    cards.nth(0).locator(".verdict button").click()
    assert cards.nth(0).locator(".verdict-done").inner_text().startswith(f"Recorded: {expected['star.jpg']['label']}")
    other = next(label for label in info["labels"] if label != expected["checkerboard.png"]["label"])
    cards.nth(1).locator(".verdict select").select_option(label=other)
    assert cards.nth(1).locator(".verdict-done").inner_text() == f"Recorded: {other}. Thank you."

    save(page, tmp_path, "ui-screenshot.png")
    assert problems == [], problems
    context.close()


def test_page_fits_a_phone(browser, server, images, tmp_path):
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    problems: list[str] = []
    page = watched_page(context, problems)
    page.goto(server.url + "/ui/")
    assert page.locator("#camera").get_attribute("capture") is not None  # the camera, on a phone
    assert page.locator("label[for=camera]").is_visible()
    upload(page, images["star.jpg"], images["notes.jpg"])
    assert page.locator(".card").count() == 2
    assert page.locator(".card").nth(1).locator(".error-code").inner_text() == "undecodable_image"
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width} px wide on a 390 px screen: it scrolls sideways"
    model_height = page.locator("#model").bounding_box()["height"]
    assert model_height < 844 / 8, f"the model's description takes {model_height:.0f} px of an 844 px screen"
    save(page, tmp_path, "ui-phone.png")
    assert problems == [], problems
    context.close()


def test_docs_page_renders_our_spec_with_nothing_from_other_hosts(browser, server, tmp_path):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page = watched_page(context, problems)
    page.goto(server.url + "/")
    assert page.url == server.url + "/docs"
    page.locator(".swagger-ui .info .title").wait_for()
    assert "Image classifier" in page.locator(".swagger-ui .info .title").inner_text()
    assert page.locator(".opblock-summary-path", has_text="/classify_batch").count() == 1
    save(page, tmp_path, "docs-screenshot.png", full_page=False)
    assert problems == [], problems
    context.close()


@pytest.mark.parametrize(("path", "files"), [("/classify", 1), ("/classify_batch", 2)])
def test_docs_try_it_out_sends_what_the_api_takes(browser, server, images, path, files):
    """Swagger UI's "Try it out" on each upload endpoint: pick the photos, Execute, and the answer is a 200."""
    context = browser.new_context(viewport={"width": 1200, "height": 1600})
    page = context.new_page()
    page.goto(server.url + "/docs")
    summary = page.locator(".opblock-summary-path", has_text=re.compile(f"^{path}$"))
    summary.wait_for()
    operation = page.locator(".opblock").filter(has=summary)
    operation.locator(".opblock-summary").click()
    operation.locator("button.try-out__btn").click()
    for _ in range(files if path == "/classify_batch" else 0):
        operation.locator("button", has_text="Add string item").click()
    inputs = operation.locator("input[type=file]")
    assert inputs.count() == files
    for i in range(files):
        inputs.nth(i).set_input_files(images["circle.jpg"])
    operation.locator("button.execute").click()
    status = operation.locator(".live-responses-table tbody .response-col_status").first
    status.wait_for(timeout=30_000)
    body = operation.locator(".live-responses-table tbody .response-col_description").first.inner_text()
    assert status.inner_text().strip() == "200", body[:500]
    assert '"label"' in body
    context.close()


def test_page_works_with_an_api_key(browser, tiny_model, images, tmp_path_factory):
    srv = start_server(
        ".",
        {"IMGCLS_MODEL": tiny_model, "IMGCLS_DEVICE": "cpu", "IMGCLS_WORKERS": "1", "IMGCLS_API_KEY": API_KEY},
        tmp_path_factory.mktemp("server-with-key"),
    )
    try:
        assert requests.get(srv.url + "/ui/", timeout=10).status_code == 401
        # What a browser does after its login prompt: Basic credentials, the key as the password.
        context = browser.new_context(http_credentials={"username": "me", "password": API_KEY})
        problems: list[str] = []
        page = watched_page(context, problems)
        page.goto(srv.url + "/ui/")
        page.locator("#model .chip").first.wait_for()
        assert tiny_model in page.locator("#model").inner_text()
        upload(page, images["circle.jpg"])
        assert page.locator(".card .bar.top .label").inner_text()
        assert page.locator(".card .error-box").is_hidden()
        context.close()
        assert problems == [], problems
    finally:
        srv.stop()
