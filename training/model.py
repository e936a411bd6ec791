"""The classifier in plain PyTorch: a compact residual CNN or a ResNet-18-sized network, plus the serving graph."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (ResNet's basic block)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ClassifierNet(nn.Module):
    """Stem, residual stages, global average pooling and a linear head; ``embed`` projects the pooled features.

    ``arch="cnn"``: a 3x3 stem and ``depth`` stages of ``blocks_per_stage`` blocks, widths ``width * 2**i``,
    each stage halving the resolution. ``arch="resnet18"``: ResNet-18's layout (7x7 stem, max pool, blocks
    [2, 2, 2, 2], widths 64..512, about 11M parameters).
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "cnn",
        width: int = 24,
        depth: int = 4,
        blocks_per_stage: int = 1,
        embedding_dim: int = 32,
        seed: int = 0,
    ):
        super().__init__()
        if arch == "resnet18":
            widths, blocks = [64, 128, 256, 512], [2, 2, 2, 2]
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
            )
            first_stride = 1
        elif arch == "cnn":
            widths, blocks = [width * 2**i for i in range(depth)], [blocks_per_stage] * depth
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True))
            first_stride = 2
        else:
            raise ValueError(f"unknown arch {arch!r}; use 'cnn' or 'resnet18'")
        layers, cin = [], widths[0]
        for i, (cout, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                stride = (first_stride if i == 0 else 2) if j == 0 else 1
                layers.append(BasicBlock(cin, cout, stride))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)
        self.feature_dim = cin
        # A fixed random projection (Johnson-Lindenstrauss): a compact embedding for drift detection that
        # needs no training and is stored with the weights, so every export of this model projects alike.
        gen = torch.Generator().manual_seed(seed + 7919)
        projection = torch.randn(cin, embedding_dim, generator=gen) / embedding_dim**0.5
        self.register_buffer("projection", projection)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features of a normalised NCHW float batch."""
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.projection


def build_model(cfg, num_classes: int) -> ClassifierNet:
    """The model a :class:`~training.config.TrainConfig` describes, optionally initialised from ``cfg.init``."""
    torch.manual_seed(cfg.seed)
    model = ClassifierNet(
        num_classes, cfg.arch, cfg.width, cfg.depth, cfg.blocks_per_stage, cfg.embedding_dim, cfg.seed
    )
    if cfg.init:
        load_init(model, cfg.init)
    return model


def load_init(model: nn.Module, path: str) -> None:
    """Load a local state_dict to fine-tune from; tensors whose shape differs (e.g. the head) stay fresh."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    fresh = sorted(set(own) - set(usable))
    if not usable:
        raise ValueError(f"{path} shares no tensor names and shapes with this model; check --arch and --width.")
    model.load_state_dict(usable, strict=False)
    log.info("Initialised %d tensors from %s; %d stay fresh: %s", len(usable), path, len(fresh), fresh[:6])


class Normalise(nn.Module):
    """uint8 NHWC pixels to the normalised float NCHW batch the network takes: the one implementation, used in
    training and inside the exported graph."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 1, 1, 3) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 1, 1, 3) * 255.0))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return ((pixels.float() - self.mean) * self.inv_std).permute(0, 3, 1, 2).contiguous()


class ServingGraph(nn.Module):
    """What is exported: uint8 NHWC pixels in; softmax probabilities and the embedding out."""

    def __init__(self, model: ClassifierNet, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        self.normalise = Normalise(mean, std)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.features(self.normalise(pixels))
        return torch.softmax(self.model.head(feats), dim=1), self.model.embed(feats)
