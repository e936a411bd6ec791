"""`python -m training --demo` or `python -m training --data FOLDER [--key value ...]`: train, export and store."""

from __future__ import annotations

import logging
import sys

from imgcls.model_files import DEFAULT_MODEL
from training.config import ConfigError, TrainConfig, help_text, parse_overrides
from training.dataset import DatasetError

USAGE = """usage: python -m training (--demo | --data FOLDER) [--key value ...]

Trains a classifier, exports ONNX fp32/fp16/int8, checks them, writes each variant's drift reference and
unfamiliar-image detector and saves one model to the BentoML model store (BENTOML_HOME). FOLDER holds one
subfolder of images (JPEG, PNG, WebP, BMP, GIF, TIFF) per class, or train/ val/ [test/] folders each holding
those. A run writes into RUN.partial and renames it to RUN when it finished. Examples:

  python -m training --demo                        # stored as image-classifier
  python -m training --data ~/photos --epochs 20   # stored as photos (the folder's name), or --name
  python -m training --demo --arch resnet18 --image-size 224 --epochs 0 --name image-classifier-r18

exit status: 0 trained and stored; 2 a bad option or data folder (the message says what to fix); 1 a failure
while training or exporting (the log says where).

options (default, meaning):
"""
#: Below these, the unfamiliar-image threshold (a 99% quantile of the validation images) and the drift reference
#: rest on too few images to say much.
FEW_VALIDATION, FEW_REFERENCE = 100, 200


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
    val, held_out = m["images"].get("val", 0), m["images"].get("val", 0) + m["images"].get("test", 0)
    if val < FEW_VALIDATION:
        print(f"warning: the unfamiliar-image threshold was set on {val} validation images (it is their 99% "
              f"quantile): it is rough below {FEW_VALIDATION}. Add images, or raise --val-fraction.")  # fmt: skip
    rows = min(held_out, cfg.reference_images)
    if rows < FEW_REFERENCE:
        print(f"warning: the drift reference has {rows} rows (the held-out images): the drift job judges windows "
              f"against it, and below {FEW_REFERENCE} it misses small shifts.")  # fmt: skip
    if result.tag:
        print(f"model: {result.tag}   (bentoml models get {result.tag})")
        name = result.tag.split(":")[0]
        print(f"serve it: IMGCLS_MODEL={name}:latest make serve   (make serve alone serves {DEFAULT_MODEL})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
