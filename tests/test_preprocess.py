"""The shared decode path: every unusual-but-valid image becomes a model input; bad input gets a clear 4xx."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imgcls.errors import ApiError
from imgcls.imagestats import STAT_FIELDS, image_stats
from imgcls.preprocess import DecodeLimits, PreprocessSpec, preprocess_bytes, resize
from tests.helpers import costly_webp, encode, png_bomb

SPEC = PreprocessSpec(size=32)


def gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def exif_rotated_jpeg() -> bytes:
    """A 60x30 landscape stored with orientation 6 (display rotated 90 degrees: portrait 30x60)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(gradient(60, 30), "JPEG", exif=exif.tobytes())


UNUSUAL = {
    "cmyk_jpeg": lambda: encode(gradient(40, 30).convert("CMYK"), "JPEG"),
    "grayscale_png": lambda: encode(gradient(40, 30).convert("L"), "PNG"),
    "png_16bit": lambda: encode(Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)), "PNG"),
    "la_png": lambda: encode(gradient(40, 30).convert("LA"), "PNG"),
    "palette_transparency": lambda: encode(gradient(40, 30).convert("P"), "PNG", transparency=0),
    "rgba_png": lambda: encode(gradient(40, 30).convert("RGBA"), "PNG"),
    "one_pixel": lambda: encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
    "tall_strip": lambda: encode(gradient(3, 2000), "PNG"),
    "wide_strip": lambda: encode(gradient(2000, 3), "JPEG"),
    "progressive_jpeg": lambda: encode(gradient(400, 300), "JPEG", progressive=True, quality=80),
    "webp": lambda: encode(gradient(40, 30), "WEBP"),
    "bmp": lambda: encode(gradient(40, 30), "BMP"),
    "gif": lambda: encode(gradient(40, 30).convert("P"), "GIF"),
    "tiff": lambda: encode(gradient(40, 30), "TIFF"),
    "exif_rotated": exif_rotated_jpeg,
}


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_unusual_valid_images_become_model_inputs(name):
    pixels, size = preprocess_bytes(UNUSUAL[name](), SPEC)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    stats = image_stats(pixels, size)
    assert list(stats) == list(STAT_FIELDS) and all(np.isfinite(v) for v in stats.values())


def plain_stats(pixels: np.ndarray) -> dict[str, float]:
    """The content statistics as their definitions read (imgcls/imagestats.py computes them with fewer calls)."""
    step = max(1, min(pixels.shape[:2]) // 64)
    r, g, b = (pixels[::step, ::step, c].astype(np.float64) for c in range(3))
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    lap = 4 * luma[1:-1, 1:-1] - luma[:-2, 1:-1] - luma[2:, 1:-1] - luma[1:-1, :-2] - luma[1:-1, 2:]
    rg, yb = r - g, 0.5 * (r + g) - b
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    p = np.bincount(luma.astype(np.uint8).ravel(), minlength=256) / luma.size
    p = p[p > 0]
    return {
        "brightness": luma.mean() / 255,
        "contrast": luma.std() / 255,
        "sharpness": np.log1p(lap.var()),
        "colorfulness": (np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())) / 255,
        "saturation": np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0).mean(),
        "entropy": -(p * np.log2(p)).sum(),
    }


@pytest.mark.parametrize("side", [8, 32, 127, 128, 224, 384])
@pytest.mark.parametrize("kind", ["noise", "flat", "black", "photo"])
def test_image_statistics_agree_with_their_definitions(side, kind):
    rng = np.random.default_rng(side)
    pixels = {
        "noise": lambda: rng.integers(0, 256, (side, side, 3), dtype=np.uint8),
        "flat": lambda: np.full((side, side, 3), 77, np.uint8),
        "black": lambda: np.zeros((side, side, 3), np.uint8),
        "photo": lambda: np.asarray(gradient(side, side).resize((side, side)).rotate(17)),
    }[kind]()
    stats = image_stats(pixels, (side * 2, side))
    for name, value in plain_stats(pixels).items():
        # A luma that rounds to just below a whole number lands in the histogram bin below, in either order of sums.
        rel = 1e-4 if name == "entropy" else 1e-9
        assert stats[name] == pytest.approx(value, rel=rel, abs=1e-9), name
    assert (stats["width"], stats["height"], stats["aspect_ratio"]) == (side * 2, side, 2.0)


