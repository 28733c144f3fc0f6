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
from typing import Sequence

import torch
from torch import nn

from metanet.criteria import Criterion, criterion
from metanet.heads import ranks
from metanet.levels import Level
from metanet.metanetwork import MetaNetwork, apply_metanetwork
from metanet.scoring import learned_criterion
from metanet.reconstruct import reconstruct
from metanet.recipe import RecipeConfig, calibration, recalibrate, reconstruction_batches
from metanet.prune import UnreachableSpeedupError, prune_in_steps
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


def pruning_curve(model: nn.Module, data: TaskData, cfg: RecipeConfig, speedups: Sequence[float] = CURVE_SPEEDUPS,
                  split: str = "val", criterion: Criterion | None = None) -> dict[float, float]:
    """{speed-up: accuracy on ``split``} right after pruning a copy of ``model`` to each speed-up
    (``cfg.pruning``, channels ranked by ``criterion``, default magnitude), re-fitting the layers
    that read pruned channels when ``cfg.reconstruct`` says so (``metanet.reconstruct``), and
    recomputing BatchNorm statistics; ``model`` is not changed."""
    device = next(model.parameters()).device
    work = copy.deepcopy(model)
    x = torch.zeros(data.input_shape, device=device)
    curve: dict[float, float] = {}
    batches = calibration(data, cfg) if criterion is not None and criterion.data_driven else None
    inputs = reconstruction_batches(data, cfg) if cfg.reconstruct is not None else None
    try:
        for target, result in prune_in_steps(work, x, speedups, cfg.pruning, criterion, batches):
            if inputs is None:
                curve[target] = recalibrated_accuracy(result.model, data, cfg, split)
                continue
            pruned = copy.deepcopy(result.model)  # on a copy: the pruning run goes on from the cut itself
            reconstruct(pruned, model, result.channels, inputs, cfg.reconstruct)
            curve[target] = (recalibrated_accuracy(pruned, data, cfg, split) if cfg.reconstruct.recalibrates(True)
                             else evaluate(pruned, data, split)[0])
    except UnreachableSpeedupError:
        pass
    return {float(s): curve.get(float(s), float("nan")) for s in speedups}


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


def weight_pruning_curve(model: nn.Module, data: TaskData, cfg: RecipeConfig, criterion,
                         sparsities: Sequence[float] = CURVE_SPARSITIES, split: str = "val", nm: bool = False,
                         dense_ends: bool = True, scope: str = "global") -> dict:
    """The weight-level pruning curve: {sparsity (and, with ``nm``, "2:4"): accuracy on ``split``}
    right after masking a copy of ``model``'s weights (``metanet.weight_pruning``, ranked by the
    weight ``criterion``) and recomputing BatchNorm statistics; ``model`` is not changed."""

    runs = [(s, WeightPruning(sparsity=s, scope=scope, dense_ends=dense_ends)) for s in sparsities]
    if nm:
        runs.append(("2:4", WeightPruning(nm=(2, 4), dense_ends=dense_ends)))
    batches = calibration(data, cfg) if criterion.data_driven else None
    curve = {}
    for key, pruning in runs:
        work = copy.deepcopy(model)
        sparsify(work, pruning, criterion, batches)
        curve[key] = recalibrated_accuracy(work, data, cfg, split)
    return curve


def recalibrated_accuracy(model: nn.Module, data: TaskData, cfg: RecipeConfig, split: str = "val") -> float:
    """Accuracy of a copy of ``model`` after recomputing its BatchNorm statistics."""
    return evaluate(recalibrate(copy.deepcopy(model), data, cfg), data, split)[0]


def diagnose(before: nn.Module, after: nn.Module, data: TaskData, cfg: RecipeConfig,
             speedups: Sequence[float] = CURVE_SPEEDUPS, split: str = "val",
             sparsity: GroupSparsity | None = None, criterion: Criterion | None = None) -> dict[str, float]:
    """Selectivity of ``before -> after``, ``after``'s recalibrated accuracy and its pruning curve
    (``curve_<s>x`` keys and ``auc``; channels ranked by ``criterion``, default magnitude), as one
    flat dict of metrics (for tables and MLflow)."""
    out = selectivity(before, after, data, sparsity)
    out["acc_recal"] = recalibrated_accuracy(after, data, cfg, split)
    curve = pruning_curve(after, data, cfg, speedups, split, criterion)
    out.update({f"curve_{s:g}x": v for s, v in curve.items()})
    out["auc"] = curve_auc(curve)
    return out


def criterion_of(metanet: MetaNetwork, model: nn.Module, x: torch.Tensor, recipe: RecipeConfig,
                 data: TaskData | None = None):
    """What ranks ``model``'s channels after ``metanet``: its own scores for a learned criterion
    (a ``scores`` metanetwork; ``data``'s calibration batches where it reads statistics), else the
    recipe's criterion on the edited weights."""
    if not ranks(metanet, Level.CHANNELS):
        return criterion(recipe.criterion)
    batches = list(calibration(data, recipe)()) if metanet.config.calibration else None
    return learned_criterion(metanet, model, x, batches)


def mean_diagnostics(metanet, models: Sequence[nn.Module], data: TaskData, cfg: RecipeConfig,
                     split: str = "val") -> dict[str, float]:
    """``diagnose`` of ``metanet``'s edit (and, for a learned criterion, its scores as the
    criterion) on each of ``models``, averaged key by key: what meta-training reports for its
    validation members after an epoch. An empty dict for no models; ``metanet`` keeps its mode."""
    if not models:
        return {}
    device = next(metanet.parameters()).device
    was_training = metanet.training
    per = []
    for model in models:
        model = model.to(device).eval()
        x = torch.zeros(data.input_shape, device=device)
        per.append(diagnose(model, apply_metanetwork(metanet, model, x), data, cfg, split=split,
                            criterion=criterion_of(metanet, model, x, cfg, data)))
    metanet.train(was_training)
    return {k: sum(d[k] for d in per) / len(per) for k in per[0]}
