"""The pruning recipe, and the baselines it is compared with, under one finetuning budget.

- ``meta``: metanetwork forward -> finetune -> prune to the target speed-up -> finetune; with a
  learned criterion (a ``scores`` metanetwork, ``metanet.scoring``): finetune -> metanetwork
  forward on the finetuned network, its scores ranking the channels -> prune -> finetune;
- ``none``: finetune -> prune -> finetune (pruning without the metanetwork);
- ``depgraph``: sparse learning (finetune with GroupNormPruner's group-sparsity term) -> prune
  -> finetune (DepGraph with sparse learning);
- ``gate``: per-channel gates (``metanet.gates``) optimised on the network itself (``before.steps``
  Adam steps on the meta-objective: task loss with the network's running statistics + the
  scale-free group sparsity ``GroupSparsity.relative`` at ``gate_reg``) -> finetune -> prune -> finetune: the per-network optimisation
  that a gate-editing metanetwork does in one forward pass, so it spends ``before.steps`` more
  steps than the other methods (its gates' optimisation in place of the metanetwork's forward);
- ``oracle``: sparse learning at a strong ``oracle_reg``, the same steps: not a method a user
  would pick (it costs accuracy before pruning) but a per-network optimisation of what the paper's
  objective asks of the metanetwork;
- the hand-crafted criteria (``HAND_CRAFTED``): ``none`` is magnitude; ``taylor``, ``bn_scale``,
  ``lamp``, ``fpgm``, ``hessian``, ``random`` are ``none`` with Torch-Pruning's other importance
  classes (``metanet.criteria``), the data-driven ones on the calibration batches;
- ``curve``: ``none``'s finetune, then per-channel scores optimised on the network with the curve
  objective (``metanet.curve``; ``before.steps`` Adam steps on the scores, the weights untouched)
  and used as the pruner's importance: the per-network reference a learned criterion should
  approach, and the benchmark's sensitivity check.

Weight-level pruning (``sparsify_and_finetune``: a fraction of zero weights, or N:M) takes the
same preparation, then masks weights instead of removing channels: ``none`` by magnitude, ``wanda``
by magnitude x input norm, ``random``, and ``meta`` the paper's way (its edit and the finetune,
then magnitude); the finetune after it keeps the zeros.
Every method spends the same optimiser steps on the weights (``before.steps + after.steps``); after
pruning the BatchNorm statistics are recomputed on ``recal_batches`` training batches for every
method alike, and the data-driven criteria read the same batches.
Accuracy is reported on the validation split at every stage and on the test split at the end;
nothing is selected on test.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from metanet.criteria import Batches, ChannelScores, Criterion, criterion
from metanet.curve import MASKS, fit_scores
from metanet.gates import apply_gates, fit_gates, gate_from_logit
from metanet.graph import graph_to_network, network_to_graph
from metanet.metanetwork import MetaNetwork
from metanet.scoring import gated_by_scores, learned_criterion
from metanet.prune import (DEFAULT_PRUNING, PruneResult, PruneSettings, amounts_for, prune_adaptive, prune_in_steps,
                           prune_to_speedup,
                           recalibrate_bn)
from metanet.reconstruct import ReconstructSettings, reconstruct, reconstruct_masked
from metanet.sparsity import GroupSparsity
from metanet.weight_pruning import (GivenScores, WeightCriterion, WeightPruning, WeightPruningReport, make_permanent,
                                    sparsify, weight_criterion, zero_fraction)
from metanet.data import TaskData
from metanet.train import TrainConfig, evaluate, train

METHODS = ("meta", "none", "depgraph")  # what prune_batch --baselines compares
# hand-crafted criteria: method -> the metanet.criteria criterion its pruner ranks channels by
CRITERION_OF = {"none": "magnitude", "taylor": "taylor", "bn_scale": "bn_scale", "lamp": "lamp", "fpgm": "fpgm",
                "hessian": "hessian", "random": "random"}
HAND_CRAFTED = tuple(CRITERION_OF)
BENCH_METHODS = ("meta", *HAND_CRAFTED, "depgraph", "curve")  # what bench/quality.py compares by default
ALL_METHODS = (*BENCH_METHODS, "gate", "oracle")  # plus the per-network gates and the paper objective's oracle
# weight-level pruning (metanet.weight_pruning): method -> the weight criterion ranking its weights;
# meta is the paper's unstructured pipeline (edit -> finetune -> magnitude pruning -> finetune)
# (with a ``weight_scores`` metanetwork, meta ranks by its learned per-weight scores, and curve
# ranks by per-weight scores optimised on the network: metanet.weight_scoring)
WEIGHT_CRITERION_OF = {"meta": "magnitude", "none": "magnitude", "wanda": "wanda", "random": "random",
                       "curve": "learned"}
WEIGHT_METHODS = tuple(WEIGHT_CRITERION_OF)
WEIGHT_BASELINES = ("none", "wanda")  # what prune_batch --baselines adds to weight-level runs

# The finetuning budget in optimiser steps (docs/method.md, "The pruning recipe's defaults", measured
# with bench/pruner_settings.py): on held-out digits networks at 2x, 'none' ends 0.9 points
# below the unpruned accuracy on average (at most 2.2) with these.
BEFORE_STEPS = 40
AFTER_STEPS = 80
# the recipe's settings as the pipelines name them (prune_batch.py's flags, Tune's search keys):
# the one place their defaults live
RECIPE_DEFAULTS = {"before_steps": BEFORE_STEPS, "before_lr": 0.01, "after_steps": AFTER_STEPS, "after_lr": 0.01,
                   "sparse_reg": 5e-4, "criterion": "magnitude"}
# what each recipe setting may be (``distributed.settings``' limits: pydantic bounds)
RECIPE_LIMITS = {"before_steps": {"ge": 0}, "after_steps": {"ge": 0}, "before_lr": {"gt": 0}, "after_lr": {"gt": 0},
                 "sparse_reg": {"ge": 0}}
RECAL_BATCHES = 10
LEARNED_AS = ("criterion", "gates")
# the reconstruction's settings as the pipelines name them (off unless asked: metanet.reconstruct)
RECONSTRUCT_DEFAULTS = {"reconstruct": False, "reconstruct_batches": ReconstructSettings.batches,
                        "reconstruct_ridge": ReconstructSettings.ridge,
                        "reconstruct_targets": ReconstructSettings.targets}
RECONSTRUCT_LIMITS = {"reconstruct_batches": {"ge": 1}, "reconstruct_ridge": {"ge": 0}}


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
    # what ranks channels for meta, depgraph, gate and oracle (a metanet.criteria name); the
    # hand-crafted methods use their own, curve its scores
    criterion: str = "magnitude"
    recal_batches: int = RECAL_BATCHES  # training batches that recompute BatchNorm statistics after pruning
    floor: float | None = None  # adaptive mode: prune while validation accuracy stays >= floor
    # the curve method (metanet.curve): amounts drawn between those of these speed-ups
    curve_speedups: tuple[float, float] = (1.5, 4.0)
    # soft mask, T 0.2, lr 0.2: the best of bench/curve_objective.py on the digits zoo's validation members
    curve_lr: float = 0.2
    curve_temperature: float = 0.2
    curve_mask: str = "soft"
    curve_distill: float = 0.0
    # a scores metanetwork in ``meta``: "criterion" (its scores rank channels for the pruner) or
    # "gates" (the paper's framing: the scores shrink the channels they drop at ``target``, then the
    # finetune, then magnitude pruning; metanet.scoring.gated_by_scores)
    learned_as: str = "criterion"
    # least-squares reconstruction of the layers that read pruned channels, before BatchNorm is
    # recalibrated (metanet.reconstruct); None: none
    reconstruct: ReconstructSettings | None = None

    def __post_init__(self):
        criterion(self.criterion)  # a known name, or ValueError naming the known ones
        if self.curve_mask not in MASKS:
            raise ValueError(f"curve_mask must be one of {MASKS}, not {self.curve_mask!r}")
        if self.learned_as not in LEARNED_AS:
            raise ValueError(f"learned_as must be one of {', '.join(LEARNED_AS)}, not {self.learned_as!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def recipe_from_settings(settings: dict, *, batch_size: int = 128, augment: bool = True, seed: int = 0,
                         target: float = 2.0, **extra) -> RecipeConfig:
    """The recipe that the pipelines' settings (``before_steps``, ``before_lr``, ``after_steps``,
    ``after_lr``) describe: a constant lr before pruning, cosine after; ``extra`` sets other fields."""
    common = dict(batch_size=batch_size, augment=augment, seed=seed)
    extra.setdefault("criterion", settings.get("criterion", "magnitude"))
    extra.setdefault("learned_as", settings.get("learned_as", "criterion"))
    if settings.get("reconstruct"):
        extra.setdefault("reconstruct", ReconstructSettings(
            batches=int(settings.get("reconstruct_batches", RECONSTRUCT_DEFAULTS["reconstruct_batches"])),
            ridge=float(settings.get("reconstruct_ridge", RECONSTRUCT_DEFAULTS["reconstruct_ridge"])),
            targets=settings.get("reconstruct_targets", RECONSTRUCT_DEFAULTS["reconstruct_targets"])))
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


def reconstruction_batches(data: TaskData, cfg: RecipeConfig) -> list[torch.Tensor]:
    """The calibration inputs of the reconstruction: ``cfg.reconstruct.batches`` shuffled training
    batches, no augmentation, no labels."""
    gen = torch.Generator().manual_seed(cfg.before.seed + 2)
    return [x for x, _ in data.batches("train", cfg.before.batch_size, shuffle=True, generator=gen,
                                       limit=cfg.reconstruct.batches)]


def calibration(data: TaskData, cfg: RecipeConfig) -> Batches:
    """The calibration batches of the data-driven criteria: the same ``cfg.recal_batches`` shuffled
    training batches (no augmentation) at every pruning step, as Torch-Pruning's benchmark does."""
    gen = torch.Generator().manual_seed(cfg.before.seed + 1)
    fixed = list(data.batches("train", cfg.before.batch_size, shuffle=True, generator=gen, limit=cfg.recal_batches))
    return lambda: iter(fixed)


