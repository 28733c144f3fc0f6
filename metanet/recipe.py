"""The pruning recipe, and the baselines it is compared with, under one finetuning budget.

- ``meta``: metanetwork forward -> finetune -> prune to the target speed-up -> finetune;
- ``none``: finetune -> prune -> finetune (pruning without the metanetwork);
- ``depgraph``: sparse learning (finetune with GroupNormPruner's group-sparsity term) -> prune
  -> finetune (DepGraph with sparse learning);
- ``gate``: per-channel gates (``metanet.gates``) optimised on the network itself (``before.steps``
  Adam steps on the meta-objective: task loss with the network's running statistics + the
  scale-free group sparsity ``GroupSparsity.relative`` at ``gate_reg``) -> finetune -> prune -> finetune: the per-network optimisation
  that a gate-editing metanetwork does in one forward pass, so it spends ``before.steps`` more
  steps than the other methods (its gates' optimisation in place of the metanetwork's forward);
- ``oracle``: sparse learning at a strong ``oracle_reg``, the same steps: not a method a user
  would pick (it costs accuracy before pruning) but the benchmark's sensitivity check, a per-network
  optimisation of what the metanetwork is meant to learn.

Every method spends the same optimiser steps (``before.steps + after.steps``); after pruning the
BatchNorm statistics are recomputed on ``recal_batches`` training batches for every method alike.
Accuracy is reported on the validation split at every stage and on the test split at the end;
nothing is selected on test.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import torch
from torch import nn

from metanet.gates import apply_gates, fit_gates, gate_from_logit
from metanet.graph import graph_to_network, network_to_graph
from metanet.metanetwork import MetaNetwork
from metanet.prune import DEFAULT_PRUNING, PruneSettings, prune_adaptive, prune_to_speedup, recalibrate_bn
from metanet.sparsity import GroupSparsity
from metanet.data import TaskData
from metanet.train import TrainConfig, evaluate, train

METHODS = ("meta", "none", "depgraph")  # what prune_batch compares
ALL_METHODS = (*METHODS, "gate", "oracle")  # plus the per-network gates and the sensitivity check

# The finetuning budget in optimiser steps (README, "The pruning recipe's defaults", measured
# with bench/pruner_settings.py): on held-out digits networks at 2x, 'none' ends 0.9 points
# below the unpruned accuracy on average (at most 2.2) with these.
BEFORE_STEPS = 40
AFTER_STEPS = 80
# the recipe's settings as the pipelines name them (prune_batch.py's flags, Tune's search keys):
# the one place their defaults live
RECIPE_DEFAULTS = {"before_steps": BEFORE_STEPS, "before_lr": 0.01, "after_steps": AFTER_STEPS, "after_lr": 0.01,
                   "sparse_reg": 5e-4}
RECAL_BATCHES = 10


@dataclass
class RecipeConfig:
    target: float = 2.0
    before: TrainConfig = field(default_factory=lambda: TrainConfig(steps=BEFORE_STEPS, lr=0.01, schedule="constant"))
    after: TrainConfig = field(default_factory=lambda: TrainConfig(steps=AFTER_STEPS, lr=0.01, schedule="cosine"))
    sparse_reg: float = 5e-4  # DepGraph sparse learning (Torch-Pruning's benchmark value)
    sparse_alpha: float = 4.0
    oracle_reg: float = 5e-2  # the sensitivity check's strong sparse learning
    gate_reg: float = 3.0  # the gate baseline's sparsity (GroupSparsity.relative's scale)
    gate_lr: float = 0.05
    pruning: PruneSettings = DEFAULT_PRUNING
    recal_batches: int = RECAL_BATCHES  # training batches that recompute BatchNorm statistics after pruning
    floor: float | None = None  # adaptive mode: prune while validation accuracy stays >= floor

    def to_dict(self) -> dict:
        return asdict(self)


def recipe_from_settings(settings: dict, *, batch_size: int = 128, augment: bool = True, seed: int = 0,
                         target: float = 2.0, **extra) -> RecipeConfig:
    """The recipe that the pipelines' settings (``before_steps``, ``before_lr``, ``after_steps``,
    ``after_lr``) describe: a constant lr before pruning, cosine after; ``extra`` sets other fields."""
    common = dict(batch_size=batch_size, augment=augment, seed=seed)
    return RecipeConfig(target=target, **extra,
                        before=TrainConfig(steps=int(settings["before_steps"]), lr=settings["before_lr"],
                                           schedule="constant", **common),
                        after=TrainConfig(steps=int(settings["after_steps"]), lr=settings["after_lr"],
                                          schedule="cosine", **common))


def recalibrate(model: nn.Module, data: TaskData, cfg: RecipeConfig) -> nn.Module:
    """BatchNorm statistics recomputed on ``cfg.recal_batches`` training batches (no augmentation)."""
    gen = torch.Generator().manual_seed(cfg.before.seed)
    batches = (x for x, _ in data.batches("train", cfg.before.batch_size, shuffle=True, generator=gen,
                                         limit=cfg.recal_batches))
    return recalibrate_bn(model, batches)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def apply_metanetwork(metanet: MetaNetwork, model: nn.Module, example_inputs: torch.Tensor) -> nn.Module:
    """One metanetwork forward pass: a new module of ``model``'s architecture with edited weights."""
    metanet.eval().to(example_inputs.device)
    return graph_to_network(metanet(network_to_graph(model, example_inputs)), model)


