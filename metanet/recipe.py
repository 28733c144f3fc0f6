"""The pruning recipe, the same for every method under one finetuning budget: the method's part
before pruning (``metanet.methods``: an edit, sparse learning or nothing) -> finetune -> prune to the
target speed-up with the method's criterion -> (optionally the least-squares reconstruction) ->
BatchNorm recalibrated -> finetune.

Weight-level pruning (``prune_and_finetune(..., weights=...)``: a fraction of zero weights, or N:M)
takes the same preparation and the same steps after the cut, but masks weights instead of removing
channels, ranked by the method's weight criterion; the finetune after it keeps the zeros.
Every method spends the same optimiser steps on the weights (``before.steps + after.steps``); after
pruning the BatchNorm statistics are recomputed on ``recal_batches`` training batches for every
method alike, and the data-driven criteria read the same batches.
Accuracy is reported on the validation split at every stage and on the test split at the end;
nothing is selected on test.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from metanet.criteria import Criterion
from metanet.data import TaskData
from metanet.levels import Level
from metanet.metanetwork import MetaNetwork
from metanet.methods import example_input, method as method_of
from metanet.allocation import allocation
from metanet.prune import PruneResult, prune_adaptive
from metanet.recipe_settings import (AFTER_STEPS, BEFORE_STEPS, RECIPE_DEFAULTS, RECIPE_LIMITS,  # noqa: F401
                                     RECONSTRUCT_DEFAULTS, RECONSTRUCT_LIMITS, RecipeConfig, calibration,
                                     allocation_context, recalibrate, recalibrated_accuracy, recipe_from_settings,
                                     reconstruction_batches)
from metanet.reconstruct import reconstruct, reconstruct_masked
from metanet.train import evaluate, train
from metanet.weight_pruning import WeightPruning, WeightPruningReport, make_permanent, sparsify, zero_fraction


class Prepared(NamedTuple):
    """A method's network ready to prune, its record so far, and the criterion that prunes it."""

    model: nn.Module
    record: dict
    criterion: Criterion


def reads_labels(method: str, metanet: MetaNetwork | None, cfg: RecipeConfig) -> bool:
    """Does ``method`` read labelled data with no training step at all (post-training pruning:
    ``before.steps`` and ``after.steps`` 0)? The data-driven criteria (a task-loss gradient),
    ``curve`` (its scores are fitted on the task loss) and a learned criterion that reads
    calibration statistics or the curve gradient; the reconstruction reads inputs only."""
    return method_of(method).reads_labels(metanet, cfg)


def prepare_reads_target(method: str, metanet: MetaNetwork | None, learned_as: str) -> bool:
    """Does ``prepare`` read ``cfg.target``? Only for a learned criterion used as gates, which are
    sized for the target (``gated_by_scores``): a store of results keys the rows it prepares on it."""
    return method_of(method).reads_target(metanet, learned_as)


def prepare(model: nn.Module, data: TaskData, method: str, cfg: RecipeConfig,
            metanet: MetaNetwork | None = None, level: Level | str = Level.CHANNELS) -> Prepared:
    """The method's part before pruning, on a copy of ``model`` (``metanet.methods``: its edit or
    sparse learning), then ``cfg.before``'s finetuning, then its channel criterion (for ``curve``
    the fitted scores). Shared by every target. ``level`` weights: for a weight-level
    ``prune_and_finetune``, which computes the method's weight criterion when it prunes."""
    chosen_method, level = method_of(method), Level.of(level)
    chosen_method.check(metanet, level)
    start = time.perf_counter()
    model = copy.deepcopy(model)
    record: dict = {"method": method, "val_acc_start": evaluate(model, data, "val")[0]}
    model, extra = chosen_method.before_finetune(model, data, cfg, metanet, record)
    train(model, data, cfg.before, extra_loss=extra)
    record["val_acc_before_prune"] = evaluate(model, data, "val")[0]
    if level is Level.WEIGHTS:  # the weight criterion is computed when the weights are pruned
        chosen = chosen_method.registered_criterion(cfg)
    else:
        chosen = chosen_method.criterion(model, data, cfg, metanet)
    record["criterion"] = chosen.name
    record["seconds_before_prune"] = time.perf_counter() - start
    return Prepared(model, record, chosen)


