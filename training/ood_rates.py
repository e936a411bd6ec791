"""How often the unfamiliar-image detector fires for a stored model, per source of images and per variant, judged
so that no source counts in a figure it helped to choose.

    python -m training.ood_rates [--model TAG] [--n 300] [--images DIR] [--json FILE]

The detector's designs are fitted afresh on the model's own training and validation images (the stored ``ood.json``
is the one design training chose). Every image goes through the service's own path (``imgcls.preprocess``,
``imgcls.imagestats``, the variant's ONNX file, ``imgcls.ood``). The detector stays unsupervised: it is fitted on
the training images and its threshold set on the validation images, with no foreign image. What foreign images may
choose is the detector's design, which features it reads and how its distances combine
(:data:`imgcls.ood.CANDIDATES`); so for each foreign source the design is chosen on the *other* sources (leave one
source out: among the designs that flag at most 2% of the familiar images in every variant, the one whose worst
photograph, text or texture source is flagged most, ties broken by the demo images near the training ones), and that
source's figure is the one it gets under that choice. Every source is made or shipped offline:

- familiar: new demo images of the trained classes, and the same at three times their size (a detector must not
  flag a familiar image for its size);
- photographs: crops of matplotlib's sample photographs, and of scikit-image's (a second, independent set);
- text and screenshots: pages of rendered text (matplotlib's fonts), charts rendered by matplotlib, crops of
  scikit-image's scanned pages;
- textures: synthetic (noise, flat colours, gradients, stripes, checkerboards) and photographed (scikit-image's
  brick, grass, gravel); demo classes the model never saw; demo images transformed out of their kind (inverted,
  tiled, pixelated).

For a model trained on your own folder, only the photographs, text, textures and ``--images DIR`` apply.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from drift.reference import ReferenceError, model_folder
from drift.simulate import demo_images, folder_images
from imgcls import ood
from imgcls.imagestats import image_stats
from imgcls.model_files import DEFAULT_MODEL, ModelFiles, open_model
from imgcls.onnx_run import predict, session_for
from imgcls.preprocess import FILE_LIMITS, preprocess_bytes
from loadtest.images import encode

FAMILIAR_AT_MOST = 0.02
#: The kinds of source a detector must flag (the others, unseen or transformed demo images, are near the training).
HARD = ("photo", "text", "texture")
#: Photographs shipped inside Python packages: real photos available offline.
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
#: The photographs, the scans of text and the photographed textures that scikit-image ships in its wheel.
SKIMAGE_PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "hubble_deep_field.jpg",
                  "ihc.png", "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg")  # fmt: skip
SKIMAGE_SCANS = ("page.png", "text.png")
SKIMAGE_TEXTURES = ("brick.png", "grass.png", "gravel.png")
WORDS = (
    "invoice total amount due date customer order shipping address payment receipt item quantity price tax report "
    "summary figure table page chapter section results method data sample model version update"
).split()


def _jpeg(img: Image.Image) -> bytes:
    return encode(img.convert("RGB"), "JPEG", quality=90)


def _crops(photos: list[Image.Image], n: int, rng: np.random.Generator) -> list[bytes]:
    """``n`` square JPEG crops, a quarter to all of the short side, of ``photos`` in turn."""
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        side = int(rng.integers(min(w, h) // 4, min(w, h) + 1))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        out.append(_jpeg(img.crop((x, y, x + side, y + side))))
    return out


def matplotlib_photos(n: int, rng: np.random.Generator) -> list[bytes]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    return _crops([Image.open(folder / name).convert("RGB") for name in MATPLOTLIB_PHOTOS], n, rng)


def skimage_images(names: tuple[str, ...], n: int, rng: np.random.Generator) -> list[bytes]:
    """Crops of images in scikit-image's wheel (read as files: its loader would fetch the others from the net)."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return _crops([Image.open(folder / name).convert("RGB") for name in names], n, rng)


