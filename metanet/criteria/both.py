"""The criteria defined at both levels: magnitude (the default, ``none`` on the command line),
random (the floor any criterion should beat), and scores given from outside (``GivenScores``: the
``curve`` method's optimised scores, or a metanetwork's)."""

from __future__ import annotations

from typing import Mapping

import torch
import torch_pruning as tp

from metanet.criteria.base import Criterion
from metanet.criteria.channels import ScoreImportance
from metanet.levels import Level

BOTH = frozenset(Level)


class Magnitude(Criterion):
    """Channels: the group L2 norm of the channel's weights, mean over the group (the paper's).
    Weights: |w|, one-shot magnitude pruning."""

    name = "magnitude"
    levels = BOTH

    def importance(self, model, normalizer):
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=normalizer)

    def scores(self, model, layers, batches):
        return {n: m.weight.detach().abs() for n, m in layers.items()}


class Random(Criterion):
    """Uniform random importance, of channels or of weights (torch's global generator: the caller
    seeds it)."""

    name = "random"
    levels = BOTH

    def importance(self, model, normalizer):
        return tp.importance.RandomImportance()

    def scores(self, model, layers, batches):
        return {n: torch.rand(m.weight.shape, device=m.weight.device) for n, m in layers.items()}


class GivenScores(Criterion):
    """Scores computed elsewhere, higher kept longer, at one ``level``: ``{Conv/Linear layer name:
    [its output channels]}`` for channels, ``{layer name: scores shaped like its weight}`` for
    weights. ``name`` says where they came from in reports (``curve``, ``learned``)."""

    def __init__(self, scores: Mapping[str, torch.Tensor], level: Level = Level.CHANNELS, name: str = "scores"):
        self.table, self.levels, self.name = dict(scores), frozenset({level}), name

    def importance(self, model, normalizer):
        if Level.CHANNELS not in self.levels:
            return super().importance(model, normalizer)
        return ScoreImportance(model, self.table)

    def observe(self, importance, group):
        importance.observe(group)

    def scores(self, model, layers, batches):
        if Level.WEIGHTS not in self.levels:
            return super().scores(model, layers, batches)
        missing = sorted(set(layers) - set(self.table))
        if missing:
            raise ValueError(f"no scores for layer(s) {', '.join(missing)}")
        return {n: self.table[n].detach().reshape(layers[n].weight.shape) for n in layers}