def prune_and_finetune(prepared: Prepared, data: TaskData, cfg: RecipeConfig, report_test: bool = True,
                       extra_after: Sequence[int] = (), weights: WeightPruning | None = None,
                       metanet: MetaNetwork | None = None, allocator: MetaNetwork | None = None
                       ) -> tuple[nn.Module, dict]:
    """Prunes a copy of ``prepared.model`` and finetunes it with ``cfg.after``; returns it and its
    record. Channels (``weights`` None): with its criterion to ``cfg.target`` (or, with ``cfg.floor``,
    while validation accuracy stays at or above it). Weights (``weights``: a fraction of zeros or
    N:M, ``metanet.weight_pruning``): ranked by the method's weight criterion (``metanet.methods``;
    ``metanet``: a learned one), the finetune keeps the zeros and the network comes back with plain
    weights, its record saying ``sparsity_measured`` (zeros among the pruned layers' weights),
    ``params_nonzero`` and ``layers_pruned``. Either way the layers that read what was cut are
    re-fitted if ``cfg.reconstruct`` says so, and BatchNorm recalibrated. ``extra_after``: other
    finetuning budgets (steps), each run on its own copy of the pruned network, recorded as
    ``val_acc_ft<N>``/``test_acc_ft<N>`` (0 steps is ``*_acc_pruned``: no finetuning).
    ``allocator``: the allocation metanetwork of ``cfg.allocation`` ``learned``."""
    start = time.perf_counter()
    if weights is not None:
        chosen = weight_criterion_for(prepared, data, cfg, weights, metanet)
        model = copy.deepcopy(prepared.model)
        cut: Cut = WeightCut(sparsify(model, weights, chosen, calibration(data, cfg) if chosen.data_driven else None),
                               chosen.name)
        return _finish(model, cut, prepared, data, cfg, report_test, extra_after, time.perf_counter() - start)
    x = example_input(prepared.model, data)
    model = copy.deepcopy(prepared.model)
    batches = calibration(data, cfg) if prepared.criterion.data_driven else None
    if cfg.floor is None:
        # the allocation (uniform: today's per-layer pruner) says how many channels each group keeps,
        # the criterion which ones
        context = allocation_context(data, cfg, allocator)
        [(_, result)] = allocation(cfg.allocation).prune_in_steps(model, x, [cfg.target], context, prepared.criterion,
                                                                  batches)
    else:
        result = prune_adaptive(model, x, lambda m: recalibrated_accuracy(m, data, cfg), cfg.floor, cfg.pruning, criterion=prepared.criterion,
                                batches=batches)
        model = result.model
    return _finish(model, ChannelCut(result), prepared, data, cfg, report_test, extra_after,
                   time.perf_counter() - start)


class Cut:
    """What the recipe needs of a pruning after the cut, at its level: what the row records about it,
    the repair of the layers that read what was cut, and what is settled after the finetune."""

    level: Level

    def summary(self) -> dict:
        raise NotImplementedError

    def repair(self, model: nn.Module, reference: nn.Module, inputs: list[torch.Tensor], settings):
        raise NotImplementedError

    def settle(self, model: nn.Module, record: dict) -> None:
        """After the finetune: nothing for channels (the network is smaller)."""


class ChannelCut(Cut):
    level = Level.CHANNELS

    def __init__(self, result: PruneResult):
        self.result = result

    def summary(self) -> dict:
        return self.result.summary()

    def repair(self, model, reference, inputs, settings):
        return reconstruct(model, reference, self.result.channels, inputs, settings)


class WeightCut(Cut):
    level = Level.WEIGHTS

    def __init__(self, report: WeightPruningReport, criterion: str):
        self.report, self.criterion = report, criterion

    def summary(self) -> dict:
        s = self.report.settings
        return {"criterion": self.criterion, "sparsity": s.sparsity, "nm": f"{s.nm[0]}:{s.nm[1]}" if s.nm else None,
                "layers_pruned": len(self.report.layers)}

    def repair(self, model, reference, inputs, settings):
        return reconstruct_masked(model, reference, self.report.layers, inputs, settings)  # each mask kept

    def settle(self, model, record):
        make_permanent(model)  # plain weights, the zeros in them
        record.update(target=None, floor=None, sparsity_measured=zero_fraction(model, self.report.layers),
                      params_nonzero=sum(int(torch.count_nonzero(p)) for p in model.parameters()))


def repair(model: nn.Module, cut: Cut, reference: nn.Module, data: TaskData, cfg: RecipeConfig,
           inputs: list[torch.Tensor] | None = None) -> dict:
    """The repair after ``cut``, in place: the layers reading what was cut re-fitted to ``reference``
    (the unpruned network) on calibration inputs when ``cfg.reconstruct`` says so (``inputs``: those
    inputs, if already drawn), then BatchNorm statistics recomputed as the settings say. Returns
    what the re-fit reports (empty without one)."""
    summary = {}
    if cfg.reconstruct is not None:
        inputs = reconstruction_batches(data, cfg) if inputs is None else inputs
        summary = cut.repair(model, reference, inputs, cfg.reconstruct).summary()
    if cfg.reconstruct is None or cfg.reconstruct.recalibrates(channels=cut.level is Level.CHANNELS):
        recalibrate(model, data, cfg)
    return summary


