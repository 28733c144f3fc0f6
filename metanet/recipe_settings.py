"""The pruning recipe's settings (``RecipeConfig``: the finetuning budgets, the pruner's, each
method's) as the pipelines name them, and the data every method reads alike: the BatchNorm
recalibration batches, the data-driven criteria's calibration batches, the reconstruction's inputs."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from metanet.allocation import DEFAULT_ALLOCATION, AllocationContext, allocation
from metanet.criteria import Batches, criterion
from metanet.masks import MASKS
from metanet.data import TaskData
from metanet.prune import DEFAULT_PRUNING, PruneSettings, recalibrate_bn
from metanet.reconstruct import ReconstructSettings
from metanet.train import TrainConfig, evaluate

# The finetuning budget in optimiser steps (docs/method.md, "The pruning recipe's defaults", measured
# with bench/pruner_settings.py): on held-out digits networks at 2x, 'none' ends 0.9 points
# below the unpruned accuracy on average (at most 2.2) with these.
BEFORE_STEPS = 40
AFTER_STEPS = 80
# the recipe's settings as the pipelines name them (prune_batch.py's flags, Tune's search keys):
# the one place their defaults live
RECIPE_DEFAULTS = {"before_steps": BEFORE_STEPS, "before_lr": 0.01, "after_steps": AFTER_STEPS, "after_lr": 0.01,
                   "sparse_reg": 5e-4, "criterion": "magnitude", "allocation": DEFAULT_ALLOCATION,
                   "allocation_candidates": 24}
# what each recipe setting may be (``distributed.settings``' limits: pydantic bounds)
RECIPE_LIMITS = {"before_steps": {"ge": 0}, "after_steps": {"ge": 0}, "before_lr": {"gt": 0}, "after_lr": {"gt": 0},
                 "sparse_reg": {"ge": 0}, "allocation_candidates": {"ge": 1}}
RECAL_BATCHES = 10
# a learned channel criterion in ``meta``: its scores rank channels, or shrink them as gates (metanet.methods.Meta)
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
    # how many channels each group keeps (metanet.allocation: uniform, global, lamp, sensitivity,
    # eagleeye, ...); the criterion ranks channels inside it. ``allocation_candidates``: EagleEye's
    # random allocations per network and target
    allocation: str = DEFAULT_ALLOCATION
    allocation_candidates: int = 24
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
        chosen = allocation(self.allocation)
        if self.floor is not None and not chosen.adaptive:
            raise ValueError(f"allocation {self.allocation!r} prunes to a target speed-up, not to a floor on accuracy")
        if self.allocation_candidates < 1:
            raise ValueError(f"allocation_candidates must be at least 1, not {self.allocation_candidates!r}")
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
    extra.setdefault("allocation", settings.get("allocation", DEFAULT_ALLOCATION))
    extra.setdefault("allocation_candidates", int(settings.get("allocation_candidates",
                                                               RECIPE_DEFAULTS["allocation_candidates"])))
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


def recalibrated_accuracy(model: nn.Module, data: TaskData, cfg: RecipeConfig, split: str = "val") -> float:
    """Accuracy of a copy of ``model`` after recomputing its BatchNorm statistics."""
    return evaluate(recalibrate(copy.deepcopy(model), data, cfg), data, split)[0]


def allocation_context(data: TaskData, cfg: RecipeConfig, allocator=None) -> AllocationContext:
    """What ``cfg.allocation`` reads: the pruner's settings, EagleEye's budget and seed, a pruned
    network's validation accuracy after BatchNorm recalibration, and the data (the fitted
    allocation trains on its training split; nothing reads the test split) and the ``allocator``
    (an allocation metanetwork, the learned allocation's)."""
    def score(model: nn.Module) -> float:
        return recalibrated_accuracy(model, data, cfg)

    return AllocationContext(settings=cfg.pruning, score=score, seed=cfg.before.seed,
                             candidates=cfg.allocation_candidates, data=data,
                             allocator=allocator)
