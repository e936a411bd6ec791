"""Image decoding and resizing: the one preprocessing path shared by training, serving and drift.

The exported ONNX graph takes uint8 NHWC pixels at the model's input size and does the float
conversion and normalisation itself, so everything outside the graph is here: decode, apply EXIF
orientation, bring any mode to RGB, resize the shorter side and centre-crop to a square.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

#: Formats the service accepts. TIFF is included; anything else Pillow opens is refused with 415.
ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})
#: 50 MP: 48 MP phone photos pass, decompression bombs are refused before decoding.
DEFAULT_MAX_PIXELS = 50_000_000
SPEC_FILE = "preprocess.json"


@dataclass(frozen=True)
class PreprocessSpec:
    """What the model expects; stored with the model as ``preprocess.json`` and read everywhere."""

    size: int = 64
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize: str = "shorter_side_center_crop"
    interpolation: str = "bilinear"
    layout: str = "NHWC"
    dtype: str = "uint8"
    background: tuple[int, int, int] = field(default=(255, 255, 255))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PreprocessSpec:
        raw = json.loads(Path(path).read_text())
        for key in ("mean", "std", "background"):
            if key in raw:
                raw[key] = tuple(raw[key])
        return cls(**raw)


class ImageError(ValueError):
    """A client-side problem with an uploaded image: carries the HTTP status and a short code."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Identify an upload from its header; refuse empty, unknown, unsupported or oversized images.

    Nothing is decoded yet: the pixel count is checked against ``max_pixels`` from the header alone,
    so a 40000x40000 PNG bomb costs a few microseconds.
    """
    if not data:
        raise ImageError(400, "empty_image", "The uploaded file is empty; send the image bytes.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(413, "too_many_pixels", f"Image has too many pixels: {exc}") from exc
    except Exception as exc:  # Pillow raises several types for garbage input
        raise ImageError(
            400, "undecodable_image", "The file is not an image Pillow can read (JPEG, PNG, WebP, BMP, GIF, TIFF)."
        ) from exc
    if img.format not in ACCEPTED_FORMATS:
        raise ImageError(
            415, "unsupported_format", f"Image format {img.format} is not supported; send JPEG, PNG, WebP, BMP or GIF."
        )
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            413,
            "too_many_pixels",
            f"Image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}. Downscale it first.",
        )
    return img


def to_rgb(img: Image.Image, spec: PreprocessSpec, draft: bool = True) -> Image.Image:
    """Decode to an upright RGB image, compositing transparency on the spec's background colour.

    ``draft`` lets libjpeg decode at a reduced scale (1/2, 1/4, 1/8) that still covers the target
    size, so a 12 MP photo costs a fraction of a full decode.
    """
    try:
        if draft and img.format in ("JPEG", "MPO"):
            # EXIF rotation by 90 degrees swaps axes, but draft keeps both sides >= the target anyway.
            img.draft("RGB", (spec.size, spec.size))
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            base = Image.new("RGB", rgba.size, spec.background)
            base.paste(rgba, mask=rgba.getchannel("A"))
            return base
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit greyscale: scale to 8 bits instead of letting Pillow clip at 255.
            arr = np.asarray(img, dtype=np.float32)
            hi = 65535.0 if arr.max() > 255 else 255.0
            img = Image.fromarray(np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8), "L")
        return img.convert("RGB")
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(
            400, "undecodable_image", f"The image could not be decoded ({exc}); it may be truncated."
        ) from exc


def resize(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize the shorter side to ``spec.size`` and centre-crop: uint8 array (size, size, 3)."""
    w, h = img.size
    s = spec.size
    scale = s / min(w, h)
    nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
    left, top = (nw - s) // 2, (nh - s) // 2
    # reducing_gap keeps large downscales cheap and alias-free without a second pass.
    out = img.resize((nw, nh), _RESAMPLE[spec.interpolation], reducing_gap=3.0).crop((left, top, left + s, top + s))
    return np.asarray(out, dtype=np.uint8)


def preprocess_bytes(
    data: bytes, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes of an upload to the model's uint8 HWC input, plus the original (width, height)."""
    img = open_image(data, max_pixels)
    size = upright_size(img)  # before draft mode shrinks img.size
    return resize(to_rgb(img, spec), spec), size


def upright_size(img: Image.Image) -> tuple[int, int]:
    """The (width, height) of the image as displayed, after its EXIF orientation."""
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is not worth refusing the photo for
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def preprocess_file(path: str | Path, spec: PreprocessSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """Same as :func:`preprocess_bytes` for a file on disk (training and reference statistics)."""
    return preprocess_bytes(Path(path).read_bytes(), spec)