def _finish(model: nn.Module, cut: Cut, prepared: Prepared, data: TaskData, cfg: RecipeConfig,
            report_test: bool, extra_after: Sequence[int], pruning_seconds: float) -> tuple[nn.Module, dict]:
    """A pruned ``model``: re-fitted (``cfg.reconstruct``), BatchNorm recalibrated, evaluated,
    finetuned (each budget), its record."""
    start = time.perf_counter()
    record = dict(prepared.record, target=cfg.target, floor=cfg.floor)
    record.update(repair(model, cut, prepared.model, data, cfg))
    record.update(cut.summary())
    record["val_acc_pruned"], _ = evaluate(model, data, "val")
    if report_test:
        record["test_acc_pruned"], _ = evaluate(model, data, "test")
    for steps in extra_after:
        other = copy.deepcopy(model)
        train(other, data, replace(cfg.after, steps=int(steps)))
        record[f"val_acc_ft{steps}"] = evaluate(other, data, "val")[0]
        if report_test:
            record[f"test_acc_ft{steps}"] = evaluate(other, data, "test")[0]
    train(model, data, cfg.after)
    record["val_acc"], record["val_loss"] = evaluate(model, data, "val")
    if report_test:
        record["test_acc"], record["test_loss"] = evaluate(model, data, "test")
    record["seconds"] = record.get("seconds_before_prune", 0.0) + pruning_seconds + time.perf_counter() - start
    cut.settle(model, record)
    return model, record


def weight_criterion_for(prepared: Prepared, data: TaskData, cfg: RecipeConfig, pruning: WeightPruning,
                         metanet: MetaNetwork | None = None):
    """The weight criterion of ``prepared``'s method (``metanet.methods``): a registered one, a
    ``weight_scores`` metanetwork's scores of the prepared network (``meta``), or per-weight scores
    optimised on it for ``cfg.before.steps`` steps (``curve``)."""
    return method_of(prepared.record["method"]).criterion(prepared.model, data, cfg, metanet, Level.WEIGHTS,
                                                          pruning.dense_ends)


def prune_with_method(model: nn.Module, data: TaskData, method: str, cfg: RecipeConfig,
                      metanet: MetaNetwork | None = None, report_test: bool = True) -> tuple[nn.Module, dict]:
    """Runs one method on a copy of ``model``; returns the pruned, finetuned model and its record
    (test accuracy only when ``report_test``: selection code never looks at it)."""
    return prune_and_finetune(prepare(model, data, method, cfg, metanet), data, cfg, report_test)


def prune_to_targets(model: nn.Module, data: TaskData, method: str, cfg: RecipeConfig, targets: Sequence[float],
                     metanet: MetaNetwork | None = None, report_test: bool = True,
                     inspect: Callable[[Prepared], None] | None = None,
                     extra_after: Sequence[int] = (), allocator: MetaNetwork | None = None
                     ) -> list[tuple[nn.Module, dict]]:
    """Prepares ``model`` once (``prepare``), then prunes a copy to each of ``targets`` and finetunes
    it: the (model, record) pairs in the order of ``targets``. The targets share the method's part
    before pruning, as they do in ``prune_batch`` (which prunes row by row, to record each row's
    failure). ``inspect`` sees the prepared network before pruning (diagnostics); ``allocator``: the
    allocation metanetwork of ``cfg.allocation`` ``learned``."""
    prepared = prepare(model, data, method, cfg, metanet)
    if inspect is not None:
        inspect(prepared)
    if cfg.floor is not None:
        return [prune_and_finetune(prepared, data, replace(cfg, target=float(t)), report_test, extra_after,
                                   allocator=allocator) for t in targets]
    # uniform: one iterative pruning run serves every target (the schedule to a higher target passes
    # through the lower ones step for step, so a copy at each is what pruning to it alone gives);
    # another allocation prunes each target from the unpruned network
    chosen = allocation(cfg.allocation)
    x = example_input(prepared.model, data)
    work = copy.deepcopy(prepared.model)
    batches = calibration(data, cfg) if prepared.criterion.data_driven else None
    out: dict[float, tuple[nn.Module, dict]] = {}
    seconds, start = 0.0, time.perf_counter()  # pruning time up to each target, as if pruned alone
    context = allocation_context(data, cfg, allocator)
    for target, result in chosen.prune_in_steps(work, x, targets, context, prepared.criterion, batches):
        seconds = (seconds if chosen.one_run else 0.0) + time.perf_counter() - start
        snapshot = copy.deepcopy(result.model)
        out[target] = _finish(snapshot, ChannelCut(replace(result, model=snapshot)), prepared, data,
                              replace(cfg, target=target), report_test, extra_after, seconds)
        start = time.perf_counter()
    return [out[float(t)] for t in targets]