def gate_logits_for(model: nn.Module, data: TaskData, cfg: RecipeConfig):
    """(``model``'s graph, per-channel gate logits optimised on it for ``cfg.before.steps`` steps,
    one training batch each, at ``cfg.gate_reg``)."""
    graph = network_to_graph(model, torch.zeros(data.input_shape, device=_device(model)))
    b = cfg.before
    return graph, fit_gates(model, graph, data, steps=b.steps, batches_per_step=1, batch_size=b.batch_size,
                            augment=b.augment, seed=b.seed, reg=cfg.gate_reg, alpha=cfg.sparse_alpha, lr=cfg.gate_lr)


def optimised_gates(model: nn.Module, data: TaskData, cfg: RecipeConfig) -> nn.Module:
    """``model`` with per-channel gates optimised on it: the ``gate`` baseline's edit."""
    graph, logit = gate_logits_for(model, data, cfg)
    return graph_to_network(apply_gates(graph, gate_from_logit(logit)), model)


def prepare(model: nn.Module, data: TaskData, method: str, cfg: RecipeConfig,
            metanet: MetaNetwork | None = None) -> tuple[nn.Module, dict]:
    """The method's part before pruning, on a copy of ``model``: the metanetwork edit (``meta``)
    or sparse learning (``depgraph``), then ``cfg.before``'s finetuning. Shared by every target."""
    if method not in ALL_METHODS:
        raise ValueError(f"method must be one of {ALL_METHODS}, not {method!r}")
    if method == "meta" and metanet is None:
        raise ValueError("method 'meta' needs a metanetwork")
    start = time.perf_counter()
    x = torch.zeros(data.input_shape, device=_device(model))
    model = copy.deepcopy(model)
    record: dict = {"method": method, "val_acc_start": evaluate(model, data, "val")[0]}
    extra = None
    if method == "meta":
        model = apply_metanetwork(metanet, model, x)
        record["val_acc_after_metanet"] = evaluate(model, data, "val")[0]
    elif method == "gate":
        model = optimised_gates(model, data, cfg)
        record["val_acc_after_gates"] = evaluate(model, data, "val")[0]
    elif method in ("depgraph", "oracle"):
        reg = cfg.sparse_reg if method == "depgraph" else cfg.oracle_reg
        sparsity = GroupSparsity(model, x, reg=reg, alpha=cfg.sparse_alpha)
        extra = lambda m: sparsity(dict(m.named_parameters()))  # noqa: E731
    train(model, data, cfg.before, extra_loss=extra)
    record["val_acc_before_prune"] = evaluate(model, data, "val")[0]
    record["seconds_before_prune"] = time.perf_counter() - start
    return model, record


def prune_and_finetune(prepared: nn.Module, data: TaskData, cfg: RecipeConfig, record: dict,
                       report_test: bool = True) -> tuple[nn.Module, dict]:
    """Prunes a copy of ``prepared`` to ``cfg.target`` (or, with ``cfg.floor``, while validation
    accuracy stays at or above it), then finetunes with ``cfg.after``; returns it and its record."""
    start = time.perf_counter()
    x = torch.zeros(data.input_shape, device=_device(prepared))
    model = copy.deepcopy(prepared)
    record = dict(record, target=cfg.target, floor=cfg.floor)
    if cfg.floor is None:
        result = prune_to_speedup(model, x, cfg.target, cfg.pruning)
    else:
        def score(m: nn.Module) -> float:
            return evaluate(recalibrate(copy.deepcopy(m), data, cfg), data, "val")[0]

        result = prune_adaptive(model, x, score, cfg.floor, cfg.pruning)
        model = result.model
    recalibrate(model, data, cfg)
    record.update(result.summary())
    record["val_acc_pruned"], _ = evaluate(model, data, "val")
    if report_test:
        record["test_acc_pruned"], _ = evaluate(model, data, "test")
    train(model, data, cfg.after)
    record["val_acc"], record["val_loss"] = evaluate(model, data, "val")
    if report_test:
        record["test_acc"], record["test_loss"] = evaluate(model, data, "test")
    record["seconds"] = record.get("seconds_before_prune", 0.0) + time.perf_counter() - start
    return model, record


def prune_with_method(model: nn.Module, data: TaskData, method: str, cfg: RecipeConfig,
                      metanet: MetaNetwork | None = None, report_test: bool = True) -> tuple[nn.Module, dict]:
    """Runs one method on a copy of ``model``; returns the pruned, finetuned model and its record
    (test accuracy only when ``report_test``: selection code never looks at it)."""
    prepared, record = prepare(model, data, method, cfg, metanet)
    return prune_and_finetune(prepared, data, cfg, record, report_test)


def prune_to_targets(model: nn.Module, data: TaskData, method: str, cfg: RecipeConfig, targets: Sequence[float],
                     metanet: MetaNetwork | None = None, report_test: bool = True,
                     inspect: Callable[[nn.Module], None] | None = None) -> list[tuple[nn.Module, dict]]:
    """Prepares ``model`` once (``prepare``), then prunes a copy to each of ``targets`` and finetunes
    it: the (model, record) pairs in the order of ``targets``. The targets share the method's part
    before pruning, as they do in ``prune_batch`` (which prunes row by row, to record each row's
    failure). ``inspect`` sees the prepared model before pruning (diagnostics)."""
    prepared, record = prepare(model, data, method, cfg, metanet)
    if inspect is not None:
        inspect(prepared)
    return [prune_and_finetune(prepared, data, replace(cfg, target=float(t)), record, report_test) for t in targets]