@pytest.mark.parametrize("size", [(500, 375), (4032, 3024), (300, 1000), (225, 224), (224, 224), (60, 30)])
def test_resizing_only_the_cropped_region_matches_resizing_all_then_cropping(size):
    w, h = size
    img = Image.fromarray(np.random.default_rng(w).integers(0, 256, (h, w, 3), dtype=np.uint8))
    scale = 224 / min(w, h)
    nw, nh = max(224, round(w * scale)), max(224, round(h * scale))
    left, top = (nw - 224) // 2, (nh - 224) // 2
    whole = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0).crop((left, top, left + 224, top + 224))
    diff = np.abs(resize(img, PreprocessSpec(size=224)).astype(int) - np.asarray(whole, dtype=int))
    assert diff.max() <= 1 and diff.mean() < 0.002


def test_exif_orientation_is_applied_and_reported():
    _, size = preprocess_bytes(exif_rotated_jpeg(), SPEC)
    assert size == (30, 60)


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    pixels, _ = preprocess_bytes(encode(clear, "PNG"), SPEC)
    assert pixels.min() == 255


def test_large_jpeg_decodes_at_reduced_scale_with_true_size():
    pixels, size = preprocess_bytes(encode(gradient(4032, 3024), "JPEG", quality=85), PreprocessSpec(size=224))
    assert pixels.shape == (224, 224, 3) and size == (4032, 3024)


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "empty_image"),
        (b"this is not an image", 400, "undecodable_image"),
        (encode(gradient(200, 200), "JPEG")[:600], 400, "undecodable_image"),
        (b"%PDF-1.4\n" + b"0" * 100, 400, "undecodable_image"),
        (png_bomb(), 413, "too_many_pixels"),
        (costly_webp(5000), 413, "too_costly_to_decode"),
    ],
    ids=["empty", "garbage", "truncated_jpeg", "pdf", "png_bomb", "webp_5000x5000"],
)
def test_bad_input_raises_a_client_error(data, status, code):
    with pytest.raises(ApiError) as err:
        preprocess_bytes(data, SPEC)
    assert (err.value.status, err.value.code) == (status, code)
    assert err.value.detail


def test_unsupported_format_is_415():
    ico = encode(gradient(32, 32), "ICO")
    with pytest.raises(ApiError) as err:
        preprocess_bytes(ico, SPEC)
    assert err.value.status == 415


def test_pixel_limit_is_configurable():
    data = encode(gradient(100, 100), "PNG")
    with pytest.raises(ApiError) as err:
        preprocess_bytes(data, SPEC, DecodeLimits(max_pixels=9_999))
    assert err.value.status == 413
    preprocess_bytes(data, SPEC, DecodeLimits(max_pixels=10_000))


def test_spec_round_trips_through_json(tmp_path):
    spec = PreprocessSpec(size=96, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    spec.save(tmp_path / "preprocess.json")
    assert PreprocessSpec.load(tmp_path / "preprocess.json") == spec


def test_jpeg_decodes_within_the_budget_that_refuses_other_formats_of_the_same_size():
    """A 12 MP JPEG decodes at 1/8 scale, well inside a 2 MP budget; the same photo as PNG is refused."""
    limits = DecodeLimits(max_decode_pixels=2_000_000)
    big = gradient(4032, 3024)
    pixels, _ = preprocess_bytes(encode(big, "JPEG", quality=80), PreprocessSpec(size=224), limits)
    assert pixels.shape == (224, 224, 3)
    with pytest.raises(ApiError) as err:
        preprocess_bytes(encode(big, "PNG", compress_level=1), SPEC, limits)
    assert (err.value.status, err.value.code) == (413, "too_costly_to_decode")


def test_only_the_first_frame_of_an_animation_is_read():
    frames = [Image.new("RGB", (40, 30), (255, 0, 0))] + [Image.new("RGB", (40, 30), (0, 0, 255))] * 50
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    pixels, _ = preprocess_bytes(gif, SPEC)
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50  # red: frame 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("interpolation", "lanczos"), ("size", 0), ("std", (0.2, 0.0, 0.2)), ("resize", "stretch"), ("mean", (0.5,))],
)
def test_an_unusable_spec_is_refused_with_the_field_named(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        PreprocessSpec(**{field: value})
    path = tmp_path / "preprocess.json"
    path.write_text('{"size": 32, "interpolation": "nearest-ish"}')
    with pytest.raises(ValueError, match="preprocess.json"):
        PreprocessSpec.load(path)