class Prepared(NamedTuple):
    """A method's network ready to prune, its record so far, and the criterion that prunes it."""

    model: nn.Module
    record: dict
    criterion: Criterion


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


def curve_scores(model: nn.Module, data: TaskData, cfg: RecipeConfig) -> ChannelScores:
    """The ``curve`` method's criterion: scores fitted to ``model`` with the curve objective."""
    x = torch.zeros(data.input_shape, device=_device(model))
    amounts = list(amounts_for(model, x, sorted(cfg.curve_speedups), cfg.pruning).values())
    b = cfg.before
    scores, masker = fit_scores(model, data, amounts, steps=b.steps, batch_size=b.batch_size, seed=b.seed,
                                lr=cfg.curve_lr, temperature=cfg.curve_temperature, mode=cfg.curve_mask,
                                distill=cfg.curve_distill)
    return ChannelScores(masker.module_scores(scores))


def scores_metanet(metanet: MetaNetwork | None) -> bool:
    """Is ``metanet`` a learned criterion (edit ``scores``) rather than an edit of the weights?"""
    return metanet is not None and metanet.config.edit == "scores"


def weight_scores_metanet(metanet: MetaNetwork | None) -> bool:
    """Is ``metanet`` a learned weight-level criterion (edit ``weight_scores``)?"""
    return metanet is not None and metanet.config.edit == "weight_scores"


