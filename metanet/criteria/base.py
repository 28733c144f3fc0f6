"""What every pruning criterion is: one class per name, in one registry, the level an attribute.

A criterion ranks what a pruning removes first, at one or both levels (``metanet.levels``):

- channels: ``importance(model, normalizer)`` is the Torch-Pruning importance the pruner of
  ``model`` uses (every channel criterion wraps Torch-Pruning's own class; none computes an
  importance by hand); ``before_step`` prepares what it reads (gradients) before each pruning step,
  ``observe`` sees every group the pruner is about to prune;
- weights: ``scores(model, layers, batches)`` gives one score per weight of ``layers`` (higher is
  kept), which ``metanet.weight_pruning.sparsify`` turns into masks.

``data_driven`` criteria read calibration batches (``(x, y)`` pairs).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch_pruning as tp
from torch import nn

from metanet.levels import Level
from metanet.registry import Registry

Batches = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # a fresh iterator of (x, y) per call


class Criterion:
    """A pruning criterion at the ``levels`` it serves."""

    name = ""
    levels: frozenset[Level] = frozenset({Level.CHANNELS})
    data_driven = False  # needs calibration batches (before each pruning step, for channels)

    def importance(self, model: nn.Module, normalizer: str | None) -> tp.importance.Importance:
        raise NotImplementedError(f"criterion {self.name!r} does not rank channels")

    def before_step(self, model: nn.Module, importance: tp.importance.Importance, batches: Batches | None) -> None:
        """Called before a pruning step of ``model`` (in eval mode), every ``PruneSettings.refresh``
        steps and after the pruner handed the model out (its gradients dropped)."""

    def observe(self, importance: tp.importance.Importance, group) -> None:
        """Called with every group the pruner is about to prune (its ``idxs`` are the channels that go)."""

    def scores(self, model: nn.Module, layers: dict[str, nn.Module], batches: Batches | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"criterion {self.name!r} does not rank weights")


CRITERIA: Registry[Criterion] = Registry("pruning criterion")


def names(level: Level) -> tuple[str, ...]:
    """The registered criteria that rank at ``level``, in registration order."""
    return tuple(name for name, c in CRITERIA.items() if level in c.levels)


def criterion(name: str, level: Level = Level.CHANNELS) -> Criterion:
    """The registered criterion called ``name``, refused with one line if it does not rank at ``level``."""
    found = CRITERIA(name) if name in CRITERIA else None
    if found is None or level not in found.levels:
        raise ValueError(f"unknown {level.value[:-1]} pruning criterion {name!r}; known: {', '.join(names(level))}")
    return found


def calibration_batches(batches: Batches | None, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (x, y) batches a data-driven criterion ``name`` reads, or a ValueError naming it."""
    if batches is None:
        raise ValueError(f"criterion {name!r} needs calibration batches")
    found = list(batches())
    if not found:
        raise ValueError(f"criterion {name!r}: the calibration batches are empty")
    return found
