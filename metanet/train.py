"""Training and evaluation loops: SGD with momentum and weight decay, step or cosine schedules.

Deterministic under a seed on CPU: shuffling and augmentation draw from one seeded generator.
``extra_loss`` lets a caller add a term to the task loss (the group-sparsity term of sparse
learning), so every method shares one loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from metanet.data import TaskData


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"  # "cosine", "step" (x0.1 at milestones) or "constant"
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the epochs, for "step"
    augment: bool = True
    seed: int = 0
    max_batches: int | None = None  # per epoch; None: the whole training split
    # The budget in optimiser steps; when set it replaces ``epochs`` (the data is cycled through as
    # often as needed) and the schedule advances every step. An epoch of digits at batch 64 is 17
    # steps, one of a 20,000-image CIFAR-10 subset 157 at batch 128: a budget in epochs means very
    # different amounts of training on different datasets.
    steps: int | None = None


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)


def _lr_at(cfg: TrainConfig, done: int, total: int) -> float:
    """The learning rate after ``done`` of ``total`` epochs (or steps, for a budget in steps)."""
    if cfg.schedule == "constant" or total <= 1:
        return cfg.lr
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * done / total))
    if cfg.schedule == "step":
        drops = sum(done >= round(m * total) for m in cfg.milestones)
        return cfg.lr * 0.1 ** drops
    raise ValueError(f"schedule must be cosine, step or constant, not {cfg.schedule!r}")


@torch.no_grad()
def evaluate(model: nn.Module, data: TaskData, split: str = "val", batch_size: int = 512) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``split``, in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    device = next(model.parameters()).device
    for x, y in data.batches(split, batch_size):
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += y.numel()
    model.train(was_training)
    return correct / max(n, 1), loss / max(n, 1)


def train(model: nn.Module, data: TaskData, cfg: TrainConfig,
          extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
          progress: Callable[[int, float], None] | None = None) -> History:
    """Trains ``model`` in place for ``cfg.steps`` optimiser steps, or else ``cfg.epochs``; returns
    per-epoch (per pass over the data) train loss and val accuracy."""
    by_steps = cfg.steps is not None
    if (cfg.steps if by_steps else cfg.epochs) <= 0:
        return History()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.momentum > 0)
    hist = History()
    step, epoch = 0, 0
    while (step < cfg.steps) if by_steps else (epoch < cfg.epochs):
        if not by_steps:
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, epoch, cfg.epochs)
        model.train()
        total, count = 0.0, 0
        for x, y in data.batches("train", cfg.batch_size, shuffle=True, augment=cfg.augment, generator=gen,
                                 limit=cfg.max_batches):
            if by_steps:
                if step >= cfg.steps:
                    break
                for group in opt.param_groups:
                    group["lr"] = _lr_at(cfg, step, cfg.steps)
                step += 1
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training diverged at epoch {epoch}: loss {float(loss)} "
                                         f"(lr {cfg.lr} may be too high)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * y.numel()
            count += y.numel()
        hist.train_loss.append(total / max(count, 1))
        hist.val_acc.append(evaluate(model, data, "val")[0] if not by_steps else float("nan"))
        if progress is not None:
            progress(epoch, hist.val_acc[-1])
        epoch += 1
    return hist