def reads_labels(method: str, metanet: MetaNetwork | None, cfg: RecipeConfig) -> bool:
    """Does ``method`` read labelled data with no training step at all (post-training pruning:
    ``before.steps`` and ``after.steps`` 0)? The data-driven criteria (a task-loss gradient),
    ``curve`` (its scores are fitted on the task loss) and a learned criterion that reads
    calibration statistics or the curve gradient; the reconstruction reads inputs only."""
    if method == "curve":
        return True
    if method == "meta":
        return scores_metanet(metanet) and bool(metanet.config.calibration or metanet.config.gradient)
    return criterion(CRITERION_OF.get(method, cfg.criterion)).data_driven


def prepare_reads_target(method: str, metanet: MetaNetwork | None, learned_as: str) -> bool:
    """Does ``prepare`` read ``cfg.target``? Only for a learned criterion used as gates, which are
    sized for the target (``gated_by_scores``): a store of results keys the rows it prepares on it."""
    return method == "meta" and scores_metanet(metanet) and learned_as == "gates"


def prepare(model: nn.Module, data: TaskData, method: str, cfg: RecipeConfig,
            metanet: MetaNetwork | None = None, level: str = "channels") -> Prepared:
    """The method's part before pruning, on a copy of ``model``: the metanetwork edit (``meta``)
    or sparse learning (``depgraph``), then ``cfg.before``'s finetuning; for ``curve`` then the
    scores. Shared by every target. ``level`` "weights": for ``sparsify_and_finetune``, which
    computes its own (weight-level) criterion."""
    if method not in ALL_METHODS and method not in WEIGHT_METHODS:
        raise ValueError(f"method must be one of {ALL_METHODS + ('wanda',)}, not {method!r}")
    if method == "meta" and metanet is None:
        raise ValueError("method 'meta' needs a metanetwork")
    if method == "meta" and weight_scores_metanet(metanet) and level != "weights":
        raise ValueError("a weight_scores metanetwork ranks weights: prune with sparsity or N:M, not channels")
    start = time.perf_counter()
    x = torch.zeros(data.input_shape, device=_device(model))
    model = copy.deepcopy(model)
    record: dict = {"method": method, "val_acc_start": evaluate(model, data, "val")[0]}
    extra = None
    batches = list(calibration(data, cfg)()) if scores_metanet(metanet) and metanet.config.calibration else None
    if method == "meta" and weight_scores_metanet(metanet):
        pass  # a learned weight-level criterion: no edit (its scores rank the finetuned network's weights)
    elif method == "meta" and not scores_metanet(metanet):
        model = apply_metanetwork(metanet, model, x)
        record["val_acc_after_metanet"] = evaluate(model, data, "val")[0]
    elif prepare_reads_target(method, metanet, cfg.learned_as):  # the scores as an edit: magnitude prunes afterwards
        amount = amounts_for(model, x, [cfg.target], cfg.pruning)[cfg.target]
        model = gated_by_scores(metanet, model, x, amount, cfg.curve_temperature, batches)
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
    chosen = criterion(CRITERION_OF.get(method, cfg.criterion))
    if level == "weights":
        pass  # the weight-level criterion is computed when the weights are pruned
    elif method == "curve":
        chosen = curve_scores(model, data, cfg)
    elif method == "meta" and scores_metanet(metanet) and cfg.learned_as == "criterion":
        chosen = learned_criterion(metanet, model, x, batches)  # a learned criterion: scores of the finetuned network
    record["criterion"] = chosen.name
    record["seconds_before_prune"] = time.perf_counter() - start
    return Prepared(model, record, chosen)


