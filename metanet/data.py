"""One classification task as in-memory tensors: seeded splits and batched augmentation.

``TaskData`` is what the method needs from a dataset: normalised float tensors per split, mini-batches
and augmentation (random crop with padding, horizontal flip) on whole batches, which on a 2-core
machine is several times faster than a per-image DataLoader pipeline. ``zoo.data`` loads the
datasets (digits, CIFAR, SVHN, ImageFolder) into it; any other source can build one directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F


@dataclass
class TaskData:
    """One classification task: normalised float tensors per split, and how to augment."""

    name: str
    num_classes: int
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    crop_padding: int = 0  # random crop with this padding when augmenting (0: none)
    flip: bool = False  # random horizontal flip when augmenting
    info: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, *self.train[0].shape[1:])

    @property
    def in_channels(self) -> int:
        return int(self.train[0].shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train[0].shape[-1])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, not {name!r}")
        return getattr(self, name)

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                generator: torch.Generator | None = None, limit: int | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches of ``split``; ``limit`` caps the number of batches."""
        x, y = self.split(split)
        n = x.shape[0]
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for count, start in enumerate(range(0, n, batch_size)):
            if limit is not None and count >= limit:
                return
            idx = order[start:start + batch_size]
            xb, yb = x[idx], y[idx]
            if augment:
                xb = self.augment(xb, generator)
            yield xb, yb

    def augment(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random crop with zero padding and random horizontal flip, per image, on a whole batch."""
        if self.crop_padding:
            p = self.crop_padding
            n, _, h, w = x.shape
            padded = F.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
            rows = (dy[:, None] + torch.arange(h)[None, :])  # [n, h]
            cols = (dx[:, None] + torch.arange(w)[None, :])  # [n, w]
            batch = torch.arange(n)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        if self.flip:
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.contiguous()
