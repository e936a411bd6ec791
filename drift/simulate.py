"""`python -m drift.simulate`: send images to a running service, optionally shifted, to watch drift fire.

Images: new ones from the training's demo generator, like the held-out images of the served model
(default), or the files of ``--images DIR``. Shifts: none (the bytes as they are), brightness,
contrast, blur, noise, rotation (a quarter turn), unseen (demo classes the model never saw; for a
folder, documents), document (a page of text-like stripes instead of a photo: a kind of image outside
every class), aspect (stretched to 2:1). Requests are bounded in count and
each has a timeout.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from drift.reference import model_folder
from imgcls.demo_images import CLASSES, DemoParams, render
from imgcls.model_files import CONFIG_FILE, DEFAULT_MODEL, load_labels
from imgcls.preprocess import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

#: What the simulator marks its requests with (X-Traffic-Source): the drift job leaves them out unless asked.
SOURCE = "simulation"


def _brightness(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(rng.uniform(1.5, 1.8))


def _contrast(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(rng.uniform(0.3, 0.45))


def _blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=max(2.0, max(img.size) * rng.uniform(0.025, 0.035))))


def _noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 30, size=(img.height, img.width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _rotation(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    # A camera that stopped writing (or a pipeline that dropped) the EXIF orientation: a quarter turn.
    return img.rotate(90 if rng.random() < 0.5 else -90, expand=True)


def _aspect(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img.resize((img.width * 2, img.height), Image.Resampling.BICUBIC)


def _document(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Something that is not among the classes: a page of coloured text-like stripes on a light background."""
    w, h = img.size
    page = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(200, 256, size=3)))
    draw = ImageDraw.Draw(page)
    line = max(3, h // 12)
    for y in range(line, h - line, line * 2):
        x = int(rng.integers(0, max(1, w // 8)))
        while x < w:
            length = int(rng.integers(max(2, w // 16), max(3, w // 5)))
            draw.rectangle((x, y, x + length, y + line), fill=tuple(int(c) for c in rng.integers(0, 90, size=3)))
            x += length + max(2, w // 30)
    return page


SHIFTS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image] | None] = {
    "none": None,
    "brightness": _brightness,
    "contrast": _contrast,
    "blur": _blur,
    "noise": _noise,
    "rotation": _rotation,
    "unseen": _document,  # for a folder of photos; with demo images, demo classes the model never saw
    "document": _document,
    "aspect": _aspect,
}


def shift_image(data: bytes, shift: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """The upload bytes and content type of one image after ``shift`` ("none" sends the file untouched)."""
    transform = SHIFTS[shift]
    if transform is None:
        return data, _content_type(data)
    with Image.open(io.BytesIO(data)) as src:
        fmt = src.format
        img = transform(src.convert("RGB"), rng)
    # Keep the upload's format: the service decodes JPEG at a reduced scale (draft mode) and PNG in full,
    # so a change of format alone moves the statistics (sharpness) and would pass for a shift.
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "image/jpeg"
    img.save(buf, format="PNG")
    return buf.getvalue(), "image/png"


def _content_type(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def find_images(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (any depth), sorted."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return paths


def folder_images(folder: str | Path, n: int, seed: int) -> list[bytes]:
    """``n`` files from ``folder`` in a seeded order, each once per round when ``n`` exceeds them."""
    paths = find_images(folder)
    rng = np.random.default_rng(seed)
    rounds = -(-n // len(paths))
    order = np.concatenate([rng.permutation(len(paths)) for _ in range(rounds)])[:n]
    return [paths[i].read_bytes() for i in order]


def demo_images(n: int, seed: int, model: str = DEFAULT_MODEL, unseen: bool = False) -> list[bytes]:
    """``n`` new demo images like the ones model ``model`` was trained on, or of demo classes it never saw.

    They come from the demo generator with the model's stored demo parameters, at image
    indices past the generated data set: the same distribution as the held-out images, yet none of
    them was trained on or summarised in the reference, so "no shift" traffic is a fair test.
    """
    folder = model_folder(model)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    if not cfg.get("demo"):
        raise ValueError(f"model {model} was not trained on the demo data: pass --images with photos like yours")
    params = DemoParams(cfg["demo_classes"], cfg["demo_per_class"], cfg["demo_image_size"], seed=cfg.get("seed", 0))
    labels = set(load_labels(folder))
    classes = [i for i, name in enumerate(CLASSES) if (name not in labels) == unseen]
    if not classes:
        raise ValueError(f"model {model} knows every demo class; there is no unseen one to send")
    first = params.per_class + seed * 1_000_000
    return [render(classes[k % len(classes)], first + k // len(classes), params) for k in range(n)]


@dataclass
class SimulationResult:
    """What was sent and how the service answered."""

    sent: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)  # status code (or exception name) -> count
    labels: Counter = field(default_factory=Counter)  # predicted label -> count
    unfamiliar: int = 0  # answers flagged as unlike the training images

    @property
    def unfamiliar_share(self) -> float:
        return self.unfamiliar / self.ok if self.ok else float("nan")


def simulate(
    host: str,
    images: list[bytes],
    shift: str = "none",
    seed: int = 0,
    workers: int = 4,
    timeout: float = 30.0,
    source: str = SOURCE,
) -> SimulationResult:
    """POST each image, after ``shift``, to ``host``/classify from a small thread pool, marked as ``source``."""
    import httpx

    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; choose one of {', '.join(SHIFTS)}")
    seeds = np.random.default_rng(seed).integers(0, 2**32, size=len(images))
    url = host.rstrip("/") + "/classify"

    def send(i: int) -> tuple[int | str, dict]:
        data, content_type = shift_image(images[i], shift, np.random.default_rng(seeds[i]))
        name = f"image{i}." + content_type.split("/")[-1]
        try:
            resp = client.post(
                url, files={"image": (name, data, content_type)}, headers={"X-Traffic-Source": source}, timeout=timeout
            )
        except httpx.HTTPError as e:
            return type(e).__name__, {}
        if resp.status_code != 200:
            return resp.status_code, {}
        try:
            return 200, resp.json()
        except ValueError:
            return 200, {}

    result = SimulationResult()
    with httpx.Client() as client, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for status, answer in pool.map(send, range(len(images))):
            result.sent += 1
            if status == 200:
                result.ok += 1
                result.labels[str(answer.get("label"))] += 1
                result.unfamiliar += bool(answer.get("unfamiliar"))
            else:
                result.errors[str(status)] += 1
    if result.errors:
        log.warning("%d of %d requests failed: %s", sum(result.errors.values()), result.sent, dict(result.errors))
    return result


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and send the traffic; exit code 1 when any request failed."""
    p = argparse.ArgumentParser(prog="python -m drift.simulate", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="http://127.0.0.1:3000", help="service URL (default http://127.0.0.1:3000)")
    p.add_argument("--shift", default="none", choices=list(SHIFTS), help="what to change in the images")
    p.add_argument("--n", type=int, default=200, help="requests to send (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed for the image order and the shifts")
    p.add_argument("--workers", type=int, default=4, help="concurrent requests (default 4)")
    p.add_argument("--images", type=Path, help="image folder to send (default: new images from the demo generator)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model whose demo data to imitate (default {DEFAULT_MODEL})")
    p.add_argument(
        "--source",
        default=SOURCE,
        help=f"X-Traffic-Source of the requests (default {SOURCE}; judge them with `python -m drift --source "
        f"{SOURCE}`, or send them as production)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if args.images:
        images, shift = folder_images(args.images, args.n, args.seed), args.shift
    else:  # the demo generator draws real unseen classes; the "unseen" transform is for user folders
        images = demo_images(args.n, args.seed, args.model, unseen=args.shift == "unseen")
        shift = "none" if args.shift == "unseen" else args.shift
    result = simulate(args.host, images, shift, args.seed, args.workers, source=args.source)
    print(f"sent {result.sent} images ({args.shift}): {result.ok} ok")
    if result.ok:
        print(f"  unfamiliar: {result.unfamiliar} of {result.ok} ({100 * result.unfamiliar_share:.1f}%)")
    for label, count in result.labels.most_common():
        print(f"  {label:<20} {count}")
    for status, count in result.errors.items():
        print(f"  error {status:<14} {count}")
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