def prune_and_finetune(prepared: Prepared, data: TaskData, cfg: RecipeConfig, report_test: bool = True,
                       extra_after: Sequence[int] = ()) -> tuple[nn.Module, dict]:
    """Prunes a copy of ``prepared.model`` with its criterion to ``cfg.target`` (or, with
    ``cfg.floor``, while validation accuracy stays at or above it), then finetunes with
    ``cfg.after``; returns it and its record. ``extra_after``: other finetuning budgets (steps),
    each run on its own copy of the pruned network, recorded as ``val_acc_ft<N>``/``test_acc_ft<N>``
    (0 steps is ``*_acc_pruned``: BatchNorm recalibrated, no finetuning)."""
    start = time.perf_counter()
    x = torch.zeros(data.input_shape, device=_device(prepared.model))
    model = copy.deepcopy(prepared.model)
    batches = calibration(data, cfg) if prepared.criterion.data_driven else None
    if cfg.floor is None:
        result = prune_to_speedup(model, x, cfg.target, cfg.pruning, prepared.criterion, batches)
    else:
        def score(m: nn.Module) -> float:
            return evaluate(recalibrate(copy.deepcopy(m), data, cfg), data, "val")[0]

        result = prune_adaptive(model, x, score, cfg.floor, cfg.pruning, criterion=prepared.criterion,
                                batches=batches)
        model = result.model
    return _finish(model, result, prepared, data, cfg, report_test, extra_after, time.perf_counter() - start)


