"""Choosing a metanetwork among checkpoints, on validation members only: one score, one rule.

Every place that compares metanetworks (``meta_train``'s kept checkpoints, a Tune trial's epochs,
the benchmarks' epochs) scores with ``score`` and chooses with ``choose``; in one process,
``train_and_select`` meta-trains, scores every few epochs and loads the checkpoint it chose (Tune's
trials and the benchmarks; ``meta_train.py`` trains on Ray Train's workers and chooses among the
checkpoints they kept).

- ``recipe`` (the default): validation accuracy at the end of a short pruning recipe
  (``selection_recipe``: the metanetwork edit -> ``steps`` finetuning steps -> prune to each target
  -> ``steps`` finetuning steps), averaged over members and targets;
- ``auc``: the area under the edited networks' pruning curve (accuracy right after pruning, BatchNorm
  recalibrated, no finetuning), free when it was computed as a diagnostic during training.

An allocation metanetwork is scored by the same short recipe with magnitude ranking inside the
groups it allocates (``allocation`` ``learned``): what it decides is how many channels each keeps.

``bench/selection.py`` measured both against the outcome of the full recipe on other validation
members (docs/method.md, "Choosing the metanetwork's checkpoint"). Accuracy right after pruning without recalibration sits at
chance for every checkpoint on small budgets: it cannot rank them, so it is not offered.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from metanet.allocation import Learned
from metanet.data import TaskData
from metanet.criteria import criterion
from metanet.diagnostics import criterion_of, curve_auc, pruning_curve, weight_points
from metanet.levels import Level
from metanet.methods import MAGNITUDE
from metanet.meta_training import MetaTrainConfig, meta_train, snapshot
from metanet.metanetwork import MetaNetwork
from metanet.objectives import Member, objective
from metanet.recipe import RecipeConfig, prune_to_targets, recipe_from_settings

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
          sparsities: Sequence[float] | None = None, allocator: MetaNetwork | None = None) -> float:
    """The validation score of ``metanet`` on ``models`` (see the module docstring); ``targets``
    defaults to ``recipe.target``. With ``sparsities``, a weight-level metanetwork's: the mean
    validation accuracy right after pruning to each fraction of zeros, BatchNorm recalibrated
    (``metanet.diagnostics.criterion_of``). ``allocator``: the allocation metanetwork when
    ``recipe.allocation`` reads one and ``metanet`` is a criterion. Never reads the test split."""
    if objective not in SELECTIONS:
        raise ValueError(f"selection objective must be one of {', '.join(SELECTIONS)}, not {objective!r}")
    if not models:
        raise ValueError("no validation members to score a metanetwork on")
    if sparsities:
        x = torch.zeros(data.input_shape, device=next(metanet.parameters()).device)
        areas = []
        for m in models:
            network, crit = criterion_of(metanet, m, x, recipe, data, Level.WEIGHTS)
            areas.append(curve_auc(pruning_curve(network, data, recipe, weight_points(sparsities), criterion=crit)))
        return sum(areas) / len(areas)
    decides_widths = metanet.head.allocates
    if decides_widths:  # what it decides is the widths: either score runs under the learned allocation
        allocator, recipe = metanet, replace(recipe, allocation=Learned.name)
    # else ``allocator``: the allocation metanetwork of a recipe whose allocation reads one (a Tune
    # trial that prunes with its criterion inside the shipped learned allocation)
    if objective == "auc":
        device = next(metanet.parameters()).device
        x = torch.zeros(data.input_shape, device=device)
        areas = []
        for m in models:
            network, crit = (m, None) if decides_widths else criterion_of(metanet, m, x, recipe, data)
            areas.append(curve_auc(pruning_curve(network, data, recipe, criterion=crit, allocator=allocator)))
        return sum(areas) / len(areas)
    method, criterion_net = (MAGNITUDE, None) if decides_widths else ("meta", metanet)
    scores = [record["val_acc"] for model in models
              for _, record in prune_to_targets(model, data, method, recipe, targets or [recipe.target], criterion_net,
                                                report_test=False, allocator=allocator)]
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


@dataclass
class Selection:
    """What ``train_and_select`` chose: the ``epoch`` (-1: the untrained metanetwork) and its
    ``score``, and every scored epoch's row (``history``: its training metrics and what
    ``validate`` returned)."""

    epoch: int
    score: float
    history: list[dict]


Validate = Callable[[MetaNetwork], "float | Mapping[str, float]"]
Report = Callable[[int, dict, MetaNetwork, "dict | None"], None]


def train_and_select(metanet: MetaNetwork, members: Sequence[Member], data: TaskData, cfg: MetaTrainConfig,
                     validate: Validate, *, every: int = 1, untrained: bool = True, final: bool = True,
                     report: Report | None = None, progress: bool = False) -> Selection:
    """Meta-trains ``metanet`` (``meta_train``) and leaves it at the checkpoint ``choose`` picks.

    ``validate(metanet)`` scores a checkpoint on validation members only (a number, or a dict with
    a ``score`` and anything else worth keeping); it runs before training when ``untrained``, after
    every ``every``-th epoch and, when ``final``, after the last. A snapshot of each scored
    checkpoint is kept in memory. ``report(epoch, metrics, metanet, scored)`` sees every epoch
    (``scored``: the row of a scored one, else None; epoch -1 for the untrained one): a Tune trial
    reports there, a benchmark logs. With no usable score (none due, or every one NaN) the
    metanetwork stays as trained and the selection's score is NaN."""
    history, kept = [], {}

    def scored(epoch: int, metrics: dict, net: MetaNetwork) -> dict:
        found = validate(net)
        row = {"epoch": epoch, **metrics, **(dict(found) if isinstance(found, Mapping) else {"score": float(found)})}
        history.append(row)
        kept[epoch] = snapshot(net)
        return row

    if untrained:
        row = scored(-1, {}, metanet)
        if report is not None:
            report(-1, {}, metanet, row)

    def on_epoch(epoch: int, metrics: dict, net: MetaNetwork) -> None:
        due = (epoch + 1) % every == 0 or (final and epoch == cfg.epochs - 1)
        row = scored(epoch, metrics, net) if due else None
        if report is not None:
            report(epoch, metrics, net, row)

    meta_train(metanet, members, data, cfg, on_epoch=on_epoch, progress=progress)
    scores = {row["epoch"]: row["score"] for row in history}
    if not any(s == s for s in scores.values()):  # nothing scored (or only NaN): the trained network as it is
        return Selection(cfg.epochs - 1, float("nan"), history)
    epoch, value = choose(scores)
    metanet.load_state_dict(kept[epoch])
    return Selection(epoch, value, history)
