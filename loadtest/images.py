"""Synthetic but realistic test images, made on the spot (no downloads), and the weighted mix a load test sends.

Photos are smooth colour fields with shapes, edges and a little sensor noise, so they compress like real
photos (a 12 MP phone JPEG is a few MB, a 500x375 web JPEG about 50-100 KB) instead of like white noise.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: The default mix for `locust -f loadtest`: mostly web-size JPEGs, some phone photos, PNG and WebP.
DEFAULT_MIX = "web_jpeg=70,phone_jpeg=10,png=10,webp=10"
#: The comparison scenario of the serving issue: 500x375 JPEGs only.
COMPARE_MIX = "jpeg_500x375=1"
#: Web JPEG sizes between 320x240 and 1024x768 (4:3, either orientation).
WEB_SIZES = [(320, 240), (400, 300), (500, 375), (640, 480), (800, 600), (1024, 768)]
PHONE_SIZE = (4032, 3024)


@dataclass(frozen=True)
class TestImage:
    """One encoded image ready to upload."""

    kind: str
    data: bytes
    filename: str
    content_type: str
    size: tuple[int, int]


def photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A photo-like RGB image: a smooth colour field with a few soft-edged shapes and mild sensor noise."""
    # Compose at a small scale and upscale: the upscale gives the soft edges of a real photo, cheaply.
    sw, sh = max(8, width // 8), max(8, height // 8)
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    small = Image.fromarray(coarse, "RGB").resize((sw, sh), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(small)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, sw)), int(rng.integers(0, sh))
        w, h = int(rng.integers(sw // 10 + 1, sw // 3 + 2)), int(rng.integers(sh // 10 + 1, sh // 3 + 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=colour)
    img = small.filter(ImageFilter.GaussianBlur(radius=0.6)).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.integers(-12, 13, size=(height, width, 3), dtype=np.int16)
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    """The bytes of ``img`` saved as ``fmt`` (Pillow's save parameters)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def repeat_last_scan(data: bytes, times: int) -> bytes:
    """A progressive JPEG with its last refinement scan repeated ``times`` more: each scan is another pass over
    every coefficient of the full-size image, for a few KB."""
    last, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * times + data[end:]


def web_jpeg(rng: np.random.Generator) -> TestImage:
    """A web-size JPEG between 320x240 and 1024x768, quality 85."""
    w, h = WEB_SIZES[int(rng.integers(len(WEB_SIZES)))]
    if rng.random() < 0.3:
        w, h = h, w
    return TestImage("web_jpeg", encode(photo(w, h, rng), "JPEG", quality=85), "web.jpg", "image/jpeg", (w, h))


def jpeg_500x375(rng: np.random.Generator) -> TestImage:
    """The comparison image: 500x375 JPEG at quality 90."""
    data = encode(photo(500, 375, rng), "JPEG", quality=90)
    return TestImage("jpeg_500x375", data, "photo.jpg", "image/jpeg", (500, 375))


def phone_jpeg(rng: np.random.Generator) -> TestImage:
    """A 12 MP phone photo (4032x3024, quality 90); half of them portrait through the EXIF orientation tag."""
    w, h = PHONE_SIZE
    exif = Image.Exif()
    exif[0x0112] = 6 if rng.random() < 0.5 else 1  # 6: rotate 90 degrees when displayed, as phones do
    exif[0x0110] = "LoadTest Phone"
    data = encode(photo(w, h, rng), "JPEG", quality=90, exif=exif.tobytes())
    return TestImage("phone_jpeg", data, "IMG_0001.jpg", "image/jpeg", (w, h))


def png(rng: np.random.Generator) -> TestImage:
    """A screenshot-size PNG (800x600), a quarter of them RGBA."""
    img = photo(800, 600, rng)
    if rng.random() < 0.25:
        img.putalpha(200)
    return TestImage("png", encode(img, "PNG", compress_level=6), "image.png", "image/png", img.size)


def webp(rng: np.random.Generator) -> TestImage:
    """A 1024x768 WebP at quality 80."""
    data = encode(photo(1024, 768, rng), "WEBP", quality=80)
    return TestImage("webp", data, "image.webp", "image/webp", (1024, 768))


#: Every kind the mix can name.
KINDS: dict[str, Callable[[np.random.Generator], TestImage]] = {
    "web_jpeg": web_jpeg,
    "jpeg_500x375": jpeg_500x375,
    "phone_jpeg": phone_jpeg,
    "png": png,
    "webp": webp,
}


def parse_mix(spec: str) -> dict[str, float]:
    """Parse ``"web_jpeg=70,png=10"`` into weights; raise ValueError naming the valid kinds on a mistake."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in KINDS:
            raise ValueError(f"Unknown image kind {name!r} in mix {spec!r}; choose from {', '.join(KINDS)}.")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"Weight of {name!r} in mix {spec!r} is not a number.") from None
        if value < 0:
            raise ValueError(f"Weight of {name!r} in mix {spec!r} is negative.")
        weights[name] = value
    if not weights or sum(weights.values()) <= 0:
        raise ValueError(f"Image mix {spec!r} has no positive weight; e.g. {DEFAULT_MIX!r}.")
    return {k: v for k, v in weights.items() if v > 0}


class ImageMix:
    """A pool of pre-encoded images per kind, drawn by weight: encoding happens once, not per request."""

    def __init__(self, weights: dict[str, float], per_kind: int = 4, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.weights = weights
        # Phone photos take ~0.5 s each to make; a smaller pool of them is enough variety.
        self.pools = {
            kind: [KINDS[kind](rng) for _ in range(max(1, per_kind // 2 if kind == "phone_jpeg" else per_kind))]
            for kind in weights
        }
        self._kinds = list(weights)
        self._cum = list(np.cumsum([weights[k] for k in self._kinds]))
        self._random = random.Random(seed)

    def pick(self) -> TestImage:
        """One image, its kind drawn by weight."""
        kind = self._random.choices(self._kinds, cum_weights=self._cum)[0]
        return self._random.choice(self.pools[kind])

    def describe(self) -> dict[str, dict]:
        """Per kind: weight and mean encoded size in bytes, for the report."""
        return {
            kind: {"weight": self.weights[kind], "mean_bytes": int(np.mean([len(i.data) for i in pool]))}
            for kind, pool in self.pools.items()
        }
