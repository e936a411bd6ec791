"""The one training configuration: commented defaults, `--key value` command-line overrides, saved with every run."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from imgcls.model_files import DEFAULT_MODEL_NAME


class ConfigError(ValueError):
    """A command-line override names an unknown key or has a value of the wrong type."""


def opt(default, help: str):
    """A configuration field with its ``--help`` line."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults train the demo to >=95% test accuracy in <3 min on 2 cores."""

    # --- data ---
    data: str | None = opt(None, "image folder: one subfolder per class, or train/ val/ [test/] each holding those")
    demo: bool = opt(False, "generate (once) and use the built-in demo dataset instead of --data")
    cache_dir: str = opt(".cache/demo-data", "where the demo dataset is generated; reused while its marker matches")
    demo_classes: int = opt(6, "demo: number of shape classes (at most 8)")
    demo_per_class: int = opt(400, "demo: images per class, split 70/15/15 into train/val/test")
    demo_image_size: int = opt(160, "demo: the longer side of a generated image lies in [size*0.8, size] (>=128)")
    val_fraction: float = opt(0.15, "user folders without train/val/test subfolders: seeded validation fraction")
    test_fraction: float = opt(0.15, "user folders without train/val/test subfolders: seeded test fraction")

    # --- model ---
    arch: str = opt("cnn", '"cnn" (compact, width/depth below) or "resnet18" (basic blocks [2,2,2,2], widths 64..512)')
    image_size: int = opt(
        32, "model input side in pixels; the demo shapes stay recognisable at 32 (4x cheaper than 64)"
    )
    width: int = opt(32, "cnn: channels of the first stage, doubled at each later stage")
    depth: int = opt(3, "cnn: number of stages, each halves the resolution")
    blocks_per_stage: int = opt(1, "cnn: residual blocks per stage")
    embedding_dim: int = opt(32, "drift embedding size (<=64): fixed seeded random projection of the penultimate layer")
    init: str | None = opt(None, "fine-tune from this local state_dict (.pt, loaded with weights_only=True)")

    # --- optimisation ---
    epochs: int = opt(
        30, "the demo plateaus near chance for ~7 epochs, then passes 95% val by ~18; 0 saves random weights"
    )
    batch_size: int = opt(64, "images per optimiser step")
    lr: float = opt(3e-3, "peak learning rate of the one-cycle schedule (AdamW)")
    weight_decay: float = opt(5e-4, "AdamW weight decay")
    label_smoothing: float = opt(0.05, "cross-entropy label smoothing")
    augment: bool = opt(True, "random flips, shifts and brightness/contrast jitter on the training batches")
    seed: int = opt(0, "seeds the demo images, splits, initialisation, augmentation and the projection")
    threads: int = opt(2, "torch intra-op threads; the target machine has 2 cores")
    workers: int = opt(2, "processes for demo generation and image decoding")

    # --- export, quantisation, reference, store ---
    calibration_images: int = opt(256, "training images used to calibrate int8 activation ranges")
    reference_images: int = opt(1000, "held-out (val+test) images summarised in the drift reference, at most")
    speed_batch: int = opt(8, "batch size of the short int8-vs-fp32 speed check recorded in metrics.json")
    speed_seconds: float = opt(2.0, "time budget per variant of that check")
    name: str = opt(
        "", f"BentoML model name; empty: {DEFAULT_MODEL_NAME} for --demo, the data folder's name for --data"
    )
    out_dir: str = opt("runs", "each run writes to OUT_DIR/NAME-TIMESTAMP")
    store: bool = opt(True, "save to the BentoML model store (BENTOML_HOME)")
    progress: bool = opt(True, "progress bars (on a terminal only; every epoch is logged anyway)")

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
        if not self.name and self.demo:
            self.name = DEFAULT_MODEL_NAME
        elif not self.name:  # your photos do not silently replace the demo model that `make serve` serves
            folder = re.sub(r"[^a-z0-9_.-]+", "-", Path(self.data).expanduser().resolve().name.lower()).strip("-._")
            self.name = folder or "my-classifier"
        if not re.fullmatch(r"[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?", self.name):
            raise ConfigError(f"--name {self.name!r}: lowercase letters, digits, '-', '_' and '.', at most 63.")
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


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _convert(key: str, raw: str, kind: type):
    if kind is bool:
        if raw.lower() in _BOOLS:
            return _BOOLS[raw.lower()]
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
            if kind is bool:  # a bare flag, or a flag followed by true/false as --help shows them
                follows = argv[i + 1].lower() if i + 1 < len(argv) else ""
                if follows in _BOOLS:
                    values[key] = _BOOLS[follows] != negate
                    i += 2
                else:
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
    """Every option with its default and meaning."""
    lines = []
    for f in fields(TrainConfig):
        default = str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
        lines.append(f"  --{f.name.replace('_', '-'):<20} {default:<18} {f.metadata.get('help', '')}")
    return "\n".join(lines)