def _finish(model: nn.Module, result: PruneResult, prepared: Prepared, data: TaskData, cfg: RecipeConfig,
            report_test: bool, extra_after: Sequence[int], pruning_seconds: float) -> tuple[nn.Module, dict]:
    """A pruned ``model``: BatchNorm recalibrated, evaluated, finetuned (each budget), its record."""
    start = time.perf_counter()
    record = dict(prepared.record, target=cfg.target, floor=cfg.floor)
    if cfg.reconstruct is not None and isinstance(result, PruneResult):
        # the unpruned network's outputs on calibration inputs, re-fitted; then BN as always
        report = reconstruct(model, prepared.model, result.channels, reconstruction_batches(data, cfg),
                             cfg.reconstruct)
        record.update(report.summary())
    if cfg.reconstruct is None or cfg.reconstruct.recalibrates(channels=isinstance(result, PruneResult)):
        recalibrate(model, data, cfg)
    record.update(result.summary())
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
    return model, record


class _WeightResult:
    """``_finish``'s view of a weight-level pruning: what the row records about it."""

    def __init__(self, report: WeightPruningReport):
        self.report = report

    def summary(self) -> dict:
        s = self.report.settings
        return {"sparsity": s.sparsity, "nm": f"{s.nm[0]}:{s.nm[1]}" if s.nm else None,
                "layers_pruned": len(self.report.layers)}


def weight_criterion_for(prepared: Prepared, data: TaskData, cfg: RecipeConfig, pruning: WeightPruning,
                         metanet: MetaNetwork | None = None) -> WeightCriterion:
    """The weight criterion of ``prepared``'s method (``WEIGHT_CRITERION_OF``): a registered one,
    a ``weight_scores`` metanetwork's scores of the prepared network (``meta``), or per-weight
    scores optimised on it for ``cfg.before.steps`` steps (``curve``)."""
    from metanet.weight_scoring import fit_weight_scores, learned_weight_criterion

    method = prepared.record["method"]
    if method not in WEIGHT_CRITERION_OF:
        raise ValueError(f"method {method!r} prunes channels only; weight-level methods: {', '.join(WEIGHT_METHODS)}")
    if method == "meta" and weight_scores_metanet(metanet):
        x = torch.zeros(data.input_shape, device=_device(prepared.model))
        return learned_weight_criterion(metanet, prepared.model, x, pruning.dense_ends)
    if method == "curve":
        b = cfg.before
        return GivenScores(fit_weight_scores(prepared.model, data, steps=max(b.steps, 1), batch_size=b.batch_size,
                                             seed=b.seed, dense_ends=pruning.dense_ends), name="curve")
    return weight_criterion(WEIGHT_CRITERION_OF[method])


