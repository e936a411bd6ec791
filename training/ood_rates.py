"""How often a stored model's unfamiliar-image detector fires, per kind of image and per variant.

    python -m training.ood_rates [--model TAG] [--n 300] [--images DIR] [--json FILE]

Each group of images goes through the service's own path (``imgcls.preprocess``, ``imgcls.imagestats``, the
ONNX file of the variant, ``imgcls.ood``) and the share scored above 1.0 is printed. For a model trained on
the demo data: new demo images of its classes (should be about 1%), demo classes it never saw, pages of text
(the drift simulator's ``document`` shift) and crops of the photographs that ship with matplotlib. ``--images``
adds a folder of your own, for example photos the model should call unfamiliar, or new photos it should not.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from drift.reference import ReferenceError, model_folder
from drift.simulate import demo_images, folder_images, shift_image
from imgcls.imagestats import image_stats
from imgcls.model_files import DEFAULT_MODEL, ModelFiles, open_model
from imgcls.onnx_run import predict, session_for
from imgcls.preprocess import FILE_LIMITS, preprocess_bytes

#: Photographs in matplotlib's own package data: real photos available offline.
SAMPLE_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")


def photo_crops(n: int, seed: int) -> list[bytes]:
    """``n`` square JPEG crops, a quarter to all of the short side, of matplotlib's sample photographs."""
    import matplotlib

    rng = np.random.default_rng(seed)
    photos = [
        Image.open(Path(matplotlib.get_data_path()) / "sample_data" / name).convert("RGB") for name in SAMPLE_PHOTOS
    ]
    crops = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        side = int(rng.integers(min(w, h) // 4, min(w, h)))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        buf = io.BytesIO()
        img.crop((x, y, x + side, y + side)).save(buf, "JPEG", quality=90)
        crops.append(buf.getvalue())
    return crops


def groups_for(model: str, n: int, seed: int, images: Path | None) -> dict[str, list[bytes]]:
    """The image groups to score: the demo ones when ``model`` was trained on demo data, then ``images``."""
    groups: dict[str, list[bytes]] = {}
    try:
        familiar = demo_images(n, seed, model)
    except ValueError:  # not a demo model: only the user's folder and the photographs say anything
        familiar = []
    if familiar:
        groups["new demo images (familiar)"] = familiar
        try:
            groups["demo classes never trained on"] = demo_images(n, seed, model, unseen=True)
        except ValueError:
            pass
        rng = np.random.default_rng(seed)
        groups["pages of text (document shift)"] = [shift_image(b, "document", rng)[0] for b in familiar]
    groups["crops of real photographs"] = photo_crops(n, seed)
    if images is not None:
        groups[f"images in {images}"] = folder_images(images, n, seed)
    return groups


def flagged_share(files: ModelFiles, variant: str, images: list[bytes]) -> tuple[float, float]:
    """(share scored above 1.0, median score) of ``images`` for ``variant``."""
    prepared = [preprocess_bytes(data, files.spec, FILE_LIMITS) for data in images]
    pixels = np.stack([p for p, _ in prepared])
    stats = [image_stats(p, size) for p, size in prepared]
    _, embedding = predict(session_for(files.variants[variant]), pixels)
    scores = files.detectors[variant].score(embedding, stats)
    return float((scores > 1.0).mean()), float(np.median(scores))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.ood_rates", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model tag in the BentoML store (default: %(default)s)")
    p.add_argument("--n", type=int, default=300, help="images per group (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=Path, help="a folder of your own images to score as one more group")
    p.add_argument("--json", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    try:
        folder = model_folder(args.model)
        files = open_model(folder)
        groups = groups_for(args.model, args.n, args.seed, args.images)
    except (ValueError, OSError, ReferenceError) as exc:  # drift.reference's: not in the store
        print(f"error: {exc}", file=sys.stderr)
        return 2
    variants = [v for v in ("fp32", "fp16", "int8") if v in files.variants and v in files.detectors]
    rows = []
    print(f"{folder.parent.name}:{folder.name}: share of images scored unfamiliar (median score), {args.n} per group")
    print(f"{'images':34s}" + "".join(f"{v:>18s}" for v in variants))
    for name, images in groups.items():
        cells = {v: flagged_share(files, v, images) for v in variants}
        rows.append(
            {"group": name, "images": len(images), **{v: {"share": s, "median": m} for v, (s, m) in cells.items()}}
        )
        print(f"{name:34s}" + "".join(f"{100 * s:9.1f}% ({m:5.2f})" for s, m in cells.values()))
    if args.json:
        args.json.write_text(json.dumps({"model": f"{folder.parent.name}:{folder.name}", "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
