"""Image decoding and resizing: the one preprocessing path shared by training, serving and drift.

The exported ONNX graph takes uint8 NHWC pixels at the model's input size and does the float
conversion and normalisation itself, so everything outside the graph is here: decode, apply EXIF
orientation, bring any mode to RGB, resize the shorter side and centre-crop to a square.

An upload is checked from its header and structure before anything is decoded, against two budgets
(:class:`DecodeLimits`): the pixels it declares, and what its decode will cost in CPU and memory
(:class:`DecodeCost`). JPEG decodes at a reduced scale (1/2 to 1/8) that still covers the model's input, so a
48 MP photo produces a sub-megapixel image, but its entropy-coded data is still read in full, once per scan of a
progressive file; every other format decodes in full, and a 2 KB lossless WebP can declare 7000x7000 pixels.
Only the first frame of an animation or a multi-page file is ever read.
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from imgcls.errors import ApiError

#: Formats the service accepts; anything else Pillow can open is refused with 415.
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
ACCEPTED_NAMES = "JPEG, PNG, WebP, BMP, GIF (first frame) or TIFF"
#: File suffixes of those formats, for folders of images (training data, the drift simulator).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
#: Formats that decode at a reduced scale (libjpeg's DCT scaling).
SCALED_DECODE = frozenset({"JPEG", "MPO"})
SPEC_FILE = "preprocess.json"
RESIZE_METHODS = ("shorter_side_center_crop",)
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class DecodeLimits:
    """What one upload may cost. ``max_pixels``: pixels its header may declare (50 MP lets 48 MP phone photos
    through). ``max_decode_pixels``: the CPU and memory its decode may take, in decoded pixels' worth
    (:class:`DecodeCost`): 16 MP bounds a decode to a few tenths of a second of CPU and a few hundred MB."""

    max_pixels: int = 50_000_000
    max_decode_pixels: int = 16_000_000


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
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.size, int) or not 8 <= self.size <= 4096:
            problems.append(f"size {self.size!r} is not an integer between 8 and 4096")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, int | float) for v in values):
                problems.append(f"{name} {values!r} is not three numbers")
        if len(self.std) == 3 and not all(isinstance(v, int | float) and v > 0 for v in self.std):
            problems.append(f"std {self.std!r} has a value that is not positive")
        if len(self.background) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in self.background):
            problems.append(f"background {self.background!r} is not three integers in 0..255")
        if self.resize not in RESIZE_METHODS:
            problems.append(f"resize {self.resize!r} is not one of {', '.join(RESIZE_METHODS)}")
        if self.interpolation not in _RESAMPLE:
            problems.append(f"interpolation {self.interpolation!r} is not one of {', '.join(_RESAMPLE)}")
        if (self.layout, self.dtype) != ("NHWC", "uint8"):
            problems.append(
                f"layout/dtype {self.layout}/{self.dtype} is not NHWC/uint8, the only input the graph takes"
            )
        if problems:
            raise ValueError("invalid preprocessing spec: " + "; ".join(problems))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PreprocessSpec:
        """The spec in ``path``; ValueError naming the file and the problem when it is unusable."""
        try:
            raw = json.loads(Path(path).read_text())
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            for key in ("mean", "std", "background"):
                if key in raw:
                    raw[key] = tuple(raw[key])
            return cls(**raw)
        except (OSError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc


#: Text metadata a PNG may carry, inflated when it is opened (Pillow's default is 64 MB).
PNG_TEXT_BYTES = 1 << 20
PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_BYTES
#: Bytes a decode holds per pixel it produces (Pillow keeps RGB as 4 bytes a pixel).
BYTES_PER_PIXEL = 4
#: JPEG work in decoded pixels' worth, from timings of libjpeg-turbo (docs/reliability.md): each pass over an 8x8
#: block (every block, once per scan of a progressive file), and each byte of entropy-coded data.
JPEG_BLOCK_PASS = 0.9
JPEG_BYTE = {False: 0.6, True: 1.5}  # baseline, progressive (refinement scans cost more per byte)
#: A progressive JPEG keeps every coefficient of the image while it decodes: 64 of 2 bytes per block.
JPEG_COEFFICIENT_BYTES = 128
SOS = b"\xff\xda"  # a JPEG start-of-scan marker; the entropy-coded data between scans never holds one
#: The most pixels Pillow opens at all (twice its MAX_IMAGE_PIXELS), so the highest pixel limit that can be set.
PILLOW_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
_BOMB_SIZE = re.compile(r"\((\d+) pixels\)")


@dataclass(frozen=True)
class DecodeCost:
    """What decoding an opened image will cost, from its header and structure, before anything is decoded:
    ``pixels`` produced, ``work`` (CPU, in decoded pixels' worth) and ``memory`` (bytes held)."""

    pixels: int
    work: int
    memory: int

    @property
    def units(self) -> int:
        """The larger of its CPU and memory cost, in decoded pixels' worth: what ``max_decode_pixels`` bounds."""
        return max(self.work, self.memory // BYTES_PER_PIXEL)


def _too_many_pixels(width: int, height: int, limit: int) -> ApiError:
    return ApiError(
        413,
        "too_many_pixels",
        f"Image is {width}x{height} = {width * height:,} pixels; the limit is {limit:,} (IMGCLS_MAX_PIXELS). "
        "Downscale it first.",
    )


def open_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Identify an upload from its header; refuse empty, unknown, unsupported or oversized images.

    Nothing is decoded yet, so a 40000x40000 PNG bomb costs a few microseconds.
    """
    if not data:
        raise ApiError(400, "empty_image", "The uploaded file is empty; send the image bytes.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # limits.max_pixels decides, below
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # over twice Pillow's MAX_IMAGE_PIXELS: it opens no such image
        found = _BOMB_SIZE.search(str(exc))
        pixels = f"{int(found.group(1)):,} pixels" if found else "more pixels than Pillow opens"
        raise ApiError(
            413,
            "too_many_pixels",
            f"Image is {pixels}; the limit is {min(limits.max_pixels, PILLOW_MAX_PIXELS):,} (IMGCLS_MAX_PIXELS). "
            "Downscale it first.",
        ) from None
    except ValueError as exc:
        if "text chunk" not in str(exc):
            raise ApiError(
                400, "undecodable_image", f"The file is not an image that can be read; send {ACCEPTED_NAMES}."
            ) from exc
        raise ApiError(
            413,
            "too_costly_to_decode",
            f"The PNG carries more than {PNG_TEXT_BYTES >> 20} MiB of text metadata; re-save it without.",
        ) from None
    except Exception as exc:  # Pillow raises several types for garbage input
        raise ApiError(
            400, "undecodable_image", f"The file is not an image that can be read; send {ACCEPTED_NAMES}."
        ) from exc
    if img.format not in ACCEPTED_FORMATS:
        raise ApiError(415, "unsupported_format", f"Image format {img.format} is not supported; send {ACCEPTED_NAMES}.")
    width, height = img.size
    if width * height > limits.max_pixels:
        raise _too_many_pixels(width, height, limits.max_pixels)
    return img


def _jpeg_blocks(img: Image.Image, width: int, height: int) -> int:
    """8x8 blocks of coefficients in a JPEG of ``width`` x ``height``, over its components and their sampling."""
    layers = getattr(img, "layer", None) or [("", 1, 1, 0)] * len(img.getbands())
    h_max = max(layer[1] for layer in layers) or 1
    v_max = max(layer[2] for layer in layers) or 1
    return sum(
        math.ceil(math.ceil(width * layer[1] / h_max) / 8) * math.ceil(math.ceil(height * layer[2] / v_max) / 8)
        for layer in layers
    )


def plan_decode(
    img: Image.Image, spec: PreprocessSpec, limits: DecodeLimits = DecodeLimits(), data: bytes = b""
) -> DecodeCost:
    """Set up the decode of an opened image and return what it will cost; 413 when over the budget.

    JPEG decodes at the smallest scale (1/2, 1/4, 1/8) that still covers the target size, but its entropy-coded
    data is read in full, once per scan of a progressive file, whose coefficients are all held meanwhile; ``data``
    (the file) tells its scans and their bytes, and a file too short for its declared size is refused (400) as
    truncated. Every other format decodes in full. Nothing is decoded yet.
    """
    width, height = img.size  # as declared
    work = memory = 0
    what = f"A {img.format} image of {width}x{height} pixels, which must be decoded in full,"
    advice = "downscale it or send a JPEG"
    if img.format in SCALED_DECODE:
        # EXIF rotation by 90 degrees swaps axes, but draft keeps both sides >= the target anyway.
        img.draft("RGB", (spec.size, spec.size))
        if data:
            blocks = _jpeg_blocks(img, width, height)
            first_scan = data.find(SOS)
            coded = len(data) - first_scan if first_scan >= 0 else 0
            if coded * 8 < blocks:  # every block is coded with at least one bit
                raise ApiError(
                    400,
                    "undecodable_image",
                    f"The JPEG declares {width}x{height} pixels but holds data for far fewer: it is truncated. "
                    "Send the whole file.",
                )
            progressive = bool(img.info.get("progressive") or img.info.get("progression"))
            scans = data.count(SOS, first_scan) if progressive else 1
            work = int(blocks * scans * JPEG_BLOCK_PASS + coded * JPEG_BYTE[progressive])
            memory = blocks * JPEG_COEFFICIENT_BYTES if progressive else 0
            what = f"A {'progressive ' if progressive else ''}JPEG of {width}x{height} pixels in {scans} scan(s)"
            advice = "downscale it, or save it as a baseline JPEG"
    out_w, out_h = img.size  # after draft: what the decoder will produce
    cost = DecodeCost(out_w * out_h, out_w * out_h + work, out_w * out_h * BYTES_PER_PIXEL + memory)
    if cost.units > limits.max_decode_pixels:
        raise ApiError(
            413,
            "too_costly_to_decode",
            f"{what} costs as much to decode as {cost.units:,} pixels, over the {limits.max_decode_pixels:,} pixel "
            f"budget (IMGCLS_MAX_DECODE_PIXELS); {advice}.",
        )
    return cost


def to_rgb(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Decode the first frame (as planned by :func:`plan_decode`) to an upright RGB image, compositing
    transparency on the spec's background colour."""
    try:
        img.load()  # the current frame: the first, as opened (n_frames would scan every frame)
        ImageOps.exif_transpose(img, in_place=True)  # turned upright in place; no copy of an upright photo
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
        return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image
    except Exception as exc:
        raise ApiError(
            400, "undecodable_image", f"The image could not be decoded ({exc}); it may be truncated."
        ) from exc


def resize(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize the shorter side to ``spec.size`` and centre-crop: uint8 array (size, size, 3)."""
    w, h = img.size
    s = spec.size
    scale = s / min(w, h)
    nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
    left, top = (nw - s) // 2, (nh - s) // 2
    # Only the source region under the crop is resampled (filter taps still reach the pixels around it): the same
    # pixels as resizing all and cropping, give or take one level in about 1 in 5,000 values, with a quarter less
    # work on a 4:3 photo. reducing_gap keeps large downscales cheap and alias-free without a second pass.
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + s) * sx, (top + s) * sy)
    out = img.resize((s, s), _RESAMPLE[spec.interpolation], box=box, reducing_gap=3.0)
    return np.asarray(out, dtype=np.uint8)


def upright_size(img: Image.Image) -> tuple[int, int]:
    """The (width, height) of the image as displayed, after its EXIF orientation."""
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is not worth refusing the photo for
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def preprocess_bytes(
    data: bytes, spec: PreprocessSpec, limits: DecodeLimits = DecodeLimits()
) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes of an upload to the model's uint8 HWC input, plus the original (width, height); ApiError if unusable."""
    img = open_image(data, limits)
    size = upright_size(img)  # before draft mode shrinks img.size
    plan_decode(img, spec, limits, data)
    return resize(to_rgb(img, spec), spec), size


#: Files a user trains on are trusted: only Pillow's own decompression-bomb ceiling applies.
FILE_LIMITS = DecodeLimits(max_pixels=Image.MAX_IMAGE_PIXELS, max_decode_pixels=Image.MAX_IMAGE_PIXELS)


def preprocess_file(path: str | Path, spec: PreprocessSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """Same as :func:`preprocess_bytes` for a file on disk (training and reference statistics)."""
    return preprocess_bytes(Path(path).read_bytes(), spec, FILE_LIMITS)