def _font(size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    fonts = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return ImageFont.truetype(str(fonts / "DejaVuSans.ttf"), size)


def text_pages(n: int, rng: np.random.Generator) -> list[bytes]:
    """Pages of words in black or coloured type on light paper, at sizes a photo of a page or a scan would have."""
    out = []
    for _ in range(n):
        w, h = int(rng.integers(200, 700)), int(rng.integers(200, 700))
        page = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(215, 256, 3)))
        draw, size = ImageDraw.Draw(page), int(rng.integers(10, 28))
        font, ink = _font(size), tuple(int(c) for c in rng.integers(0, 80, 3))
        y = int(rng.integers(2, size))
        while y < h - size:
            line = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
            draw.text((int(rng.integers(2, 20)), y), line, font=font, fill=ink)
            y += int(size * rng.uniform(1.2, 1.8))
        out.append(_jpeg(page) if rng.random() < 0.5 else encode(page, "PNG"))
    return out


def charts(n: int, rng: np.random.Generator) -> list[bytes]:
    """Screenshots of charts: lines, bars and scatter plots with axes, ticks, a title and a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for i in range(n):
        fig, ax = plt.subplots(figsize=(rng.uniform(3, 6), rng.uniform(2.5, 5)), dpi=80)
        x = np.arange(20)
        kind = i % 3
        if kind == 0:
            for k in range(int(rng.integers(1, 4))):
                ax.plot(x, np.cumsum(rng.normal(size=20)), label=f"series {k}")
            ax.legend()
        elif kind == 1:
            ax.bar(x[:8], rng.uniform(1, 10, 8), color=rng.uniform(0, 1, 3))
        else:
            ax.scatter(rng.normal(size=80), rng.normal(size=80), s=8)
        ax.set_title(" ".join(rng.choice(WORDS, size=3)))
        ax.grid(rng.random() < 0.5)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        out.append(buf.getvalue())
    return out


def textures(n: int, rng: np.random.Generator) -> list[bytes]:
    """Noise, flat colours, gradients, stripes and checkerboards, at random sizes and scales."""
    out = []
    for i in range(n):
        w, h = int(rng.integers(64, 512)), int(rng.integers(64, 512))
        kind = i % 5
        if kind == 0:
            arr = rng.normal(rng.uniform(60, 200), rng.uniform(10, 80), (h, w, 3))
        elif kind == 1:
            arr = np.broadcast_to(rng.integers(0, 256, 3), (h, w, 3)).astype(float)
        elif kind == 2:
            gx, gy = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
            arr = np.stack([gx, gy, 1 - gx], -1) * rng.uniform(100, 255)
        elif kind == 3:
            period = int(rng.integers(4, 40))
            arr = ((np.arange(w)[None, :, None] // period) % 2) * rng.integers(0, 256, 3) + np.zeros((h, 1, 1))
        else:
            period = int(rng.integers(4, 40))
            cells = (np.arange(h)[:, None] // period + np.arange(w)[None, :] // period) % 2
            arr = cells[..., None] * rng.integers(0, 256, 3) + (1 - cells[..., None]) * rng.integers(0, 256, 3)
        out.append(encode(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), "PNG"))
    return out


def transformed(images: list[bytes], rng: np.random.Generator) -> list[bytes]:
    """Familiar images made unlike their kind: colour-inverted, tiled 3 x 3, or pixelated."""
    out = []
    for i, data in enumerate(images):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        if i % 3 == 0:
            img = ImageOps.invert(img)
        elif i % 3 == 1:
            small = img.resize((w // 3, h // 3))
            tiled = Image.new("RGB", (small.width * 3, small.height * 3))
            for k in range(9):
                tiled.paste(small, ((k % 3) * small.width, (k // 3) * small.height))
            img = tiled
        else:
            coarse = img.resize((max(1, w // 12), max(1, h // 12)), Image.Resampling.NEAREST)
            img = coarse.resize((w, h), Image.Resampling.NEAREST)
        out.append(_jpeg(img))
    return out


def larger(images: list[bytes]) -> list[bytes]:
    """The same images at three times their size (a phone's photo of the same thing)."""
    out = []
    for data in images:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        out.append(_jpeg(img.resize((img.width * 3, img.height * 3), Image.Resampling.BICUBIC)))
    return out


@dataclass
class Source:
    name: str
    kind: str  # familiar | photo | text | texture | unseen | transformed | yours
    images: list[bytes]


def sources_for(model: str, n: int, seed: int, images: Path | None) -> list[Source]:
    rng = np.random.default_rng(seed)
    found: list[Source] = []
    try:
        familiar = demo_images(n, seed, model)
    except ValueError:  # not a demo model
        familiar = []
    if familiar:
        found += [Source("new demo images of the trained classes", "familiar", familiar),
                  Source("the same, three times larger", "familiar", larger(familiar))]  # fmt: skip
    found.append(Source("photographs: matplotlib's samples", "photo", matplotlib_photos(n, rng)))
    try:  # (a dev dependency)
        found += [Source("photographs: scikit-image's samples", "photo", skimage_images(SKIMAGE_PHOTOS, n, rng)),
                  Source("scans of text: scikit-image's", "text", skimage_images(SKIMAGE_SCANS, n, rng)),
                  Source("photographed textures: scikit-image's", "texture",
                         skimage_images(SKIMAGE_TEXTURES, n, rng))]  # fmt: skip
    except ImportError:
        pass
    found += [Source("pages of text", "text", text_pages(n, rng)), Source("charts", "text", charts(n, rng)),
              Source("textures and noise", "texture", textures(n, rng))]  # fmt: skip
    if familiar:
        try:
            found.append(Source("demo classes never trained on", "unseen", demo_images(n, seed, model, unseen=True)))
        except ValueError:
            pass
        found.append(Source("demo images inverted, tiled or pixelated", "transformed", transformed(familiar, rng)))
    if images is not None:
        found.append(Source(f"images in {images}", "yours", folder_images(images, n, seed)))
    return found


@dataclass
class Features:
    """A variant's outputs for a set of images: embeddings, probabilities, statistics."""

    embedding: np.ndarray
    probs: np.ndarray
    stats: np.ndarray  # [N, len(ood.FEATURE_STATS)]


def features(session, images: list[bytes], spec) -> Features:
    prepared = [preprocess_bytes(data, spec, FILE_LIMITS) for data in images]
    pixels = np.stack([p for p, _ in prepared])
    probs, embedding = predict(session, pixels)
    stats = ood.feature_matrix([image_stats(p, size) for p, size in prepared], probs, ood.FEATURE_STATS)
    return Features(embedding, probs, stats)


def training_features(files: ModelFiles, variant: str) -> dict[str, tuple[Features, np.ndarray]]:
    """The stored model's train and val splits through ``variant``, with their labels (demo or folder data)."""
    from training.config import TrainConfig
    from training.dataset import discover, load
    from training.pipeline import resolve_data

    cfg = TrainConfig.load(files.folder / "config.json")
    classes, splits = discover(resolve_data(cfg), cfg.seed, cfg.val_fraction, cfg.test_fraction)
    session = session_for(files.variants[variant])
    out = {}
    for name in ("train", "val"):
        loaded = load(splits[name], files.spec, cfg.workers)
        probs, embedding = predict(session, loaded.pixels)
        rows = [image_stats(p, s) for p, s in zip(loaded.pixels, loaded.sizes, strict=True)]
        stats = ood.feature_matrix(rows, probs, ood.FEATURE_STATS)
        out[name] = (Features(embedding, probs, stats), loaded.labels)
    return out


def columns(candidate: ood.Candidate) -> list[int]:
    return [ood.FEATURE_STATS.index(k) for k in candidate.inputs]


def flagged(candidate: ood.Candidate, fitted: dict, feats: Features) -> float:
    detector = fitted[candidate.name]
    return float((detector.score(feats.embedding, feats.stats[:, columns(candidate)]) > 1.0).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.ood_rates",
        description=__doc__.split("\n\n")[0],
        epilog="exit status: 0 the table was written; 2 the model or a folder was not found",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="model tag in the BentoML store (default: %(default)s)")
    p.add_argument("--n", type=int, default=300, help="images per source (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--images", type=Path, help="a folder of your own images to score as one more source")
    p.add_argument("--json", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    try:
        folder = model_folder(args.model)
        files = open_model(folder)
        sources = sources_for(args.model, args.n, args.seed, args.images)
    except (ValueError, OSError, ReferenceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    variants = [v for v in ("fp32", "fp16", "int8") if v in files.variants]
    rates: dict[str, dict[str, dict[str, float]]] = {}  # variant -> candidate -> source -> flagged share
    for variant in variants:
        fit = training_features(files, variant)
        (train, labels), (val, _) = fit["train"], fit["val"]
        fitted = {}
        for c in ood.CANDIDATES:
            fitted[c.name] = ood.fit(train.embedding, train.stats[:, columns(c)], labels, val.embedding,
                                     val.stats[:, columns(c)], candidate=c, seed=args.seed)  # fmt: skip
        session = session_for(files.variants[variant])
        feats = {s.name: features(session, s.images, files.spec) for s in sources}
        rates[variant] = {c.name: {s.name: flagged(c, fitted, feats[s.name]) for s in sources} for c in ood.CANDIDATES}
    familiar = [s.name for s in sources if s.kind == "familiar"]
    foreign = [s for s in sources if s.kind not in ("familiar", "yours")]

    def allowed(c: ood.Candidate) -> bool:
        return all(rates[v][c.name][f] <= FAMILIAR_AT_MOST for v in variants for f in familiar)

    def merit(c: ood.Candidate, excluded: str | None) -> tuple[float, float]:
        """The worst share flagged of the sources that must be (photographs, text, textures), to a per cent; then
        the mean over the near ones (demo classes never trained on, transformed demo images)."""
        used = [s for s in foreign if s.name != excluded]
        hard = [rates[v][c.name][s.name] for v in variants for s in used if s.kind in HARD]
        near = [rates[v][c.name][s.name] for v in variants for s in used if s.kind not in HARD]
        return round(min(hard, default=0.0), 2), float(np.mean(near)) if near else 0.0

    def choose(excluded: str | None) -> ood.Candidate:
        """The candidate of most merit with ``excluded`` left out, among those within the familiar limit."""
        pool = [c for c in ood.CANDIDATES if allowed(c)] or list(ood.CANDIDATES)
        return max(pool, key=lambda c: merit(c, excluded))

    shipped = choose(None)
    print(f"{folder.parent.name}:{folder.name}, {args.n} images per source; features chosen on all sources: "
          f"{shipped.name} (the one training fits: {ood.DEFAULT.name})")  # fmt: skip
    print("| source | kind | chosen without it | " + " | ".join(variants) + " |")
    print("|---|---|---|" + "---:|" * len(variants))
    rows = []
    for s in sources:
        chosen = choose(s.name) if s in foreign else shipped
        cells = {v: rates[v][chosen.name][s.name] for v in variants}
        rows.append({"source": s.name, "kind": s.kind, "images": len(s.images), "features": chosen.name, **cells})
        print(
            f"| {s.name} | {s.kind} | {chosen.name} | " + " | ".join(f"{100 * x:.1f}%" for x in cells.values()) + " |"
        )
    if args.json:
        args.json.write_text(json.dumps({"model": f"{folder.parent.name}:{folder.name}", "rows": rows,
                                         "rates": rates}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
