"""Meta-training: teach the metanetwork to turn zoo networks into networks that prune well.

For one zoo member, one step is: graph -> metanetwork -> ``graph_to_params`` -> the network run
with those parameters (``torch.func.functional_call``) on a few task batches ->
cross-entropy, plus the group-sparsity term of GroupNormPruner (``metanet.sparsity``) on the same
parameters -> one backward pass through the metanetwork -> AdamW.

BatchNorm mode: eval by default, as the paper's code runs it: the member's running statistics
(node features of its graph) normalise, so shrinking a conv's output rows shrinks what the next
layer sees and the task loss can resist it. In train mode BatchNorm divides out any scaling of the
conv before it and the objective cannot see a shrunk channel (measured: scaling one conv of a
trained digits ResNet by 0.5 leaves the train-mode task loss at 0.0132 -> 0.0132).

Loss scale: the task loss is the MEAN cross-entropy over the step's batches (the paper sums the
per-batch means over the whole training set). So ``reg`` here is the paper's ``reg`` divided by
the paper's number of batches: the paper's reg = 10 over 100 batches of 500 CIFAR images is
``reg = 0.1`` here. The default is 30x weaker, 3e-3: at 0.1 (and at 0.03) the sparsity term wins
within a few epochs on our zoos and every network falls to chance (measured on digits and CIFAR-10;
the CIFAR-10 Tune search's best trial had reg = 1e-3).

One backward pass: the predicted parameters are detached into leaves, the task batches and the
sparsity term accumulate their gradients there, and those gradients are then pushed through the
metanetwork once (the paper's code back-propagates through it twice).
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distributed.progress import progress as bar_of
from metanet.masks import MASKS
from metanet.gates import fit_gates, gatable, gate_from_logit
from metanet.graph import NetworkGraph
from metanet.metanetwork import MetaNetwork
from metanet.objectives import OBJECTIVES, Member, objective
from metanet.sparsity import SPARSITY_FORMS
from metanet.data import TaskData

# the objectives with a sparsity (or L1) term beside the task loss: the others report it as 0
SPARSITY_OBJECTIVES = tuple(name for name, o in OBJECTIVES.items() if o.sparsity_term)


@dataclass
class MetaTrainConfig:
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (15,)  # epochs after which the lr drops x0.1
    batches_per_step: int = 4  # task batches per member per step
    # members per optimiser step, edited in one metanetwork pass over their graphs' union
    # (``members_step``); 1 is the paper's one member per step (bench/meta_train.py measures both)
    members_per_step: int = 1
    batch_size: int = 256
    reg: float = 3e-3  # group-sparsity strength, on the mean-loss scale (see the module docstring)
    alpha: float = 16.0
    seed: int = 0
    bn_mode: str = "eval"  # "eval": the member's running statistics (the paper); "train": batch statistics
    # "none": the paper's term, on the weights' own scale; "group": each dependency group's term
    # divided by the member's own squared group norm (GroupSparsity.group_weights), so a uniform
    # shrink costs every layer alike and ``reg`` means the same on every network; "relative": the
    # scale-free form (GroupSparsity.relative), which a uniform shrink does not lower at all
    sparsity_norm: str = "none"
    # distillation (gate edits only): before the meta-objective, ``distill_epochs`` epochs of
    # regressing the metanetwork's gates on gates optimised for each member (metanet.gates)
    distill_epochs: int = 0
    gate_steps: int = 40  # steps of the per-member gate optimisation that makes the targets
    gate_lr: float = 0.05
    gate_reg: float = 3.0  # its sparsity strength (GroupSparsity.relative's scale)
    # "paper": task loss of the edited network + group sparsity (above); "curve": the curve
    # objective (metanet.curve) on the per-channel scores of a ``scores`` metanetwork
    # (metanet.scoring): per member and step an amount drawn between those of ``curve_speedups``,
    # the masked network's task loss with BatchNorm on batch statistics; no sparsity term
    objective: str = "paper"
    curve_speedups: tuple[float, float] = (1.5, 4.0)
    curve_temperature: float = 0.2  # the soft mask's temperature (curve's best, bench/curve_objective.py)
    curve_mask: str = "soft"
    # "allocation": a learned allocation (metanet.allocation_fit) on the curve objective, per step a
    # target speed-up drawn log-uniformly in ``allocation_speedups``, magnitude ranking inside groups
    allocation_speedups: tuple[float, float] = (2.0, 6.0)
    # weight of a second term of the curve objective: the squared error between the metanetwork's
    # scores and the member's own per-network ``curve`` scores (``metanet.curve.fit_scores``,
    # ``target_steps`` steps, computed once per member), both standardised within each group: a
    # dense target beside the masked task loss; 0 leaves the curve objective alone
    score_targets: float = 0.0
    target_steps: int = 40
    # "weight_curve": the weight-level curve objective (metanet.masks.WeightMask) on the per-weight
    # scores of a ``weight_scores`` metanetwork, a sparsity drawn per step from ``weight_sparsities``;
    # "paper_l1": the paper's unstructured objective, the additive edit's task loss plus
    # ``l1_reg * sum |w|`` over the pruned layers' edited weights (its gradient reg * sign(w); the
    # paper's code uses 0.1), magnitude pruning afterwards
    weight_sparsities: tuple[float, float] = (0.5, 0.95)
    weight_temperature: float = 0.2
    l1_reg: float = 0.1

    def __post_init__(self):
        objective(self.objective)  # a known name, or ValueError naming the known ones
        if self.curve_mask not in MASKS:
            raise ValueError(f"curve_mask must be one of {MASKS}, not {self.curve_mask!r}")
        if self.bn_mode not in ("eval", "train"):
            raise ValueError(f"bn_mode must be 'eval' or 'train', not {self.bn_mode!r}")
        if not 1.0 < self.allocation_speedups[0] <= self.allocation_speedups[1]:
            raise ValueError(f"allocation_speedups must be two speed-ups above 1, lowest first, not "
                             f"{tuple(self.allocation_speedups)}")
        if self.members_per_step < 1:
            raise ValueError(f"members_per_step must be at least 1, not {self.members_per_step}")
        if self.sparsity_norm not in SPARSITY_FORMS:
            raise ValueError(f"sparsity_norm must be one of {SPARSITY_FORMS}, not {self.sparsity_norm!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def make_member(member_id: str, model: nn.Module, graph: NetworkGraph, cfg: MetaTrainConfig) -> Member:
    """A zoo member ready for ``cfg``'s objective: ``model`` is a module of the member's architecture
    (its weights are not used: they come from ``graph``)."""
    return objective(cfg.objective).member(member_id, model, graph, cfg)


def member_step(metanet: MetaNetwork, member: Member, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                cfg: MetaTrainConfig | None = None) -> dict[str, float]:
    """Forward and backward of the meta-objective for one member; gradients accumulate in
    ``metanet``'s parameters. Returns the loss terms."""
    return members_step(metanet, [member], batches, cfg=cfg)


