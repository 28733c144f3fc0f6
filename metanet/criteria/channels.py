"""Channel criteria: which channels of a dependency group the pruner removes first.

Each wraps Torch-Pruning's own importance class. Taylor and Hessian read gradients of calibration
batches before each pruning step (every ``PruneSettings.refresh`` steps). ``ScoreImportance`` is a
table of per-channel scores given from outside (the ``curve`` method's optimised scores, or a
metanetwork's), kept aligned with the channels that remain as the pruner removes others.

With the default per-layer pruning every group loses the same fraction of its channels, so a
criterion decides only which channels of a group go; the normaliser matters only to global pruning.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from metanet.criteria.base import Criterion, calibration_batches

_OUT = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)


class BNScale(Criterion):
    """The BatchNorm scale |gamma| of the channel (network slimming)."""

    name = "bn_scale"

    def importance(self, model, normalizer):
        return tp.importance.BNScaleImportance(group_reduction="mean", normalizer=normalizer)


class LAMP(Criterion):
    """Layer-adaptive magnitude (LAMP): each channel's squared norm over the sum of the norms of the
    channels at least as large; its own normaliser."""

    name = "lamp"

    def importance(self, model, normalizer):
        return tp.importance.LAMPImportance(p=2, group_reduction="mean")


class FPGM(Criterion):
    """Distance to the geometric median of the layer's filters (the most replaceable go first)."""

    name = "fpgm"

    def importance(self, model, normalizer):
        return tp.importance.FPGMImportance(p=2, group_reduction="mean", normalizer=normalizer)


class Taylor(Criterion):
    """First-order Taylor |w * dL/dw| of the channel's weights, the gradient of the mean loss over
    every calibration batch (Torch-Pruning's benchmark accumulates 10), recomputed on the network
    as pruned so far at every refresh, BatchNorm on running statistics."""

    name = "taylor"
    data_driven = True

    def importance(self, model, normalizer):
        return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=normalizer)

    def before_step(self, model, importance, batches):
        found = calibration_batches(batches, self.name)
        device = next(model.parameters()).device
        model.zero_grad(set_to_none=True)
        for x, y in found:
            (F.cross_entropy(model(x.to(device)), y.to(device)) / len(found)).backward()


class Hessian(Criterion):
    """Optimal Brain Damage: w^2 times the diagonal Fisher (mean squared per-sample gradient) of the
    channel's weights, over the first ``samples`` calibration samples, at every refresh (per-sample
    backward passes: Torch-Pruning's benchmark takes 10 batches of them, too slow here).

    Torch-Pruning 1.6's ``GroupHessianImportance.accumulate_grad`` keys its running sums by
    parameter but checks for them by name, so every call replaces the sum instead of adding to it
    (only the last sample would count). The mean of the squared per-sample gradients is therefore
    formed here and handed to it in one call, as the gradient whose square it is."""

    name = "hessian"
    data_driven = True

    def __init__(self, samples: int = 32):
        self.samples = samples

    def importance(self, model, normalizer):
        return tp.importance.GroupHessianImportance(group_reduction="mean", normalizer=normalizer)

    def before_step(self, model, importance, batches):
        found = calibration_batches(batches, self.name)
        device = next(model.parameters()).device
        x = torch.cat([x for x, _ in found])[: self.samples].to(device)
        y = torch.cat([y for _, y in found])[: self.samples].to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        squares = [torch.zeros_like(p) for p in params]
        losses = F.cross_entropy(model(x), y, reduction="none")
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, params, retain_graph=i + 1 < len(losses), allow_unused=True)
            for s, g in zip(squares, grads):
                if g is not None:
                    s.add_(g.square())
        for p, s in zip(params, squares):
            p.grad = (s / len(losses)).sqrt()
        importance.zero_grad()
        importance.accumulate_grad(model)


class WithFallback(tp.importance.Importance):
    """``primary``'s importance, and magnitude's for the groups it cannot score (returns None
    for): Torch-Pruning's pruner skips such a group, so ``bn_scale`` would never prune a layer
    without BatchNorm (a VGG's hidden classifier layers) and would cut the others harder to reach
    the target instead. Everything else (``zero_grad``, ``observe``) goes to ``primary``."""

    def __init__(self, primary: tp.importance.Importance, fallback: tp.importance.Importance):
        self.primary, self.fallback = primary, fallback

    def __call__(self, group):
        imp = self.primary(group)
        return self.fallback(group) if imp is None else imp

    def __getattr__(self, name):
        return getattr(self.__dict__["primary"], name)


class ScoreImportance(tp.importance.Importance):
    """A Torch-Pruning importance read from a table: ``scores[module name]`` holds one score per
    output channel of that Conv/Linear layer, in the channel order of the network the table was
    made for. ``observe(group)`` removes the group's pruned channels from the table's view, so the
    next step reads the scores of the channels that remain."""

    def __init__(self, model: nn.Module, scores: Mapping[str, torch.Tensor]):
        modules = dict(model.named_modules())
        unknown = sorted(set(scores) - set(modules))
        if unknown:
            raise ValueError(f"channel scores name layers the network does not have: {unknown[:5]}")
        self.table: dict[nn.Module, list] = {}
        for name, s in scores.items():
            out = modules[name].weight.shape[0]
            if s.numel() != out:
                raise ValueError(f"channel scores of layer {name!r}: {s.numel()} scores for {out} output channels")
            self.table[modules[name]] = [s.detach().float().cpu(), torch.arange(out)]

    def _entry(self, group):
        for i, (dep, idxs) in enumerate(group):
            if dep.handler in _OUT and dep.target.module in self.table:
                return i, idxs, self.table[dep.target.module]
        return None

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        found = self._entry(group)
        if found is None:
            raise ValueError(f"no channel scores for the group rooted at {group[0][0].target.name}")
        i, idxs, (scores, remaining) = found
        root = torch.as_tensor(list(group[i].root_idxs), dtype=torch.int64)
        imp = torch.zeros(len(group[0][1]))
        imp[root] = scores[remaining[torch.as_tensor(list(idxs), dtype=torch.int64)]]
        return imp

    def observe(self, group) -> None:
        for dep, idxs in group:
            if dep.handler in _OUT and dep.target.module in self.table:
                entry = self.table[dep.target.module]
                keep = torch.ones(entry[1].numel(), dtype=torch.bool)
                keep[torch.as_tensor(list(idxs), dtype=torch.int64)] = False
                entry[1] = entry[1][keep]