def sparsify_and_finetune(prepared: Prepared, data: TaskData, cfg: RecipeConfig, pruning: WeightPruning,
                          report_test: bool = True, extra_after: Sequence[int] = (),
                          metanet: MetaNetwork | None = None) -> tuple[nn.Module, dict]:
    """Weight-level pruning of a copy of ``prepared.model`` (``metanet.weight_pruning``; the
    method's weight criterion, ``WEIGHT_CRITERION_OF``), BatchNorm recalibrated, then ``cfg.after``'s
    finetune with the masks kept (zeros stay zeros); returns the network with plain weights and its
    record: ``sparsity_measured`` (zeros among the pruned layers' weights), ``params_nonzero``,
    ``layers_pruned``."""
    start = time.perf_counter()
    chosen = weight_criterion_for(prepared, data, cfg, pruning, metanet)
    model = copy.deepcopy(prepared.model)
    report = sparsify(model, pruning, chosen, calibration(data, cfg) if chosen.data_driven else None)
    fitted = {}
    if cfg.reconstruct is not None:  # each pruned layer re-fitted with its mask fixed
        fitted = reconstruct_masked(model, prepared.model, report.layers, reconstruction_batches(data, cfg),
                                    cfg.reconstruct).summary()
    prepared = prepared._replace(record=dict(prepared.record, criterion=chosen.name, **fitted))
    model, record = _finish(model, _WeightResult(report), prepared, data, cfg, report_test, extra_after,
                            time.perf_counter() - start)
    make_permanent(model)
    record.update(target=None, floor=None, sparsity_measured=zero_fraction(model, report.layers),
                  params_nonzero=sum(int(torch.count_nonzero(p)) for p in model.parameters()))
    return model, record


def prune_with_method(model: nn.Module, data: TaskData, method: str, cfg: RecipeConfig,
                      metanet: MetaNetwork | None = None, report_test: bool = True) -> tuple[nn.Module, dict]:
    """Runs one method on a copy of ``model``; returns the pruned, finetuned model and its record
    (test accuracy only when ``report_test``: selection code never looks at it)."""
    return prune_and_finetune(prepare(model, data, method, cfg, metanet), data, cfg, report_test)


def prune_to_targets(model: nn.Module, data: TaskData, method: str, cfg: RecipeConfig, targets: Sequence[float],
                     metanet: MetaNetwork | None = None, report_test: bool = True,
                     inspect: Callable[[Prepared], None] | None = None,
                     extra_after: Sequence[int] = ()) -> list[tuple[nn.Module, dict]]:
    """Prepares ``model`` once (``prepare``), then prunes a copy to each of ``targets`` and finetunes
    it: the (model, record) pairs in the order of ``targets``. The targets share the method's part
    before pruning, as they do in ``prune_batch`` (which prunes row by row, to record each row's
    failure). ``inspect`` sees the prepared network before pruning (diagnostics)."""
    prepared = prepare(model, data, method, cfg, metanet)
    if inspect is not None:
        inspect(prepared)
    if cfg.floor is not None:
        return [prune_and_finetune(prepared, data, replace(cfg, target=float(t)), report_test, extra_after)
                for t in targets]
    # one iterative pruning run serves every target: the schedule to a higher target passes
    # through the lower ones step for step, so a copy at each is what pruning to it alone gives
    x = torch.zeros(data.input_shape, device=_device(prepared.model))
    work = copy.deepcopy(prepared.model)
    batches = calibration(data, cfg) if prepared.criterion.data_driven else None
    out: dict[float, tuple[nn.Module, dict]] = {}
    seconds, start = 0.0, time.perf_counter()  # pruning time up to each target, as if pruned alone
    for target, result in prune_in_steps(work, x, sorted(float(t) for t in targets), cfg.pruning,
                                         prepared.criterion, batches):
        seconds += time.perf_counter() - start
        snapshot = copy.deepcopy(result.model)
        out[target] = _finish(snapshot, replace(result, model=snapshot), prepared, data, replace(cfg, target=target),
                              report_test, extra_after, seconds)
        start = time.perf_counter()
    return [out[float(t)] for t in targets]