def members_step(metanet: MetaNetwork, members: Sequence[Member],
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]], draw: float = 0.5,
                 cfg: MetaTrainConfig | None = None) -> dict[str, float]:
    """``member_step`` for several members at once (the edit objectives: one metanetwork pass over
    their graphs' union, ``MetaNetwork.forward_many``), each member's objective on the same task
    batches, and one backward pass of the mean over members; ``draw`` in [0, 1): where in their
    range the curve objectives prune this step. Returns the mean loss terms."""
    cfg = cfg or MetaTrainConfig()
    return objective(cfg.objective).step(metanet, members, list(batches), draw, cfg)


def gate_targets(member: Member, data: TaskData, cfg: MetaTrainConfig) -> torch.Tensor:
    """Gate logits optimised for this one member (``cfg.gate_steps`` Adam steps on the
    meta-objective with the relative sparsity term at ``cfg.gate_reg``): the distillation target."""
    return fit_gates(member.model, member.graph, data, steps=cfg.gate_steps, batches_per_step=cfg.batches_per_step,
                     batch_size=cfg.batch_size, augment=True, seed=cfg.seed, reg=cfg.gate_reg, alpha=cfg.alpha,
                     lr=cfg.gate_lr)


def distill_step(metanet: MetaNetwork, member: Member, target: torch.Tensor) -> float:
    """Forward and backward of the distillation loss for one member: the mean squared error
    between the metanetwork's gates and ``target``'s (logits) over its hidden channels. Gradients
    accumulate in ``metanet``'s parameters; returns the loss."""
    mask = gatable(member.graph)
    gates = gate_from_logit(metanet.gate_logits(member.graph))[mask]
    loss = F.mse_loss(gates, gate_from_logit(target.to(gates.device))[mask])
    loss.backward()
    return float(loss.detach())


