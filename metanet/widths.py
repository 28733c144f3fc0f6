"""MACs as a differentiable function of how much of each group a pruning keeps.

Torch-Pruning counts the MACs of a network as it is; an allocation optimised by gradient needs
their derivative with respect to each group's kept fraction. ``MacModel`` takes both from
Torch-Pruning's own per-layer count (``count_ops_and_params(layer_wise=True)``): each group is
pruned alone on a copy (so Torch-Pruning's dependency graph decides which layers it touches,
residual couplings included) and every layer whose count changes gets an exponent

    e_lg = log(MACs_l(g pruned) / MACs_l) / log(kept fraction of g)

(1 where the group is one side of a convolution or is a BatchNorm's channels, 2 where it is both
sides of one), so that at kept fractions f

    MACs(f) = MACs outside the counted layers + sum_l MACs_l * prod_g f_g ** e_lg.

Exact for a layer between two groups (a convolution: in x out channels) up to whole-channel
rounding; approximate for a module shared by several groups (one ``nn.ReLU`` applied at several
places costs a sum, not a product: such modules cost a few MACs per activation, the convolutions
thousands). ``tests/test_allocation_fit.py`` holds it within 2% of Torch-Pruning's count of networks pruned
to random fractions; the allocation it serves is still scaled to its target by
``metanet.allocation.to_target`` on Torch-Pruning's count.
"""

from __future__ import annotations

import copy
import math
from typing import Mapping

import torch
import torch_pruning as tp
from torch import nn

from metanet.prune import DEFAULT_PRUNING, PruneSettings, prunable_groups, prune_allocated

PROBE = 0.5  # the fraction of a group removed, alone, to see which layers it touches and how


def layer_macs(model: nn.Module, example_inputs: torch.Tensor) -> tuple[float, dict[str, float]]:
    """(total MACs, {module name: its MACs}) as Torch-Pruning counts them (modules counted 0 left out)."""
    was_training = model.training
    model.eval()
    total, _, per_layer, _ = tp.utils.count_ops_and_params(model, example_inputs, layer_wise=True)
    model.train(was_training)
    names = {m: n for n, m in model.named_modules()}
    leaves = {m for m in model.modules() if not any(True for _ in m.children())}
    return float(total), {names[m]: float(v) for m, v in per_layer.items() if m in leaves and v}


class MacModel:
    """``model``'s MACs at kept fractions (``__call__``: [G], in ``roots`` order -> MACs, differentiable)
    and its unpruned MACs ``total``."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, settings: PruneSettings = DEFAULT_PRUNING):
        model = copy.deepcopy(model).eval()
        sizes = prunable_groups(model, example_inputs)
        self.roots = list(sizes)
        self.total, full = layer_macs(model, example_inputs)
        names = list(full)
        exponents = torch.zeros(len(names), len(self.roots), dtype=torch.float64)
        for g, root in enumerate(self.roots):
            probe = copy.deepcopy(model)
            prune_allocated(probe, example_inputs, {root: PROBE}, settings, steps=1)
            module = dict(probe.named_modules())[root]
            kept = getattr(module, "out_channels", getattr(module, "out_features", sizes[root])) / sizes[root]
            if kept >= 1.0:  # a group Torch-Pruning would not prune (one channel): nothing depends on it
                continue
            _, after = layer_macs(probe, example_inputs)
            for i, name in enumerate(names):
                ratio = after.get(name, 0.0) / full[name]
                if ratio != 1.0 and ratio > 0:
                    exponents[i, g] = math.log(ratio) / math.log(kept)
        self.layer_names = names
        self.base = torch.tensor([full[n] for n in names], dtype=torch.float64)
        self.exponents = exponents
        self.outside = self.total - float(self.base.sum())  # MACs Torch-Pruning counts outside leaf layers

    def __call__(self, keep: torch.Tensor) -> torch.Tensor:
        """The MACs at kept fractions ``keep`` ([G] in ``roots`` order, each in (0, 1])."""
        logs = torch.log(keep.to(torch.float64).clamp_min(1e-6))
        return self.outside + (self.base.to(keep.device) * torch.exp(self.exponents.to(keep.device) @ logs)).sum()

    def fractions(self, keep: Mapping[str, float]) -> torch.Tensor:
        """[G] kept fractions from {group root: fraction kept}, in ``roots`` order."""
        return torch.tensor([float(keep[r]) for r in self.roots], dtype=torch.float64)
