"""Find the images of a class-per-subfolder dataset, split them, and decode them through the serving preprocessing.

Two layouts are accepted:

- ``FOLDER/<class>/*.jpg``: split per class with the run's seed into train/val/test;
- ``FOLDER/train/<class>/...``, ``FOLDER/val/<class>/...`` and optionally ``FOLDER/test/<class>/...``: a fixed
  split (the demo data uses it); without ``test/``, the test images are split off ``train/`` with the seed.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgcls.errors import ApiError
from imgcls.preprocess import ACCEPTED_NAMES, IMAGE_SUFFIXES, PreprocessSpec, preprocess_file

log = logging.getLogger(__name__)

# fork: workers only run numpy and Pillow, and unlike spawn it needs no `if __name__ == "__main__"` guard
# in the caller's script.
_START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"

SPLIT_NAMES = ("train", "val", "test")


class DatasetError(ValueError):
    """The image folder cannot be used for training; the message says what to fix."""


@dataclass
class Split:
    """File paths and class indices of one split."""

    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


@dataclass
class Images:
    """A decoded split: uint8 NHWC pixels at the model size, class indices, original (width, height) and paths."""

    pixels: np.ndarray
    labels: np.ndarray
    sizes: list[tuple[int, int]]
    paths: list[Path]
    skipped: int = 0


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_classes(folder: Path) -> dict[str, list[Path]]:
    """Class name -> image files, refusing fewer than two classes or a class without images."""
    classes = {d.name: _image_files(d) for d in _class_folders(folder)}
    if len(classes) < 2:
        found = ", ".join(classes) or "none"
        raise DatasetError(
            f"{folder} has {len(classes)} class subfolder(s) ({found}); a classifier needs at least two. "
            "Put each class's images in its own subfolder, e.g. FOLDER/cats/*.jpg and FOLDER/dogs/*.jpg."
        )
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise DatasetError(
            f"Class folder(s) {', '.join(empty)} in {folder} contain no images ({ACCEPTED_NAMES}); "
            "add images or remove the folder(s)."
        )
    return classes


def _seeded_split(files: list[Path], seed: int, fractions: tuple[float, ...]) -> list[list[Path]]:
    """Shuffle ``files`` with ``seed`` and cut it into len(fractions)+1 parts (the last takes the rest)."""
    order = np.random.default_rng(seed).permutation(len(files))
    shuffled = [files[i] for i in order]
    parts, start = [], 0
    for fraction in fractions:
        n = max(1, round(fraction * len(files)))
        parts.append(shuffled[start : start + n])
        start += n
    parts.append(shuffled[start:])
    return parts


def discover(folder: str | Path, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15):
    """The class names and the train/val/test :class:`Split` of an image folder."""
    folder = Path(folder)
    if not folder.exists():
        raise DatasetError(f"Image folder {folder} does not exist; check the path given to --data.")
    if not folder.is_dir():
        raise DatasetError(f"{folder} is a file; --data needs a folder with one subfolder per class.")
    sub = {p.name for p in _class_folders(folder)}
    splits = {name: Split() for name in SPLIT_NAMES}
    if {"train", "val"} <= sub:
        per_split = {name: _read_classes(folder / name) for name in SPLIT_NAMES if name in sub}
        classes = sorted(per_split["train"])
        for name, found in per_split.items():
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise DatasetError(f"{folder / name} has class(es) {', '.join(unknown)} that train/ does not have.")
        for c, name in enumerate(classes):
            train = per_split["train"][name]
            if "test" not in per_split:
                test, train = _seeded_split(train, seed + c, (test_fraction,))
                splits["test"].paths += test
                splits["test"].labels += [c] * len(test)
            splits["train"].paths += train
            splits["train"].labels += [c] * len(train)
            for split in ("val", "test"):
                files = per_split.get(split, {}).get(name, [])
                splits[split].paths += files
                splits[split].labels += [c] * len(files)
    else:
        per_class = _read_classes(folder)
        classes = sorted(per_class)
        for c, name in enumerate(classes):
            files = per_class[name]
            if len(files) < 3:
                raise DatasetError(
                    f"Class {name} in {folder} has {len(files)} image(s); at least 3 are needed "
                    "(one each for training, validation and test). Add images to it."
                )
            val, test, train = _seeded_split(files, seed + c, (val_fraction, test_fraction))
            for split, part in (("train", train), ("val", val), ("test", test)):
                splits[split].paths += part
                splits[split].labels += [c] * len(part)
    for name in SPLIT_NAMES:
        if not splits[name].paths:
            raise DatasetError(f"The {name} split of {folder} is empty; add images to it.")
    log.info("%d classes; %s images", len(classes), ", ".join(f"{n} {len(s.paths)}" for n, s in splits.items()))
    return classes, splits


def _decode(job: tuple[str, PreprocessSpec]):
    path, spec = job
    try:
        pixels, size = preprocess_file(path, spec)
        return pixels, size, None
    except (ApiError, OSError) as exc:
        return None, None, str(exc)


class _InProcess:
    """``map`` in this process: what a pool of one would do, without starting one."""

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def map(func, jobs, chunksize: int = 1) -> list:
        return [func(job) for job in jobs]


def process_pool(workers: int):
    """A process pool of ``workers`` (a context manager with ``map``), or this process alone for one worker."""
    if workers <= 1:
        return _InProcess()
    return multiprocessing.get_context(_START_METHOD).Pool(workers)


def load(split: Split, spec: PreprocessSpec, workers: int = 1, what: str = "images") -> Images:
    """Decode a split with the serving preprocessing, skipping unreadable files with one warning and a count."""
    jobs = [(str(p), spec) for p in split.paths]
    with process_pool(workers if len(jobs) > 200 else 1) as pool:
        results = pool.map(_decode, jobs, chunksize=64)
    keep = [i for i, (pixels, _, _) in enumerate(results) if pixels is not None]
    skipped = [(split.paths[i], results[i][2]) for i in range(len(results)) if results[i][0] is None]
    if skipped:
        examples = "; ".join(f"{p}: {err}" for p, err in skipped[:3])
        log.warning("Skipped %d unreadable %s file(s) of %d (e.g. %s)", len(skipped), what, len(jobs), examples)
    if not keep:
        raise DatasetError(f"None of the {len(jobs)} {what} files could be read; check that they are images.")
    pixels = np.stack([results[i][0] for i in keep])
    return Images(
        pixels=pixels,
        labels=np.asarray([split.labels[i] for i in keep], dtype=np.int64),
        sizes=[results[i][1] for i in keep],
        paths=[split.paths[i] for i in keep],
        skipped=len(skipped),
    )
