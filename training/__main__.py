"""`python -m training --demo` or `python -m training --data FOLDER [--key value ...]`: train, export and store."""

from __future__ import annotations

import logging
import sys

from training.config import ConfigError, TrainConfig, help_text, parse_overrides
from training.dataset import DatasetError

USAGE = """usage: python -m training (--demo | --data FOLDER) [--key value ...]

Trains a classifier, exports ONNX fp32/fp16/int8, checks them, writes each variant's drift reference and
unfamiliar-image detector and saves one model to the BentoML model store (BENTOML_HOME). FOLDER holds one
subfolder of images (JPEG, PNG, WebP, BMP, GIF, TIFF) per class, or train/ val/ [test/] folders each holding
those. A run writes into RUN.partial and renames it to RUN when it finished. Examples:

  python -m training --demo
  python -m training --data ~/photos --epochs 20 --image-size 96
  python -m training --demo --arch resnet18 --image-size 224 --epochs 0 --name image-classifier-r18

options (default, meaning):
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + help_text())
        return 0 if argv else 2
    # Our progress at INFO; libraries (onnxruntime's quantiser logs every tensor on the root logger) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)
    try:
        cfg = parse_overrides(argv, TrainConfig()).validate()
        from training.pipeline import run

        result = run(cfg)
    except (ConfigError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = result.metrics
    print(f"\nrun folder: {result.run_dir}")
    print(
        f"test accuracy ({m['test_images']} images): "
        + ", ".join(f"{k} {100 * v:.2f}%" for k, v in m["accuracy"].items())
    )
    print(
        f"int8 drop: {m['int8_drop_points']:.2f} points; int8 vs fp32 at batch {m['speed']['batch']}: "
        f"{m['speed']['int8_vs_fp32']:.2f}x (short check)"
    )
    flagged = ", ".join(f"{v} {100 * u['flagged_test']:.1f}%" for v, u in m["unfamiliar"].items())
    print(f"test images flagged as unfamiliar (about 1% expected): {flagged}")
    if result.tag:
        print(f"model: {result.tag}   (bentoml models get {result.tag})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
