"""metaprune's Python API, for people who prune with Torch-Pruning and keep their own loop.

Three calls:

- ``load_metanetwork(source)``: a metanetwork file (``meta_train.py``'s ``metanetwork.pt``), an MLflow
  URI (``models:/NAME/VERSION``, ``runs:/RUN_ID/metanetwork``; the store ``MLFLOW_TRACKING_URI``
  names), or, with no source, the learned criterion shipped with the package (``metanet.pretrained``);
- ``importance(model, example_inputs, criterion, ...)``: a Torch-Pruning ``Importance`` for
  ``model``, for ``tp.pruner.MetaPruner`` or any other Torch-Pruning pruner: the learned criterion's
  scores (``"meta"``, by ``metanet`` or the shipped one; ``calibration``: (x, y) batches, for a metanetwork that reads
  channel statistics), ``"curve"`` (scores fitted to the network with the curve objective on
  ``data``'s training split), or any registered criterion by name (``magnitude``, ``fpgm``,
  ``taylor``, ... : ``metanet.criteria``);
- ``prune(model, data, speedup, method, ...)``: the whole recipe in one call (the method, pruning to
  a MAC speed-up, the repair, the finetune), for users who do not want a loop.

::

    import torch_pruning as tp
    from metanet import api

    imp = api.importance(model, example_inputs, "meta", calibration=batches)  # the shipped metanetwork
    pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=0.5,
                                  ignored_layers=[model.fc])
    pruner.step()

A learned or ``curve`` importance holds scores of the network as it was when they were made: in a
pruning of several steps, prune interactively and tell it what went (``for group in
pruner.step(interactive=True): imp.observe(group); group.prune()``). A registered criterion reads the
network as it is; Torch-Pruning's gradient criteria (``taylor``, ``hessian``) read the gradients the
caller's loop computes, as in Torch-Pruning.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch_pruning as tp
from torch import nn

from metanet.allocation import ALLOCATIONS
from metanet.criteria import criterion as registered
from metanet.criteria import names as criterion_names
from metanet.data import TaskData
from metanet.levels import Level
from metanet.metanetwork import MetaNetwork
from metanet.metanetwork import load_metanetwork as _load
from metanet.methods import curve_scores
from metanet.methods import method as method_of
from metanet.prune import DEFAULT_PRUNING
from metanet.recipe import prune_to_targets
from metanet.recipe_settings import RECIPE_DEFAULTS, recipe_from_settings
from metanet.scoring import learned_criterion
from metanet.sources import ALLOCATION, CRITERION, resolve

LEARNED = "meta"  # the learned criterion, as prune_batch's --methods names it
CURVE = "curve"  # scores fitted to the network (the per-network curve objective)
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def load_metanetwork(source: str | os.PathLike | MetaNetwork | None = None, role: str = CRITERION) -> MetaNetwork:
    """The metanetwork at ``source`` (a file ``meta_train.py`` wrote, or an MLflow URI), ``source``
    itself, or with None the shipped metanetwork of ``role`` (``criterion`` or ``allocation``)."""
    if isinstance(source, MetaNetwork):
        return source
    return _load(resolve(source, role).path)[0]


def importance(model: nn.Module, example_inputs: torch.Tensor, criterion: str = LEARNED, *,
               metanet: str | os.PathLike | MetaNetwork | None = None, calibration: Batches | None = None,
               data: TaskData | None = None, curve_steps: int = RECIPE_DEFAULTS["before_steps"],
               normalizer: str | None = DEFAULT_PRUNING.normalizer) -> tp.importance.Importance:
    """A Torch-Pruning importance of ``model``'s channels by ``criterion`` (see the module docstring);
    ``normalizer``: Torch-Pruning's within-group normaliser (the pruner's default here)."""
    if criterion == LEARNED:
        net = load_metanetwork(metanet)
        if net.head.ranks is not Level.CHANNELS:
            raise ValueError(f"this metanetwork's edit is {net.config.edit!r}: it does not rank channels "
                             "(a learned channel criterion is meta-trained with --objective curve)")
        batches = None
        if net.config.calibration:
            if calibration is None:
                raise ValueError("this metanetwork reads calibration statistics: give calibration=[(x, y), ...]")
            batches = list(calibration)
        found = learned_criterion(net, model, example_inputs, batches)
    elif criterion == CURVE:
        if data is None:
            raise ValueError("importance 'curve' fits scores on the task's training split: give data=TaskData")
        settings = dict(RECIPE_DEFAULTS, before_steps=curve_steps)
        found = curve_scores(model, data, recipe_from_settings(settings))
    elif criterion in criterion_names(Level.CHANNELS):
        found = registered(criterion)
    else:
        raise ValueError(f"unknown criterion {criterion!r}; known: {LEARNED}, {CURVE}, "
                         f"{', '.join(criterion_names(Level.CHANNELS))}")
    return found.importance(model, normalizer)


def prune(model: nn.Module, data: TaskData, speedup: float, method: str = LEARNED, *,
          metanet: str | os.PathLike | MetaNetwork | None = None, before_steps: int = RECIPE_DEFAULTS["before_steps"],
          finetune_steps: int = RECIPE_DEFAULTS["after_steps"], reconstruct: bool = False,
          allocation: str = RECIPE_DEFAULTS["allocation"], allocator: str | os.PathLike | MetaNetwork | None = None,
          seed: int = 0, report_test: bool = True) -> tuple[nn.Module, dict]:
    """A pruned copy of ``model`` at ``speedup`` (MACs) and its record, by the recipe
    ``prune_batch`` runs: ``method``'s step before pruning and ``before_steps`` finetuning steps,
    the cut (``allocation``: how many channels each group keeps; ``allocator``: the learned
    allocation's metanetwork, by default the shipped one), the repair (BatchNorm recalibrated, or the least-squares re-fit with
    ``reconstruct``), ``finetune_steps`` finetuning steps. ``model`` is not changed."""
    method_of(method)  # a known method, or one line naming the known ones
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; known: {', '.join(ALLOCATIONS)}")
    settings = dict(RECIPE_DEFAULTS, before_steps=before_steps, after_steps=finetune_steps, reconstruct=reconstruct,
                    allocation=allocation)
    cfg = recipe_from_settings(settings, seed=seed, target=float(speedup))
    net = load_metanetwork(metanet) if method_of(method).uses_metanet else None
    alloc = load_metanetwork(allocator, ALLOCATION) if ALLOCATIONS[allocation].reads_allocator else None
    [(pruned, record)] = prune_to_targets(model, data, method, cfg, [float(speedup)], net, report_test=report_test,
                                          allocator=alloc)
    return pruned, record
