"""Does the metanetwork do its job? The paper's pruning curve and the selectivity of an edit.

- ``pruning_curve``: accuracy right after pruning to each speed-up, BatchNorm statistics
  recomputed, no finetuning (the paper's diagnostic: what pruning removes, before training hides
  it), from one iterative pruning run. Its mean over the speed-ups is the curve's ``auc``.
- ``selectivity``: how an edit changed the channels of each dependency group. ``ratio_spread``
  is the coefficient of variation, within a group, of every channel's group-norm ratio
  (after / before), averaged over groups: a uniform shrink has spread 0, an edit that singles
  out channels to remove has a large one. ``share_below_0.1`` is the share of prunable channels
  whose max-normalised group importance after the edit is below 0.1 (channels the pruner can
  remove for free). ``mean_ratio`` is the average ratio (how much the edit shrank overall).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Sequence

import torch
from torch import nn

from metanet.criteria import Criterion, criterion as registered
from metanet.heads import ranks
from metanet.levels import Level
from metanet.metanetwork import MetaNetwork, apply_metanetwork
from metanet.scoring import learned_criterion
from metanet.recipe import (ChannelCut, RecipeConfig, WeightCut, allocation_context, calibration,
                            recalibrated_accuracy, reconstruction_batches, repair)
from metanet.allocation import Learned, allocation
from metanet.prune import UnreachableSpeedupError
from metanet.sparsity import GroupSparsity
from metanet.data import TaskData
from metanet.train import evaluate
from metanet.weight_pruning import WeightPruning, sparsify

CURVE_SPEEDUPS = (1.5, 2.0, 3.0, 4.0)
CURVE_SPARSITIES = (0.5, 0.8, 0.9, 0.95)  # the weight-level curve's fractions of zeros
LOW_IMPORTANCE = 0.1


def curve_auc(curve: dict[float, float]) -> float:
    """The mean accuracy over the curve's speed-ups (NaN where a speed-up was unreachable)."""
    values = list(curve.values())
    return sum(values) / len(values) if values else float("nan")


def weight_points(sparsities: Sequence[float] = CURVE_SPARSITIES, nm: bool = False, dense_ends: bool = True,
                  scope: str = "global") -> list[WeightPruning]:
    """The weight-level curve's points: each fraction of zeros (and, with ``nm``, 2:4)."""
    points = [WeightPruning(sparsity=s, scope=scope, dense_ends=dense_ends) for s in sparsities]
    return points + ([WeightPruning(nm=(2, 4), dense_ends=dense_ends)] if nm else [])


def _channel_cuts(model: nn.Module, data: TaskData, cfg: RecipeConfig, speedups: Sequence[float], crit: Criterion,
                  allocator: MetaNetwork | None = None):
    """(speed-up, a pruned copy, its cut) for each reachable speed-up, under ``cfg.allocation``
    (uniform: from one iterative pruning run; ``allocator``: the learned allocation's metanetwork)."""
    x = torch.zeros(data.input_shape, device=next(model.parameters()).device)
    batches = calibration(data, cfg) if crit.data_driven else None
    try:
        for target, result in allocation(cfg.allocation).prune_in_steps(copy.deepcopy(model), x, speedups,
                                                                         allocation_context(data, cfg, allocator),
                                                                         crit, batches):
            pruned = copy.deepcopy(result.model)  # the pruning run goes on from the cut itself
            yield float(target), pruned, ChannelCut(replace(result, model=pruned))
    except UnreachableSpeedupError:
        return


def _weight_cuts(model: nn.Module, data: TaskData, cfg: RecipeConfig, points: Sequence[WeightPruning],
                 crit: Criterion, allocator=None):
    """(the point's key: its sparsity or "N:M", a masked copy, its cut) for each weight pruning."""
    batches = calibration(data, cfg) if crit.data_driven else None
    for pruning in points:
        work = copy.deepcopy(model)
        key = pruning.sparsity if pruning.nm is None else f"{pruning.nm[0]}:{pruning.nm[1]}"
        yield key, work, WeightCut(sparsify(work, pruning, crit, batches), crit.name)


def pruning_curve(model: nn.Module, data: TaskData, cfg: RecipeConfig, points: Sequence = CURVE_SPEEDUPS,
                  split: str = "val", criterion: Criterion | None = None,
                  allocator: MetaNetwork | None = None) -> dict:
    """{point: accuracy on ``split``} right after pruning a copy of ``model`` to each point and the
    recipe's repair (``metanet.recipe.repair``: the layers reading what was cut re-fitted when
    ``cfg.reconstruct`` says so, BatchNorm statistics recomputed); ``model`` is not changed.

    A point is a speed-up (channels, ``cfg.pruning``; NaN where unreachable) or a ``WeightPruning``
    (weights, ``weight_points``; keyed by its sparsity or "N:M"). ``criterion`` ranks at that
    level (default: magnitude); ``allocator``: the metanetwork of ``cfg.allocation`` ``learned``."""
    level = Level.WEIGHTS if any(isinstance(p, WeightPruning) for p in points) else Level.CHANNELS
    crit = criterion or registered("magnitude", level)
    cuts = (_weight_cuts if level is Level.WEIGHTS else _channel_cuts)(model, data, cfg, points, crit, allocator)
    inputs = reconstruction_batches(data, cfg) if cfg.reconstruct is not None else None
    curve = {}
    for key, pruned, cut in cuts:
        repair(pruned, cut, model, data, cfg, inputs)
        curve[key] = evaluate(pruned, data, split)[0]
    if level is Level.WEIGHTS:
        return curve
    return {float(s): curve.get(float(s), float("nan")) for s in points}


