"""The pruning methods: one class per name in ``METHODS``, each saying what it does before pruning
and which criterion prunes (``metanet.recipe.prepare`` asks the method, never its name).

- ``meta``: the metanetwork: an edit of the weights before the finetune, or a learned criterion
  (``scores``: its scores rank the finetuned network's channels, or, ``learned_as="gates"``, shrink
  the channels they drop at the target before the finetune; ``weight_scores``: its scores rank
  weights);
- the hand-crafted criteria: ``none`` is magnitude; ``taylor``, ``bn_scale``, ``lamp``, ``fpgm``,
  ``hessian``, ``random`` are ``none`` with Torch-Pruning's other importance classes
  (``metanet.criteria``), the data-driven ones on the calibration batches;
- ``depgraph``: sparse learning (the finetune with GroupNormPruner's group-sparsity term);
- ``oracle``: the same at a strong ``oracle_reg``: not a method a user would pick (it costs accuracy
  before pruning) but a per-network optimisation of what the paper's objective asks of the metanetwork;
- ``gate``: per-channel gates optimised on the network itself (``before.steps`` Adam steps on the
  meta-objective: task loss with the network's running statistics + the scale-free group sparsity at
  ``gate_reg``), so it spends ``before.steps`` more steps than the others: the per-network
  optimisation that a gate-editing metanetwork does in one forward pass;
- ``curve``: per-channel (or per-weight) scores optimised on the finetuned network with the curve
  objective (``metanet.curve``; ``before.steps`` Adam steps, the weights untouched): the per-network
  reference a learned criterion should approach;
- ``wanda`` (weights only): magnitude x input norm.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn

from metanet.criteria import Criterion, GivenScores, criterion
from metanet.curve import fit_scores
from metanet.data import TaskData
from metanet.gates import apply_gates, fit_gates, gate_from_logit
from metanet.graph import graph_to_network, network_to_graph
from metanet.heads import ranks
from metanet.levels import Level
from metanet.metanetwork import MetaNetwork, apply_metanetwork
from metanet.prune import amounts_for
from metanet.recipe_settings import RecipeConfig, calibration
from metanet.registry import Registry
from metanet.scoring import gated_by_scores, learned_criterion
from metanet.sparsity import GroupSparsity
from metanet.train import evaluate
from metanet.masks import WeightMask

BOTH = frozenset(Level)
ExtraLoss = Callable[[nn.Module], torch.Tensor]


def example_input(model: nn.Module, data: TaskData) -> torch.Tensor:
    """A zero input of ``data``'s shape on ``model``'s device: what tracing and counting run on."""
    return torch.zeros(data.input_shape, device=next(model.parameters()).device)


class Method:
    """One pruning method. Class attributes:

    - ``levels``: what it can prune (channels, weights or both);
    - ``channel_criterion`` / ``weight_criterion_name``: the registered criterion that ranks, where
      it is a fixed one (None for channels: the recipe's ``criterion``);
    - ``hand_crafted``: a hand-crafted criterion (a candidate for "the best hand-crafted");
    - ``benchmarked``: compared by ``bench/quality.py`` by default (not the per-network gates and
      the paper objective's oracle);
    - ``baseline_at``: the levels at which ``prune_batch --baselines`` adds it;
    - ``uses_metanet``: it needs a metanetwork file;
    - ``lead``: its place among the methods a run's paired tables lead with (None: not one).
    """

    name: ClassVar[str]
    levels: ClassVar[frozenset[Level]] = frozenset({Level.CHANNELS})
    channel_criterion: ClassVar[str | None] = None
    weight_criterion_name: ClassVar[str | None] = None
    hand_crafted: ClassVar[bool] = False
    benchmarked: ClassVar[bool] = True
    baseline_at: ClassVar[frozenset[Level]] = frozenset()
    uses_metanet: ClassVar[bool] = False
    # a method a run's paired tables lead with (compared against every other method and the best
    # hand-crafted criterion), in this order: the learned criterion, then its per-network reference
    lead: ClassVar[int | None] = None

    def check(self, metanet: MetaNetwork | None, level: Level) -> None:
        """ValueError if the method cannot run at ``level`` (with ``metanet``)."""
        if level not in self.levels:
            raise ValueError(f"method {self.name!r} prunes {', '.join(sorted(v.value for v in self.levels))} only; "
                             f"{level.value}-level methods: {', '.join(names(level))}")

    def before_finetune(self, model: nn.Module, data: TaskData, cfg: RecipeConfig, metanet: MetaNetwork | None,
                        record: dict) -> tuple[nn.Module, ExtraLoss | None]:
        """The method's change of ``model`` before the finetune (recorded in ``record``), and the
        term it adds to the finetune's loss (or None)."""
        return model, None

    def registered_criterion(self, cfg: RecipeConfig) -> Criterion:
        """Its fixed channel criterion, or the recipe's ``criterion``."""
        return criterion(self.channel_criterion or cfg.criterion)

    def criterion(self, model: nn.Module, data: TaskData, cfg: RecipeConfig, metanet: MetaNetwork | None,
                  level: Level = Level.CHANNELS, dense_ends: bool = True) -> Criterion:
        """What ranks ``model``'s channels or weights (after the finetune; ``dense_ends``: a weight
        pruning keeps the first layer and the classifier dense)."""
        if level is Level.CHANNELS:
            return self.registered_criterion(cfg)
        self.check(metanet, Level.WEIGHTS)
        return criterion(self.weight_criterion_name, Level.WEIGHTS)

    def reads_labels(self, metanet: MetaNetwork | None, cfg: RecipeConfig) -> bool:
        """Does it read labelled data even with no training step (post-training pruning)?"""
        return self.registered_criterion(cfg).data_driven

    def reads_target(self, metanet: MetaNetwork | None, learned_as: str) -> bool:
        """Does its part before pruning read the target speed-up?"""
        return False


METHODS: Registry[Method] = Registry("method")
register = METHODS.add  # instances: one class (HandCrafted, SparseLearning) serves several names
method = METHODS  # method(name): the method called ``name``; ValueError naming the known ones


def names(level: Level | None = None, **where) -> tuple[str, ...]:
    """The registered methods' names (at ``level``; with each attribute in ``where`` equal to its value)."""
    return tuple(n for n, m in METHODS.items()
                 if (level is None or level in m.levels) and all(getattr(m, k) == v for k, v in where.items()))


def uses_metanet(methods) -> bool:
    """Does any of ``methods`` (names) need a metanetwork?"""
    return any(METHODS[m].uses_metanet for m in methods if m in METHODS)


def leads(methods) -> list[str]:
    """The methods among ``methods`` (names) that a paired table leads with, in their order."""
    return sorted((m for m in methods if m in METHODS and METHODS[m].lead is not None), key=lambda m: METHODS[m].lead)


def baselines(level: Level) -> tuple[str, ...]:
    """What ``prune_batch --baselines`` adds at ``level``."""
    return tuple(n for n, m in METHODS.items() if level in m.baseline_at)


class Meta(Method):
    """The metanetwork, by its head (``metanet.heads``): an edit, or a learned criterion."""

    name = "meta"
    levels = BOTH
    uses_metanet = True
    lead = 0

    def check(self, metanet, level):
        if metanet is None:
            raise ValueError("method 'meta' needs a metanetwork")
        if ranks(metanet, Level.WEIGHTS) and level is not Level.WEIGHTS:
            raise ValueError("a weight_scores metanetwork ranks weights: prune with sparsity or N:M, not channels")
        if metanet.head.allocates:
            raise ValueError("an allocation metanetwork says how many channels each group keeps, not which: "
                             "give it as the allocation's (--allocation learned --allocator FILE)")

    def reads_target(self, metanet, learned_as):
        # a learned criterion used as gates, which are sized for the target (``gated_by_scores``)
        return ranks(metanet, Level.CHANNELS) and learned_as == "gates"

    def reads_labels(self, metanet, cfg):
        return ranks(metanet, Level.CHANNELS) and bool(metanet.config.calibration or metanet.config.gradient)

    def before_finetune(self, model, data, cfg, metanet, record):
        x = example_input(model, data)
        if metanet.head.edits:
            model = apply_metanetwork(metanet, model, x)
        elif self.reads_target(metanet, cfg.learned_as):  # the scores as an edit: magnitude prunes afterwards
            amount = amounts_for(model, x, [cfg.target], cfg.pruning)[cfg.target]
            model = gated_by_scores(metanet, model, x, amount, cfg.curve_temperature, _calibration(metanet, data, cfg))
        else:
            return model, None  # a learned criterion: no edit (its scores rank the finetuned network)
        record["val_acc_after_metanet"] = evaluate(model, data, "val")[0]
        return model, None

    def criterion(self, model, data, cfg, metanet, level=Level.CHANNELS, dense_ends=True):
        # its scores rank at their own level (channel scores only as a criterion, not as gates)
        if ranks(metanet, level) and (level is Level.WEIGHTS or cfg.learned_as == "criterion"):
            x = example_input(model, data)
            return learned_criterion(metanet, model, x, _calibration(metanet, data, cfg), dense_ends)
        if level is Level.CHANNELS:
            return self.registered_criterion(cfg)
        return criterion("magnitude", Level.WEIGHTS)  # the paper's unstructured pipeline: its edit, then magnitude


def _calibration(metanet: MetaNetwork, data: TaskData, cfg: RecipeConfig):
    """The calibration batches a learned criterion reads (None if it reads none)."""
    return list(calibration(data, cfg)()) if metanet.config.calibration else None


class HandCrafted(Method):
    """A hand-crafted criterion (``metanet.criteria``) ranking the finetuned network."""

    hand_crafted = True

    def __init__(self, name: str, channel: str, weight: str | None = None, baseline_at=frozenset()):
        self.name, self.channel_criterion, self.weight_criterion_name = name, channel, weight
        self.levels = frozenset({Level.CHANNELS} | ({Level.WEIGHTS} if weight else set()))
        self.baseline_at = frozenset(baseline_at)


class SparseLearning(Method):
    """The finetune before pruning with GroupNormPruner's group-sparsity term at ``reg_field``."""

    def __init__(self, name: str, reg_field: str, benchmarked: bool, baseline_at=frozenset()):
        self.name, self.reg_field, self.benchmarked = name, reg_field, benchmarked
        self.baseline_at = frozenset(baseline_at)

    def before_finetune(self, model, data, cfg, metanet, record):
        x = example_input(model, data)
        sparsity = GroupSparsity(model, x, reg=getattr(cfg, self.reg_field), alpha=cfg.sparse_alpha)
        return model, lambda m: sparsity(dict(m.named_parameters()))


def gate_logits_for(model: nn.Module, data: TaskData, cfg: RecipeConfig):
    """(``model``'s graph, per-channel gate logits optimised on it for ``cfg.before.steps`` steps,
    one training batch each, at ``cfg.gate_reg``)."""
    graph = network_to_graph(model, example_input(model, data))
    b = cfg.before
    return graph, fit_gates(model, graph, data, steps=b.steps, batches_per_step=1, batch_size=b.batch_size,
                            augment=b.augment, seed=b.seed, reg=cfg.gate_reg, alpha=cfg.sparse_alpha, lr=cfg.gate_lr)


class Gate(Method):
    """Per-channel gates optimised on the network itself."""

    name = "gate"
    benchmarked = False

    def before_finetune(self, model, data, cfg, metanet, record):
        graph, logit = gate_logits_for(model, data, cfg)
        model = graph_to_network(apply_gates(graph, gate_from_logit(logit)), model)
        record["val_acc_after_gates"] = evaluate(model, data, "val")[0]
        return model, None


def curve_scores(model: nn.Module, data: TaskData, cfg: RecipeConfig) -> GivenScores:
    """The ``curve`` method's criterion: scores fitted to ``model`` with the curve objective."""
    x = example_input(model, data)
    amounts = list(amounts_for(model, x, sorted(cfg.curve_speedups), cfg.pruning).values())
    b = cfg.before
    scores, masker = fit_scores(model, data, amounts, steps=b.steps, batch_size=b.batch_size, seed=b.seed,
                                lr=cfg.curve_lr, temperature=cfg.curve_temperature, mode=cfg.curve_mask,
                                distill=cfg.curve_distill)
    return masker.criterion(scores)


class Curve(Method):
    """Scores fitted to the finetuned network with the curve objective (channels or weights)."""

    name = "curve"
    levels = BOTH
    lead = 1

    def criterion(self, model, data, cfg, metanet, level=Level.CHANNELS, dense_ends=True):
        if level is Level.CHANNELS:
            return curve_scores(model, data, cfg)
        b, mask = cfg.before, WeightMask(model, dense_ends)
        scores, _ = fit_scores(model, data, mask.amounts, steps=max(b.steps, 1), batch_size=b.batch_size,
                               seed=b.seed, masker=mask)
        return mask.criterion(scores, "curve")

    def reads_labels(self, metanet, cfg):
        return True  # its scores are fitted on the task loss


class Wanda(Method):
    name = "wanda"
    levels = frozenset({Level.WEIGHTS})
    weight_criterion_name = "wanda"
    baseline_at = frozenset({Level.WEIGHTS})


register(Meta())
MAGNITUDE = "none"  # the method that prunes by magnitude with no step before (the paper's "none")
register(HandCrafted(MAGNITUDE, "magnitude", weight="magnitude", baseline_at={Level.CHANNELS, Level.WEIGHTS}))
for _name in ("taylor", "bn_scale", "lamp", "fpgm", "hessian"):
    register(HandCrafted(_name, _name))
register(HandCrafted("random", "random", weight="random"))
register(SparseLearning("depgraph", "sparse_reg", benchmarked=True, baseline_at={Level.CHANNELS}))
register(Curve())
register(Gate())
register(SparseLearning("oracle", "oracle_reg", benchmarked=False))
register(Wanda())

HAND_CRAFTED = names(hand_crafted=True)  # the candidates for "the best hand-crafted criterion"
