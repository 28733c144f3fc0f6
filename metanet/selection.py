"""Choosing a metanetwork among checkpoints, on validation members only: one score, one rule.

Every place that compares metanetworks (``meta_train``'s kept checkpoints, a Tune trial's epochs,
``bench/quality.py``'s epochs) scores with ``score`` and chooses with ``choose``.

- ``recipe`` (the default): validation accuracy at the end of a short pruning recipe
  (``selection_recipe``: the metanetwork edit -> ``steps`` finetuning steps -> prune to each target
  -> ``steps`` finetuning steps), averaged over members and targets;
- ``auc``: the area under the edited networks' pruning curve (accuracy right after pruning, BatchNorm
  recalibrated, no finetuning), free when it was computed as a diagnostic during training.

``bench/selection.py`` measured both against the outcome of the full recipe on other validation
members (docs/method.md, "Choosing the metanetwork's checkpoint"). Accuracy right after pruning without recalibration sits at
chance for every checkpoint on small budgets: it cannot rank them, so it is not offered.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from metanet.data import TaskData
from metanet.criteria import criterion
from metanet.diagnostics import criterion_of, curve_auc, pruning_curve, weight_pruning_curve
from metanet.metanetwork import MetaNetwork, apply_metanetwork
from metanet.objectives import objective
from metanet.recipe import RecipeConfig, prune_to_targets, recipe_from_settings
from metanet.weight_scoring import weight_level_view

SELECTIONS = ("recipe", "auc")  # how a run's checkpoints are scored
SELECT_STEPS = 18  # about one epoch of digits at batch 64 (bench/selection.py's short recipe)


def selection_recipe(finetune: Mapping, steps: int = SELECT_STEPS, *, lr: float = 0.01, target: float = 2.0,
                     seed: int = 0) -> RecipeConfig:
    """The pruning recipe (constant lr before pruning, cosine after) shortened to ``steps`` finetuning
    steps on each side; ``finetune`` is the zoo's batch size and augmentation."""
    settings = {"before_steps": steps, "before_lr": lr, "after_steps": steps, "after_lr": lr}
    return recipe_from_settings(settings, **finetune, seed=seed, target=target)


def score(metanet: MetaNetwork, models: Sequence[nn.Module], data: TaskData, recipe: RecipeConfig,
          objective: str = "recipe", targets: Sequence[float] | None = None,
          sparsities: Sequence[float] | None = None) -> float:
    """The validation score of ``metanet`` on ``models`` (see the module docstring); ``targets``
    defaults to ``recipe.target``. With ``sparsities``, a weight-level metanetwork's: the mean
    validation accuracy right after pruning to each fraction of zeros, BatchNorm recalibrated
    (``metanet.weight_scoring.weight_level_view``). Never reads the test split."""
    if objective not in SELECTIONS:
        raise ValueError(f"selection objective must be one of {', '.join(SELECTIONS)}, not {objective!r}")
    if not models:
        raise ValueError("no validation members to score a metanetwork on")
    if sparsities:
        x = torch.zeros(data.input_shape, device=next(metanet.parameters()).device)
        areas = []
        for m in models:
            network, crit = weight_level_view(metanet, m, x)
            areas.append(curve_auc(weight_pruning_curve(network, data, recipe, crit, sparsities)))
        return sum(areas) / len(areas)
    if objective == "auc":
        device = next(metanet.parameters()).device
        x = torch.zeros(data.input_shape, device=device)
        areas = [curve_auc(pruning_curve(apply_metanetwork(metanet, m, x), data, recipe,
                                         criterion=criterion_of(metanet, m, x, recipe, data))) for m in models]
        return sum(areas) / len(areas)
    scores = [record["val_acc"] for model in models
              for _, record in prune_to_targets(model, data, "meta", recipe, targets or [recipe.target], metanet,
                                                report_test=False)]
    return sum(scores) / len(scores)


def default_selection(training_objective: str) -> str:
    """The selection score for a metanetwork trained with ``training_objective``: ``auc`` for a
    learned criterion (the curve objective), the short ``recipe`` for an edit. Measured by
    ``bench/selection.py`` (docs/method.md): the edit's curve area ranks checkpoints backwards
    (Spearman -0.75 with the full recipe's outcome, the short recipe 0.67-0.82); a learned
    criterion's ranks them better than the short recipe (0.61 against 0.57 and 0.36)."""
    return objective(training_objective).selection


def choose(scores: Mapping[int, float]) -> tuple[int, float]:
    """(epoch, score) of the best checkpoint: the highest score; a tie goes to the later epoch
    (the longer-trained metanetwork). Scores that are NaN never win."""
    ranked = [(s, e) for e, s in scores.items() if s == s]
    if not ranked:
        raise ValueError("no checkpoint has a score to choose by")
    best_score, best_epoch = max(ranked)
    return best_epoch, best_score
