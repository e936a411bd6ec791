"""`python tools/decode_cost.py`: the decode cost the service estimates from a file's structure, against the CPU time
the decode takes, for the kinds of image that cost the most (docs/reliability.md).

For each image it prints the estimate (``imgcls.preprocess.plan_decode``: work and memory in decoded pixels' worth),
the CPU time of decoding it as the service does (best of a few runs), and the time per million units: the model is
right where that last column stays about the same from one kind of image to the next. Writes the table as JSON too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imgcls.preprocess import DecodeLimits, PreprocessSpec, open_image, plan_decode, preprocess_bytes  # noqa: E402
from loadtest.images import encode, repeat_last_scan  # noqa: E402

SPEC = PreprocessSpec(size=224)
UNLIMITED = DecodeLimits(max_pixels=150_000_000, max_decode_pixels=10**12)


def photo(w: int, h: int) -> Image.Image:
    """A gradient with noise: as costly to entropy-code as a detailed photo."""
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    rgb = np.stack([x, y, 255 - x], axis=-1) + np.random.default_rng(0).normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def images() -> dict[str, bytes]:
    big, flat = photo(4032, 3024), Image.new("RGB", (4000, 4000), (9, 99, 200))
    return {
        "JPEG 500x375 baseline": encode(photo(500, 375), "JPEG", quality=90),
        "JPEG 4032x3024 baseline 4:2:0": encode(big, "JPEG", quality=90),
        "JPEG 4032x3024 baseline 4:4:4": encode(big, "JPEG", quality=90, subsampling=0),
        "JPEG 4032x3024 progressive 4:2:0": encode(big, "JPEG", quality=90, progressive=True),
        "JPEG 4032x3024 progressive 4:4:4": encode(big, "JPEG", quality=90, progressive=True, subsampling=0),
        "JPEG 2000x2000 progressive + 50 scans": repeat_last_scan(
            encode(photo(2000, 2000), "JPEG", quality=90, progressive=True, subsampling=0), 50
        ),
        "JPEG 7000x7000 one colour progressive + 50 scans": repeat_last_scan(
            encode(Image.new("RGB", (7000, 7000), (90, 140, 200)), "JPEG", progressive=True, subsampling=0), 50
        ),
        "PNG 2000x2000": encode(photo(2000, 2000), "PNG"),
        "WebP 1024x768 lossy": encode(photo(1024, 768), "WEBP"),
        "WebP 4000x4000 lossless, one colour": encode(flat, "WEBP", lossless=True),
    }


def measure(data: bytes, runs: int) -> tuple[int, float]:
    img = open_image(data, UNLIMITED)
    units = plan_decode(img, SPEC, UNLIMITED, data).units
    best = float("inf")
    for _ in range(runs):
        started = time.process_time()
        preprocess_bytes(data, SPEC, UNLIMITED)
        best = min(best, time.process_time() - started)
    return units, best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/decode_cost.py", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="decodes per image; the fastest counts (%(default)s)")
    parser.add_argument("--out", type=Path, default=Path("results/decode_cost.json"), help="(%(default)s)")
    args = parser.parse_args(argv)
    rows = []
    print("| image | KB | estimated units (M) | CPU ms | ms per M units |\n|---|---:|---:|---:|---:|")
    for name, data in images().items():
        units, seconds = measure(data, args.runs)
        rows.append({"image": name, "bytes": len(data), "units": units, "cpu_s": seconds})
        print(f"| {name} | {len(data) >> 10} | {units / 1e6:.2f} | {seconds * 1000:.1f} | "
              f"{seconds * 1000 / (units / 1e6):.1f} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