def _importance(sparsity: GroupSparsity, model: nn.Module) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}
    norms, ids = sparsity.slice_norms(params)
    return sparsity.channel_importance(norms, ids)


def selectivity(before: nn.Module, after: nn.Module, data: TaskData,
                sparsity: GroupSparsity | None = None) -> dict[str, float]:
    """The selectivity of the edit that turned ``before`` into ``after`` (same architecture)."""
    x = torch.zeros(data.input_shape, device=next(before.parameters()).device)
    sparsity = sparsity or GroupSparsity(copy.deepcopy(before), x, reg=0.0)
    with torch.no_grad():
        return _selectivity(sparsity, _importance(sparsity, before), _importance(sparsity, after))


def _selectivity(sparsity: GroupSparsity, imp0: torch.Tensor, imp1: torch.Tensor) -> dict[str, float]:
    group_of = sparsity.group_of.to(imp0.device)
    ratio = imp1 / imp0.clamp_min(1e-12)
    counts = sparsity.group_reduce(torch.ones_like(ratio), "sum")
    mean = sparsity.group_reduce(ratio, "sum") / counts
    var = sparsity.group_reduce((ratio - mean[group_of]) ** 2, "sum") / (counts - 1).clamp_min(1)
    spread = var.sqrt() / mean.abs().clamp_min(1e-12)
    normalised = imp1 / sparsity.group_reduce(imp1, "amax")[group_of].clamp_min(1e-12)
    return {"ratio_spread": float(spread[counts > 1].mean()), "mean_ratio": float(ratio.mean()),
            "share_below_0.1": float((normalised < LOW_IMPORTANCE).float().mean())}


def diagnose(before: nn.Module, after: nn.Module, data: TaskData, cfg: RecipeConfig,
             speedups: Sequence[float] = CURVE_SPEEDUPS, split: str = "val",
             sparsity: GroupSparsity | None = None, criterion: Criterion | None = None,
             allocator: MetaNetwork | None = None) -> dict[str, float]:
    """Selectivity of ``before -> after``, ``after``'s recalibrated accuracy and its pruning curve
    (``curve_<s>x`` keys and ``auc``; channels ranked by ``criterion``, default magnitude; the
    groups' widths by ``cfg.allocation``, with ``allocator`` for ``learned``), as one flat dict of
    metrics (for tables and MLflow)."""
    out = selectivity(before, after, data, sparsity)
    out["acc_recal"] = recalibrated_accuracy(after, data, cfg, split)
    curve = pruning_curve(after, data, cfg, speedups, split, criterion, allocator)
    out.update({f"curve_{s:g}x": v for s, v in curve.items()})
    out["auc"] = curve_auc(curve)
    return out


def criterion_of(metanet: MetaNetwork, model: nn.Module, x: torch.Tensor, recipe: RecipeConfig,
                 data: TaskData | None = None, level: Level = Level.CHANNELS,
                 dense_ends: bool = True) -> tuple[nn.Module, Criterion]:
    """(the network to prune, what ranks it at ``level``) after ``metanet``: ``model`` and the
    metanetwork's own scores for a learned criterion at that level (``data``'s calibration batches
    where it reads statistics); otherwise the edited network (unchanged by a metanetwork that only
    scores) and the recipe's criterion (magnitude for weights: the paper's unstructured pipeline)."""
    if ranks(metanet, level):
        batches = list(calibration(data, recipe)()) if metanet.config.calibration else None
        return model, learned_criterion(metanet, model, x, batches, dense_ends)
    if level is Level.WEIGHTS and metanet.head.ranks is Level.CHANNELS:
        raise ValueError("a channel-scores metanetwork ranks channels, not weights")
    fallback = registered(recipe.criterion) if level is Level.CHANNELS else registered("magnitude", level)
    return apply_metanetwork(metanet, model, x), fallback


def mean_diagnostics(metanet, models: Sequence[nn.Module], data: TaskData, cfg: RecipeConfig,
                     split: str = "val") -> dict[str, float]:
    """``diagnose`` of ``metanet``'s edit (and, for a learned criterion, its scores as the
    criterion; for an allocation metanetwork, its allocation) on each of ``models``, averaged key by
    key: what meta-training reports for its validation members after an epoch. An empty dict for no
    models; ``metanet`` keeps its mode."""
    if not models:
        return {}
    allocator = metanet if metanet.head.allocates else None
    if allocator is not None:
        cfg = replace(cfg, allocation=Learned.name)
    device = next(metanet.parameters()).device
    was_training = metanet.training
    per = []
    for model in models:
        model = model.to(device).eval()
        x = torch.zeros(data.input_shape, device=device)
        network, crit = criterion_of(metanet, model, x, cfg, data)
        per.append(diagnose(model, network, data, cfg, split=split, criterion=crit, allocator=allocator))
    metanet.train(was_training)
    return {k: sum(d[k] for d in per) / len(per) for k in per[0]}
