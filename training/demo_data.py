"""The built-in demo data set: demo images written once into a cache folder, in the layout users can give too.

``ROOT/{train,val,test}/<class>/*.jpg``, with a marker file naming the generator version and parameters, so
a finished data set is reused and an incomplete or outdated one is regenerated.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from imgcls.demo_images import CLASSES, SPLITS, DemoParams, render, split_of
from training.dataset import process_pool

log = logging.getLogger(__name__)

MARKER_FILE = ".complete.json"


def _write_class(job: tuple[int, DemoParams, str]) -> int:
    class_index, params, root = job
    name = CLASSES[class_index]
    for i in range(params.per_class):
        path = Path(root) / split_of(i, params.per_class) / name / f"{name}_{i:04d}.jpg"
        path.write_bytes(render(class_index, i, params))
    return params.per_class


def is_complete(root: Path, params: DemoParams) -> bool:
    """True when ``root`` holds a finished dataset generated with exactly these parameters."""
    marker = root / MARKER_FILE
    try:
        return json.loads(marker.read_text()) == asdict(params)
    except (OSError, ValueError):
        return False


def ensure_demo_data(cache_dir: str | Path, params: DemoParams, workers: int = 2) -> Path:
    """The demo dataset folder for ``params`` under ``cache_dir``, generated now if missing or incomplete."""
    if params.classes > len(CLASSES):
        raise ValueError(f"The demo has at most {len(CLASSES)} classes, not {params.classes}.")
    root = Path(cache_dir) / params.folder_name()
    if is_complete(root, params):
        log.info("Using demo data in %s", root)
        return root
    if root.exists():
        log.info("Demo data in %s is incomplete or outdated; regenerating", root)
        shutil.rmtree(root)
    log.info("Generating %d x %d demo images into %s", params.classes, params.per_class, root)
    for split, _ in SPLITS:
        for name in CLASSES[: params.classes]:
            (root / split / name).mkdir(parents=True, exist_ok=True)
    jobs = [(c, params, str(root)) for c in range(params.classes)]
    with process_pool(min(workers, params.classes)) as pool:
        pool.map(_write_class, jobs)
    (root / MARKER_FILE).write_text(json.dumps(asdict(params), indent=2) + "\n")
    return root
