"""The one training configuration: commented defaults, `--key value` command-line overrides, saved with every run."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from service.artifacts import DEFAULT_MODEL_NAME


class ConfigError(ValueError):
    """A command-line override names an unknown key or has a value of the wrong type."""


@dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults train the demo to >=95% test accuracy in <3 min on 2 cores."""

    # --- data ---
    data: str | None = None  # image folder: one subfolder per class, or train/ val/ [test/] each holding those
    demo: bool = False  # generate (once) and use the built-in demo dataset instead of --data
    cache_dir: str = ".cache/demo-data"  # where the demo dataset is generated; reused while its marker matches
    demo_classes: int = 6  # demo: number of shape classes (at most 8)
    demo_per_class: int = 400  # demo: images per class, split 70/15/15 into train/val/test
    demo_image_size: int = 160  # demo: the longer side of a generated image lies in [size*0.8, size] (>=128)
    val_fraction: float = 0.15  # user folders without train/val/test subfolders: seeded split fractions
    test_fraction: float = 0.15

    # --- model ---
    arch: str = "cnn"  # "cnn" (compact, width/depth below) or "resnet18" (basic blocks [2,2,2,2], widths 64..512)
    image_size: int = 32  # model input side in pixels; the demo shapes stay recognisable at 32 (4x cheaper than 64)
    width: int = 32  # cnn: channels of the first stage, doubled at each later stage
    depth: int = 3  # cnn: number of stages, each halves the resolution
    blocks_per_stage: int = 1  # cnn: residual blocks per stage
    embedding_dim: int = 32  # drift embedding size (<=64): fixed seeded random projection of the penultimate layer
    init: str | None = None  # fine-tune from this local state_dict (.pt, loaded with weights_only=True)

    # --- optimisation ---
    epochs: int = 30  # the demo plateaus near chance for ~7 epochs, then passes 95% val by ~18; 0 saves random weights
    batch_size: int = 64
    lr: float = 3e-3  # peak learning rate of the one-cycle schedule (AdamW)
    weight_decay: float = 5e-4
    label_smoothing: float = 0.05
    augment: bool = True  # random flips, shifts and brightness/contrast jitter on the training batches
    seed: int = 0  # seeds data generation order, splits, initialisation, augmentation and the projection
    threads: int = 2  # torch intra-op threads; the target machine has 2 cores
    workers: int = 2  # processes for demo generation and image decoding

    # --- export, quantisation, reference, store ---
    calibration_images: int = 256  # training images used to calibrate int8 activation ranges
    reference_images: int = 1000  # held-out (val+test) images summarised in the drift reference, at most
    speed_batch: int = 8  # batch size of the short int8-vs-fp32 speed check recorded in metrics.json
    speed_seconds: float = 2.0  # time budget per variant of that check
    name: str = DEFAULT_MODEL_NAME  # BentoML model name
    out_dir: str = "runs"  # each run writes to OUT_DIR/NAME-TIMESTAMP
    store: bool = True  # save to the BentoML model store (BENTOML_HOME)
    progress: bool = True  # tqdm progress bars

    @classmethod
    def tiny(cls, cache_dir: str, out_dir: str, **overrides) -> TrainConfig:
        """A configuration that runs end to end in seconds, for tests."""
        values = dict(
            demo=True,
            cache_dir=cache_dir,
            out_dir=out_dir,
            demo_per_class=60,
            demo_image_size=128,
            image_size=32,
            width=8,
            depth=3,  # the tiny run does not get past the demo's initial plateau: near-chance accuracy, by design
            embedding_dim=16,
            epochs=3,
            batch_size=32,
            calibration_images=64,
            reference_images=200,
            speed_seconds=0.2,
            progress=False,
            workers=1,
        )
        values.update(overrides)
        return cls(**values)

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` for values that cannot work, with what to change."""
        if self.demo == bool(self.data):
            raise ConfigError("Give exactly one of --data PATH (your image folder) or --demo (built-in data).")
        if self.arch not in ("cnn", "resnet18"):
            raise ConfigError(f"--arch must be 'cnn' or 'resnet18', not {self.arch!r}.")
        if not 1 <= self.embedding_dim <= 64:
            raise ConfigError("--embedding-dim must be between 1 and 64.")
        if self.image_size < 16:
            raise ConfigError("--image-size must be at least 16.")
        if self.epochs < 0 or self.batch_size < 1:
            raise ConfigError("--epochs must be >= 0 and --batch-size >= 1.")
        if (
            not 0 < self.val_fraction < 1
            or not 0 <= self.test_fraction < 1
            or self.val_fraction + self.test_fraction >= 1
        ):
            raise ConfigError("--val-fraction and --test-fraction must be in (0, 1) and leave some training images.")
        if self.demo and not 2 <= self.demo_classes <= 8:
            raise ConfigError("--demo-classes must be between 2 and 8.")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(Path(path).read_text()).items() if k in known})


def _field_type(f: dataclasses.Field) -> type:
    """The concrete type of a field, unwrapping ``X | None``."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _convert(key: str, raw: str, kind: type):
    if kind is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key.replace('_', '-')} expects true/false, got {raw!r}.")
    try:
        return kind(raw)
    except ValueError as exc:
        raise ConfigError(f"--{key.replace('_', '-')} expects a {kind.__name__}, got {raw!r}.") from exc


def parse_overrides(argv: list[str], base: TrainConfig | None = None) -> TrainConfig:
    """Apply ``--key value``, ``--key=value``, ``key=value`` and bare ``--flag`` / ``--no-flag`` to a config."""
    cfg = base or TrainConfig()
    by_name = {f.name: f for f in fields(TrainConfig)}
    values: dict = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        body = token[2:] if token.startswith("--") else token
        if not token.startswith("--") and "=" not in token:
            raise ConfigError(f"Unexpected argument {token!r}; use --key value (see --help).")
        key, sep, raw = body.partition("=")
        key = key.replace("-", "_").replace(".", "_")
        negate = False
        if key not in by_name and key.startswith("no_") and key[3:] in by_name:
            key, negate = key[3:], True
        if key not in by_name:
            raise ConfigError(
                f"Unknown option --{key.replace('_', '-')}; run `python -m training --help` for the list."
            )
        kind = _field_type(by_name[key])
        if not sep:
            if kind is bool:
                values[key] = not negate
                i += 1
                continue
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key.replace('_', '-')} needs a value.")
            raw = argv[i + 1]
            i += 1
        values[key] = None if raw.lower() == "none" and by_name[key].default is None else _convert(key, raw, kind)
        i += 1
    return dataclasses.replace(cfg, **values)


def help_text() -> str:
    """Every option with its default and comment, read from this file so the help cannot drift from the code."""
    lines = []
    source = Path(__file__).read_text().splitlines()
    for f in fields(TrainConfig):
        comment = next(
            (ln.split("#", 1)[1].strip() for ln in source if ln.strip().startswith(f"{f.name}:") and "#" in ln), ""
        )
        lines.append(f"  --{f.name.replace('_', '-'):<20} {f.default!s:<18} {comment}")
    return "\n".join(lines)