def distill(metanet: MetaNetwork, members: Sequence[Member], targets: Sequence[torch.Tensor],
            cfg: MetaTrainConfig, progress: bool = True) -> list[float]:
    """``cfg.distill_epochs`` epochs of AdamW on ``distill_step``: a warm start that shows the
    metanetwork what a selective edit of each member looks like. Returns per-epoch mean losses."""
    opt = torch.optim.AdamW(metanet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in bar_of(range(cfg.distill_epochs), desc="distillation", unit="epoch", disable=not progress):
        total = 0.0
        for i in torch.randperm(len(members), generator=gen).tolist():
            opt.zero_grad(set_to_none=True)
            total += distill_step(metanet, members[i], targets[i])
            opt.step()
        losses.append(total / len(members))
    return losses


def distill_across_workers(metanet: MetaNetwork, members: Sequence[Member], data: TaskData, cfg: MetaTrainConfig,
                           steps: int) -> None:
    """``distill`` on one of several data-parallel workers: each worker takes its own ``members``
    for the same ``steps`` per epoch, and the gradients are averaged across the workers here
    (``gate_logits`` bypasses DDP's forward, so DDP does not see these passes). With no process
    group, or a group of one, it is single-process distillation over ``steps`` steps an epoch."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    targets = [gate_targets(m, data, cfg) for m in members]
    opt = torch.optim.AdamW(metanet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.distill_epochs):
        for s in range(steps):
            k = s % len(members)
            opt.zero_grad(set_to_none=True)
            distill_step(metanet, members[k], targets[k])
            if world > 1:
                for p in metanet.parameters():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= world
            opt.step()


def _lr_at(cfg: MetaTrainConfig, epoch: int) -> float:
    return cfg.lr * 0.1 ** sum(epoch >= m for m in cfg.milestones)


def meta_train(metanet: MetaNetwork, members: Sequence[Member], data: TaskData, cfg: MetaTrainConfig, *,
               on_epoch: Callable[[int, dict, MetaNetwork], None] | None = None, progress: bool = True
               ) -> list[dict]:
    """Meta-trains ``metanet`` in place; after each epoch ``on_epoch(epoch, metrics, metanet)``
    (for checkpoints and selection). Returns per-epoch mean loss terms."""
    if cfg.distill_epochs > 0:
        targets = [gate_targets(m, data, cfg) for m in members]
        distill(metanet, members, targets, cfg, progress)
    opt = torch.optim.AdamW(metanet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    steps = -(-len(members) // cfg.members_per_step)
    bar = bar_of(total=cfg.epochs * steps, desc="meta-training", unit="step", disable=not progress)

    def step_done(step: int, terms: dict) -> None:
        bar.update(1)
        bar.set_postfix(epoch=epoch, task=f"{terms['task_loss']:.3f}", sparse=f"{terms['sparsity_loss']:.3f}")

    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        order = (members[i] for i in torch.randperm(len(members), generator=gen).tolist())
        sums = run_epoch(metanet, opt, order, data, cfg, epoch, gen, on_step=step_done)
        metrics = {k: v / sums["steps"] for k, v in sums.items() if k != "steps"}
        metrics.update(epoch=epoch, lr=_lr_at(cfg, epoch), seconds=time.perf_counter() - start)
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics, metanet)
    bar.close()
    return history


def run_epoch(metanet: nn.Module, opt: torch.optim.Optimizer, members: Iterable[Member], data: TaskData,
              cfg: MetaTrainConfig, epoch: int, gen: torch.Generator,
              on_step: Callable[[int, dict], None] | None = None) -> dict[str, float]:
    """One epoch of meta-training over ``members`` (in the order given; an iterator may load each
    member only when it is reached): the epoch's learning rate (``_lr_at``), then per member one
    optimiser step on ``members_step`` for each ``cfg.members_per_step`` members over
    ``cfg.batches_per_step`` training batches drawn with ``gen``. ``metanet`` may be a DDP wrapper (its gradients are then averaged across workers).
    Returns the summed loss terms and ``steps``; ``on_step(step, terms)`` after each step."""
    for group in opt.param_groups:
        group["lr"] = _lr_at(cfg, epoch)
    metanet.train()
    device = next(metanet.parameters()).device
    sums: dict[str, float] = {"steps": 0.0}
    members = iter(members)
    step = 0
    while group := list(itertools.islice(members, cfg.members_per_step)):
        batches = [(x.to(device), y.to(device)) for x, y in
                   data.batches("train", cfg.batch_size, shuffle=True, augment=True, generator=gen,
                                limit=cfg.batches_per_step)]
        goal = objective(cfg.objective)
        goal.before_step(group, data, cfg)
        # where the curve objectives prune; drawn only for them, so the paper objective's batches stay as they were
        draw = float(torch.rand((), generator=gen)) if goal.draws else 0.5
        opt.zero_grad(set_to_none=True)
        terms = members_step(metanet, group, batches, draw, cfg)
        opt.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        sums["steps"] += 1
        if on_step is not None:
            on_step(step, terms)
        step += 1
    return sums


def snapshot(metanet: MetaNetwork) -> dict[str, torch.Tensor]:
    return copy.deepcopy(metanet.state_dict())
