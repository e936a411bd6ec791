"""The training loop: seeded, augmented, one-cycle AdamW, keeping the best-on-validation weights."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from imgcls.preprocess import PreprocessSpec
from training.dataset import Images
from training.model import ClassifierNet, Normalise

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "best.pt"
#: Fewer steps than this leave no room for the one-cycle warm-up (torch divides by zero when a quarter of the
#: steps is a single step): a tiny data set trains at the constant peak rate instead.
MIN_ONE_CYCLE_STEPS = 8


@dataclass
class History:
    """Per-epoch curves and the epoch whose weights were kept."""

    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    best_epoch: int = 0  # 1-based; 0 means the untrained initial weights were kept
    best_val_acc: float = 0.0
    seconds: float = 0.0


def seed_everything(seed: int, threads: int) -> None:
    """Make a run repeatable on the same machine and library versions."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True, warn_only=True)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and quarter turns, shifts of up to 1/8 of the side and mild brightness/contrast jitter.

    Works on a normalised NCHW batch. Quarter turns and flips suit photos whose class does not depend on
    orientation (the demo's shapes); turn ``augment`` off for data where it does.
    """
    n, _, h, w = x.shape
    flip = (torch.rand(n, generator=gen) < 0.5).view(n, 1, 1, 1)
    x = torch.where(flip, x.flip(3), x)
    if h == w:
        turns = torch.randint(0, 4, (n,), generator=gen)
        x = torch.stack([torch.rot90(x[i], int(k), (1, 2)) for i, k in enumerate(turns)])
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen).tolist()
    x = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.85, 1.15, generator=gen)
    brightness = torch.empty(n, 1, 1, 1).uniform_(-0.15, 0.15, generator=gen)
    return x * contrast + brightness


@torch.no_grad()
def loss_and_accuracy(
    model: ClassifierNet, images: Images, spec: PreprocessSpec, batch_size: int = 256
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the torch model on decoded images."""
    model.eval()
    normalise = Normalise(spec.mean, spec.std)
    total_loss, correct = 0.0, 0
    for start in range(0, len(images.labels), batch_size):
        x = normalise(torch.from_numpy(images.pixels[start : start + batch_size]))
        y = torch.from_numpy(images.labels[start : start + batch_size])
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    n = max(1, len(images.labels))
    return total_loss / n, correct / n


def train(
    cfg, model: ClassifierNet, train_set: Images, val_set: Images, spec: PreprocessSpec, run_dir: Path
) -> History:
    """Train ``model`` in place, leave the best-on-validation weights loaded and saved as ``best.pt``."""
    history = History()
    start = time.monotonic()
    best_state = copy.deepcopy(model.state_dict())
    if cfg.epochs > 0:
        gen = torch.Generator().manual_seed(cfg.seed)
        steps = cfg.epochs * max(1, -(-len(train_set.labels) // cfg.batch_size))
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = None
        if steps >= MIN_ONE_CYCLE_STEPS:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.25)
        else:
            log.info("only %d optimiser steps: a constant learning rate instead of the one-cycle schedule", steps)
        pixels, labels = torch.from_numpy(train_set.pixels), torch.from_numpy(train_set.labels)
        normalise = Normalise(spec.mean, spec.std)
        history.best_val_acc = -1.0
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            order = torch.randperm(len(labels), generator=gen)
            seen, loss_sum, correct = 0, 0.0, 0
            bar = tqdm(
                range(0, len(order), cfg.batch_size),
                desc=f"epoch {epoch}/{cfg.epochs}",
                disable=None if cfg.progress else True,  # None: only on a terminal (each epoch is also logged)
                leave=False,
                unit="batch",
            )
            for i in bar:
                idx = order[i : i + cfg.batch_size]
                if len(idx) < 2:  # batch norm needs two samples
                    continue
                x = normalise(pixels[idx])
                if cfg.augment:
                    x = augment(x, gen)
                y = labels[idx]
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                seen += len(idx)
                loss_sum += loss.item() * len(idx)
                correct += (logits.argmax(1) == y).sum().item()
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            val_loss, val_acc = loss_and_accuracy(model, val_set, spec)
            history.train_loss.append(loss_sum / max(1, seen))
            history.train_acc.append(correct / max(1, seen))
            history.val_loss.append(val_loss)
            history.val_acc.append(val_acc)
            improved = val_acc > history.best_val_acc
            if improved:
                history.best_val_acc, history.best_epoch = val_acc, epoch
                best_state = copy.deepcopy(model.state_dict())
            log.info(
                "epoch %d/%d  train loss %.3f acc %.3f  val loss %.3f acc %.3f%s  (%.0f s)",
                epoch,
                cfg.epochs,
                history.train_loss[-1],
                history.train_acc[-1],
                val_loss,
                val_acc,
                "  *best*" if improved else "",
                time.monotonic() - start,
            )
    model.load_state_dict(best_state)
    if cfg.epochs == 0:
        history.best_val_acc = loss_and_accuracy(model, val_set, spec)[1]
        log.info("--epochs 0: keeping the untrained weights (val accuracy %.3f)", history.best_val_acc)
    torch.save(model.state_dict(), run_dir / CHECKPOINT_FILE)
    history.seconds = time.monotonic() - start
    return history
