"""How many channels each dependency group keeps: the allocation, apart from which ones go.

The pruner's default removes the same fraction of every group (``uniform``). An allocation instead
gives each prunable group (Torch-Pruning's dependency groups, a residual stage's channels one group
across its layers; the classifier's outputs never pruned) its own fraction to remove, and any
criterion (``metanet.criteria``) then ranks the channels inside each group:
``prune_allocated`` prunes to it with Torch-Pruning's own per-module ratios (``pruning_ratio_dict``).

Every allocation is scaled to the MAC target the same way (``to_target``): it proposes a pruning
*pressure* per group (how readily the group gives up channels), the fraction removed is
``min(max_ratio, s * pressure)``, and a bisection over the scale ``s`` finds the smallest that
reaches the target speed-up; where whole channel counts overshoot it by more than ``TOLERANCE``,
single channels are given back to the groups under the least pressure while the speed-up stays
within ``TOLERANCE`` of the target (below it by at most that). MACs are Torch-Pruning's
count of the network pruned to those fractions (the criterion does not change a count).

One class per allocation, in ``ALLOCATIONS``:

- ``uniform``: the same fraction everywhere: today's pruner's widths, exactly;
- ``global``: Torch-Pruning's global ranking of group magnitudes (its normaliser), pruned to the
  target on a copy; the fraction each group lost there is the allocation (``isomorphic``: the same
  with Torch-Pruning's isomorphic groups, ECCV 2024);
- ``lamp``: the same global ranking with LAMP scores (layer-adaptive magnitude, Lee et al. 2021);
- ``sensitivity``: each group pruned alone at ``SENSITIVITY_FRACTIONS``, BatchNorm recalibrated,
  validation accuracy; its pressure is the MACs it saves per point of accuracy it loses;
- ``fitted``: the per-network reference (``metanet.allocation_fit``): each group's kept fraction
  fitted with the channels' scores on the curve objective at the target's MACs (training batches,
  ``fit_steps`` steps), then scaled to the target on Torch-Pruning's count as every allocation is;
- ``learned``: the fractions an allocation metanetwork (``context.allocator``, the ``allocation``
  head) gives the network at the target, scaled to it on Torch-Pruning's count;
- ``eagleeye``: ``candidates`` random pressures (uniform in [0, 1] per group, as EagleEye samples
  per-layer ratios), each scaled to the target and pruned, BatchNorm recalibrated, the best by
  validation accuracy (Li et al., ECCV 2020). Its cost is reported: ``candidates`` prunings and
  evaluations per network and target.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from metanet.allocation_fit import FIT_STEPS, fit_allocation, learned_kept
from metanet.criteria import LAMP, Batches, Criterion, Magnitude
from metanet.data import TaskData
from metanet.prune import (DEFAULT_PRUNING, PruneResult, PruneSettings, UnreachableSpeedupError, count,
                           prunable_groups, prune_allocated, prune_in_steps, prune_to_speedup)
from metanet.registry import Registry

TOLERANCE = 0.02  # a speed-up within 2% of the target reaches it
DEFAULT_ALLOCATION = "uniform"
SENSITIVITY_FRACTIONS = (0.3, 0.6)
Amounts = dict[str, float]  # root Conv/Linear module name of each group -> fraction of its channels removed


@dataclass
class AllocationContext:
    """What an allocation may read besides the network: the pruner's ``settings``, ``score`` (a
    pruned network's validation accuracy after BatchNorm recalibration; the data-driven
    allocations need it), the ``seed`` of the random ones, ``candidates`` (EagleEye's budget),
    ``data`` with ``fit_steps`` (the fitted allocation trains on ``data``'s training split), and
    the ``allocator`` (an allocation metanetwork: the learned allocation's)."""

    settings: PruneSettings = DEFAULT_PRUNING
    score: Callable[[nn.Module], float] | None = None
    seed: int = 0
    candidates: int = 24
    data: TaskData | None = None
    fit_steps: int = FIT_STEPS
    allocator: object | None = None  # a MetaNetwork with the ``allocation`` head


class Allocation:
    """How many channels each group keeps at a target speed-up: ``amounts`` (fractions removed, by
    the group's root module name), reaching the target within ``TOLERANCE``; ``prune_in_steps``
    prunes to it with any criterion ranking the channels inside each group."""

    name = ""
    reads_data = False  # reads the task's data (``context.score``: validation accuracy; ``context.data``)
    adaptive = False  # serves ``prune_adaptive`` (a floor on accuracy instead of a target)
    one_run = False  # one pruning run passes through every target (else one run per target)
    reads_allocator = False  # needs ``context.allocator`` (an allocation metanetwork)

    def prune_in_steps(self, model: nn.Module, example_inputs: torch.Tensor, targets, context: AllocationContext,
                       criterion: Criterion | None = None, batches: Batches | None = None
                       ) -> Iterator[tuple[float, PruneResult]]:
        """``(target, result)`` for each of ``targets`` (ascending), as ``metanet.prune.prune_in_steps``
        yields them: each target's allocation is computed on the unpruned ``model``; the last is pruned
        in ``model`` itself, the others in copies."""
        targets = sorted(float(t) for t in targets)
        base = copy.deepcopy(model)
        for i, target in enumerate(targets):
            amounts = self.amounts(base, example_inputs, target, context)
            work = model if i == len(targets) - 1 else copy.deepcopy(base)
            yield target, prune_allocated(work, example_inputs, amounts, context.settings, criterion, batches)

    def amounts(self, model: nn.Module, example_inputs: torch.Tensor, target: float,
                context: AllocationContext) -> Amounts:
        return to_target(model, example_inputs, target, self.pressures(model, example_inputs, context),
                         context.settings)

    def pressures(self, model: nn.Module, example_inputs: torch.Tensor, context: AllocationContext) -> Amounts:
        """Each group's relative pruning pressure (>= 0), scaled to the target by ``to_target``."""
        raise NotImplementedError


ALLOCATIONS: Registry[Allocation] = Registry("allocation")


@ALLOCATIONS.register
class Uniform(Allocation):
    """The same fraction of every group (today's pruner)."""

    name = "uniform"
    adaptive = True
    one_run = True

    def prune_in_steps(self, model, example_inputs, targets, context, criterion=None, batches=None):
        # today's pruner itself: one iterative run serves every target
        return prune_in_steps(model, example_inputs, targets, context.settings, criterion, batches)

    def amounts(self, model, example_inputs, target, context):
        # the widths today's pruner reaches (per-layer, iterative, the first step past the target),
        # so that ``uniform`` is the default exactly; on a narrow network one step may overshoot
        # the tolerance
        sizes = prunable_groups(model, example_inputs)
        return removed_fractions(sizes, prune_to_speedup(copy.deepcopy(model), example_inputs, target,
                                                         context.settings))


class GlobalRanking(Allocation):
    """The fractions a global ranking of ``criterion``'s scores removes at the target (on a copy)."""

    def __init__(self, name: str, criterion: Criterion, isomorphic: bool = False):
        self.name, self.criterion, self.isomorphic = name, criterion, isomorphic

    def amounts(self, model, example_inputs, target, context):
        settings = PruneSettings(global_pruning=True, max_ratio=context.settings.max_ratio,
                                 normalizer=context.settings.normalizer, steps=context.settings.steps,
                                 isomorphic=self.isomorphic)
        sizes = prunable_groups(model, example_inputs)
        result = prune_to_speedup(copy.deepcopy(model), example_inputs, target, settings, self.criterion)
        amounts = removed_fractions(sizes, result)
        # the global run stops at the first step past the target: give single channels back to the
        # groups it cut least, as ``to_target`` does
        return _give_back(model, example_inputs, target, amounts, result.speedup, sizes, amounts, context.settings)


ALLOCATIONS.add(GlobalRanking("global", Magnitude()))
ALLOCATIONS.add(GlobalRanking("isomorphic", Magnitude(), isomorphic=True))
ALLOCATIONS.add(GlobalRanking("lamp", LAMP()))


@ALLOCATIONS.register
class Sensitivity(Allocation):
    """Each group pruned alone: the MACs it saves per point of validation accuracy it costs."""

    name = "sensitivity"
    reads_data = True

    def pressures(self, model, example_inputs, context):
        score = _needs_score(self, context)
        macs0, _ = count(model, example_inputs)
        base = score(model)
        out = {}
        for root in prunable_groups(model, example_inputs):
            ratios = []
            for fraction in SENSITIVITY_FRACTIONS:
                result = prune_allocated(copy.deepcopy(model), example_inputs, {root: fraction}, context.settings)
                saved = (macs0 - result.macs_after) / macs0
                lost = max(base - score(result.model), 0.0)
                ratios.append(saved / (lost + 1e-3))  # a free cut (no loss) is worth a thousand-fold
            out[root] = sum(ratios) / len(ratios)
        top = max(out.values(), default=0.0) or 1.0  # no group saves anything: all pressures 0
        return {root: value / top for root, value in out.items()}


@ALLOCATIONS.register
class EagleEye(Allocation):
    """The best of ``context.candidates`` random allocations by recalibrated validation accuracy."""

    name = "eagleeye"
    reads_data = True

    def amounts(self, model, example_inputs, target, context):
        score = _needs_score(self, context)
        roots = list(prunable_groups(model, example_inputs))
        gen = torch.Generator().manual_seed(context.seed)
        best, best_score = None, -float("inf")
        for _ in range(context.candidates):
            draw = torch.rand(len(roots), generator=gen).tolist()
            amounts = to_target(model, example_inputs, target, dict(zip(roots, draw)), context.settings)
            value = score(prune_allocated(copy.deepcopy(model), example_inputs, amounts, context.settings).model)
            if value > best_score:
                best, best_score = amounts, value
        return best


class KeptFractions(Allocation):
    """An allocation that says each group's kept fraction at the target (``kept``), then scaled onto
    the target on Torch-Pruning's count like every other (the fractions removed as pressures)."""

    def amounts(self, model, example_inputs, target, context):
        removed = {root: 1.0 - k for root, k in self.kept(model, example_inputs, target, context).items()}
        if max(removed.values()) <= 0:
            raise ValueError(f"allocation {self.name!r} kept every group whole at {target}x")
        return to_target(model, example_inputs, target, removed, context.settings)

    def kept(self, model, example_inputs, target, context) -> dict[str, float]:
        raise NotImplementedError


@ALLOCATIONS.register
class Fitted(KeptFractions):
    """Kept fractions fitted per network on the curve objective at the target's MACs (the reference)."""

    name = "fitted"
    reads_data = True

    def kept(self, model, example_inputs, target, context):
        if context.data is None:
            raise ValueError(f"allocation {self.name!r} trains on the task's data: give it data")
        return fit_allocation(model, context.data, target, steps=context.fit_steps, seed=context.seed,
                              settings=context.settings).kept


@ALLOCATIONS.register
class Learned(KeptFractions):
    """The kept fractions an allocation metanetwork gives the network at the target."""

    name = "learned"
    reads_allocator = True

    def kept(self, model, example_inputs, target, context):
        if context.allocator is None:
            raise ValueError(f"allocation {self.name!r} reads an allocation metanetwork: give one (--allocator FILE; "
                             "prune_batch and metanet.api use the shipped one when none is given)")
        return learned_kept(context.allocator, model, example_inputs, target, context.settings)


def _needs_score(allocation: Allocation, context: AllocationContext) -> Callable[[nn.Module], float]:
    if context.score is None:
        raise ValueError(f"allocation {allocation.name!r} reads validation accuracy: give it a score")
    return context.score


def removed_fractions(sizes: Mapping[str, int], result: PruneResult) -> Amounts:
    """{group root: the fraction of its channels ``result`` removed}, read from the pruned network's
    root layers (any Conv or Linear: the channel map holds 2-D convolutions and Linears only)."""
    modules = dict(result.model.named_modules())
    return {root: keeping(out_channels(modules[root]), size) for root, size in sizes.items()}


def out_channels(module: nn.Module) -> int:
    """A Conv's or Linear's output channels."""
    return int(getattr(module, "out_channels", getattr(module, "out_features", 0)))


def keeping(kept: int, size: int) -> float:
    """The fraction removed that leaves ``kept`` of ``size`` channels under Torch-Pruning's count
    (the floor of ``size * (1 - fraction)``, so a hair below the exact ratio)."""
    return max(0.0, 1.0 - kept / size - 1e-9)


def speedup_of(model: nn.Module, example_inputs: torch.Tensor, amounts: Amounts,
               settings: PruneSettings = DEFAULT_PRUNING) -> float:
    """The MAC speed-up of ``model`` pruned to ``amounts`` (a copy, one shot: only counts matter)."""
    return prune_allocated(copy.deepcopy(model), example_inputs, amounts, settings, steps=1).speedup


def to_target(model: nn.Module, example_inputs: torch.Tensor, target: float, pressures: Mapping[str, float],
              settings: PruneSettings = DEFAULT_PRUNING, iterations: int = 24) -> Amounts:
    """``pressures`` scaled to reach ``target``: fractions ``min(max_ratio, s * pressure)`` with
    the smallest scale ``s`` (bisection) whose speed-up reaches the target, then single channels
    given back while it overshoots by more than ``TOLERANCE`` (``_give_back``): within
    ``TOLERANCE`` of the target where whole channel counts allow. ``UnreachableSpeedupError``
    naming the target if even ``max_ratio`` everywhere pressure is positive cannot reach it."""
    if not pressures or max(pressures.values()) <= 0:
        raise ValueError("an allocation needs a positive pruning pressure on at least one group")
    top = max(pressures.values())
    sizes = prunable_groups(model, example_inputs)
    # at most ``max_ratio`` of a group, and never its last channel (Torch-Pruning keeps the floor
    # of size * (1 - fraction); a group it would empty is not pruned at all)
    caps = {root: min(settings.max_ratio, keeping(1, sizes[root])) for root in pressures}
    cap = settings.max_ratio

    def amounts(scale: float) -> Amounts:
        return {root: max(0.0, min(caps[root], scale * p / top)) for root, p in pressures.items()}

    high = cap * top / max(min(p for p in pressures.values() if p > 0), 1e-6)  # every positive group at the cap
    reached = speedup_of(model, example_inputs, amounts(high), settings)
    if reached < target:
        raise UnreachableSpeedupError(f"target speed-up {target}x cannot be reached by this allocation: pruning at most "
                         f"{cap:.0%} of each group reaches {reached:.2f}x")
    low = 0.0
    for _ in range(iterations):
        mid = (low + high) / 2
        s = speedup_of(model, example_inputs, amounts(mid), settings)
        if s >= target:
            high, reached = mid, s
            if s <= target * (1 + TOLERANCE):
                break
        else:
            low = mid
    return _give_back(model, example_inputs, target, amounts(high), reached, sizes, pressures, settings)


def _give_back(model: nn.Module, example_inputs: torch.Tensor, target: float, amounts: Amounts, reached: float,
               sizes: Mapping[str, int], pressures: Mapping[str, float], settings: PruneSettings) -> Amounts:
    """Single channels given back to the groups under the least pressure first while the speed-up
    overshoots the target by more than ``TOLERANCE`` and stays within it of the target: the last
    adjustment whole channel counts need (on a narrow network one channel moves MACs by percents)."""
    amounts = dict(amounts)
    changed = True
    while reached > target * (1 + TOLERANCE) and changed:  # each pass keeps more channels: it ends
        changed = False
        for root in sorted(amounts, key=lambda r: pressures[r]):
            kept = int(sizes[root] * (1 - amounts[root]))
            if kept >= sizes[root]:
                continue
            trial = dict(amounts, **{root: keeping(kept + 1, sizes[root])})
            s = speedup_of(model, example_inputs, trial, settings)
            if s >= target * (1 - TOLERANCE):
                amounts, reached, changed = trial, s, True
                if reached <= target * (1 + TOLERANCE):
                    break
    return amounts


def allocation(name: str) -> Allocation:
    """The registered allocation called ``name`` (a one-line error naming the known ones)."""
    return ALLOCATIONS(name)
