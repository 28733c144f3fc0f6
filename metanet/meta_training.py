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
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metanet.curve import MASKS, batch_stat_copy
from metanet.gates import fit_gates, gatable, gate_from_logit
from metanet.graph import NetworkGraph, graph_to_network, graph_to_params
from metanet.metanetwork import MetaNetwork

if TYPE_CHECKING:
    from metanet.scoring import ScoreMap
from metanet.sparsity import SPARSITY_FORMS, GroupSparsity, sparsity_term
from metanet.data import TaskData
from metanet.weight_scoring import weight_names
from metanet.prune import amounts_for
from metanet.scoring import score_map
from metanet.curve import fit_scores
from metanet.scoring import attach_statistics, channel_scores, node_statistics
from metanet.weight_scoring import metanet_weight_scores, weight_curve_loss

# "weight_curve" and "paper_l1": the weight-level objectives (unstructured and N:M sparsity)
OBJECTIVES = ("paper", "curve", "weight_curve", "paper_l1")
# the objectives with a sparsity (or L1) term beside the task loss: the others report it as 0
SPARSITY_OBJECTIVES = ("paper", "paper_l1")


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
    # weight of a second term of the curve objective: the squared error between the metanetwork's
    # scores and the member's own per-network ``curve`` scores (``metanet.curve.fit_scores``,
    # ``target_steps`` steps, computed once per member), both standardised within each group: a
    # dense target beside the masked task loss; 0 leaves the curve objective alone
    score_targets: float = 0.0
    target_steps: int = 40
    # "weight_curve": the weight-level curve objective (metanet.weight_scoring) on the per-weight
    # scores of a ``weight_scores`` metanetwork, a sparsity drawn per step from ``weight_sparsities``;
    # "paper_l1": the paper's unstructured objective, the additive edit's task loss plus
    # ``l1_reg * sum |w|`` over the pruned layers' edited weights (its gradient reg * sign(w); the
    # paper's code uses 0.1), magnitude pruning afterwards
    weight_sparsities: tuple[float, float] = (0.5, 0.95)
    weight_temperature: float = 0.2
    l1_reg: float = 0.1

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, not {self.objective!r}")
        if self.curve_mask not in MASKS:
            raise ValueError(f"curve_mask must be one of {MASKS}, not {self.curve_mask!r}")
        if self.bn_mode not in ("eval", "train"):
            raise ValueError(f"bn_mode must be 'eval' or 'train', not {self.bn_mode!r}")
        if self.members_per_step < 1:
            raise ValueError(f"members_per_step must be at least 1, not {self.members_per_step}")
        if self.sparsity_norm not in SPARSITY_FORMS:
            raise ValueError(f"sparsity_norm must be one of {SPARSITY_FORMS}, not {self.sparsity_norm!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Member:
    """A zoo network ready for meta-training: its graph, a module of its architecture (used only
    for its structure), and its group-sparsity index maps."""

    id: str
    graph: NetworkGraph
    model: nn.Module
    sparsity: GroupSparsity
    sparsity_form: str = "none"  # metanet.sparsity.SPARSITY_FORMS
    group_weights: torch.Tensor | None = None  # the "group" form's normalisation
    # the curve objective's: the channel map, the member's own parameters and its amount range
    scores_map: "ScoreMap | None" = None
    params: dict[str, torch.Tensor] | None = None
    amounts: tuple[float, float] | None = None
    targets: torch.Tensor | None = None  # its per-network curve scores (``score_targets``)
    # the weight-level objectives': the names of the weights a weight-level pruning masks
    weight_names: list[str] | None = None


_TARGETS_CACHE: dict[tuple, torch.Tensor] = {}
_SPARSITY_CACHE: dict[tuple, GroupSparsity] = {}
_AMOUNTS_CACHE: dict[tuple, tuple[float, float]] = {}


def make_member(member_id: str, model: nn.Module, graph: NetworkGraph, cfg: MetaTrainConfig) -> Member:
    """A zoo member ready for the meta-objective: ``model`` is a module of the member's architecture
    (its weights are not used: they come from ``graph``)."""
    if cfg.objective == "curve":
        return _curve_member(member_id, model, graph, cfg)
    if cfg.objective in ("weight_curve", "paper_l1"):

        work = batch_stat_copy(model) if cfg.objective == "weight_curve" else model.train(cfg.bn_mode == "train")
        params = {k: v.detach() for k, v in graph_to_params(graph, work).items()}
        return Member(member_id, graph, work.to(graph.node_feat.device), None, params=params,
                      weight_names=weight_names(model))
    key = (graph.fingerprint, cfg.reg, cfg.alpha)
    if key not in _SPARSITY_CACHE:
        _SPARSITY_CACHE[key] = GroupSparsity(model, torch.zeros(graph.input_shape), reg=cfg.reg, alpha=cfg.alpha)
    sparsity = _SPARSITY_CACHE[key]
    weights = sparsity.group_weights(graph_to_params(graph, model)) if cfg.sparsity_norm == "group" else None
    return Member(member_id, graph, model.train(cfg.bn_mode == "train"), sparsity, cfg.sparsity_norm, weights)


def _curve_member(member_id: str, model: nn.Module, graph: NetworkGraph, cfg: MetaTrainConfig) -> Member:

    device = graph.node_feat.device
    scores_map = score_map(model.cpu(), graph.to("cpu") if device.type != "cpu" else graph)
    key = (graph.fingerprint, tuple(cfg.curve_speedups))
    if key not in _AMOUNTS_CACHE:
        amounts = amounts_for(model, torch.zeros(graph.input_shape), sorted(cfg.curve_speedups)).values()
        _AMOUNTS_CACHE[key] = (min(amounts), max(amounts))
    work = batch_stat_copy(model).to(device)  # eval mode, BatchNorm on the masked network's batch statistics
    params = {k: v.detach() for k, v in graph_to_params(graph, work).items()}
    return Member(member_id, graph, work, scores_map.masker.groups, scores_map=scores_map, params=params,
                  amounts=_AMOUNTS_CACHE[key])


def attach_targets(member: Member, data: TaskData, cfg: MetaTrainConfig) -> None:
    """The member's per-network curve scores (``fit_scores`` on its own network, standardised per
    group) as its regression target; computed once per member and settings."""

    key = (member.id, member.graph.fingerprint, member.amounts, cfg.target_steps, cfg.batch_size, cfg.seed,
           cfg.curve_temperature, cfg.curve_mask)
    if key not in _TARGETS_CACHE:
        reference = graph_to_network(member.graph, member.model).eval()
        scores, _ = fit_scores(reference, data, member.amounts, steps=cfg.target_steps, batch_size=cfg.batch_size,
                               seed=cfg.seed, temperature=cfg.curve_temperature, mode=cfg.curve_mask,
                               masker=member.scores_map.masker)
        _TARGETS_CACHE[key] = member.scores_map.masker.standardise(scores).detach()
    member.targets = _TARGETS_CACHE[key]


def curve_step(metanet: MetaNetwork, members: Sequence[Member], batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
               draw: float, cfg: MetaTrainConfig) -> dict[str, float]:
    """Forward and backward of the curve objective for ``members``: each member's channel scores
    from one metanetwork pass (``metanet.scoring.channel_scores``), the hard-to-soft mask at the
    amount ``lo + draw * (hi - lo)`` of its range, the masked network's mean cross-entropy over
    ``batches``; gradients accumulate in ``metanet``. Returns the mean loss terms."""

    core = metanet.module if hasattr(metanet, "module") else metanet
    terms = {"task_loss": 0.0, "sparsity_loss": 0.0, "train_acc": 0.0}
    total = 0.0
    for member in members:
        lo, hi = member.amounts
        if core.config.calibration and "_statistics" not in member.graph.__dict__:
            # the member's own channel statistics (eval mode), on its first step's batches
            reference = graph_to_network(member.graph, member.model).eval()
            attach_statistics(member.graph, node_statistics(core, reference, member.graph, batches, member.scores_map))
        scores = channel_scores(metanet, member.graph, member.params, member.scores_map)
        masker = member.scores_map.masker
        mask = masker.mask(scores, lo + draw * (hi - lo), cfg.curve_temperature, cfg.curve_mask)
        masked = masker.apply(member.params, mask)
        correct, seen = 0, 0
        for x, y in batches:
            out = torch.func.functional_call(member.model, masked, (x,))
            loss = F.cross_entropy(out, y) / (len(batches) * len(members))
            total = total + loss
            terms["task_loss"] += float(loss.detach())
            correct += int((out.argmax(1) == y).sum())
            seen += y.numel()
        terms["train_acc"] += correct / max(seen, 1) / len(members)
        if cfg.score_targets and member.targets is not None:
            target = F.mse_loss(masker.standardise(scores), member.targets.to(scores.device)) / len(members)
            total = total + cfg.score_targets * target
            terms["target_loss"] = terms.get("target_loss", 0.0) + float(target.detach())
    total.backward()
    return terms


def weight_curve_step(metanet: MetaNetwork, members: Sequence[Member],
                      batches: Sequence[tuple[torch.Tensor, torch.Tensor]], draw: float,
                      cfg: MetaTrainConfig) -> dict[str, float]:
    """Forward and backward of the weight-level curve objective for ``members``: each member's
    per-weight scores from one metanetwork pass (``metanet.weight_scoring.metanet_weight_scores``),
    the soft mask at the sparsity ``lo + draw * (hi - lo)``, the masked network's mean cross-entropy
    over ``batches``; gradients accumulate in ``metanet``. Returns the mean loss terms."""

    lo, hi = cfg.weight_sparsities
    sparsity = lo + draw * (hi - lo)
    terms = {"task_loss": 0.0, "sparsity_loss": 0.0, "train_acc": 0.0}
    total = 0.0
    for member in members:
        scores = metanet_weight_scores(metanet, member.graph, member.model, member.params, member.weight_names)
        correct, seen = 0, 0
        for x, y in batches:
            loss, logits = weight_curve_loss(member.model, member.params, scores, sparsity, x, y,
                                             cfg.weight_temperature)
            loss = loss / (len(batches) * len(members))
            total = total + loss
            terms["task_loss"] += float(loss.detach())
            correct += int((logits.argmax(1) == y).sum())
            seen += y.numel()
        terms["train_acc"] += correct / max(seen, 1) / len(members)
    total.backward()
    return terms


def task_objective(member: Member, params: dict[str, torch.Tensor],
                   batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """The task term of the meta-objective for ``params`` (a name -> tensor dict of the member's
    architecture), in the member's BatchNorm mode; accumulates gradients into ``params``' leaves
    that require them. Returns (mean cross-entropy over ``batches``, accuracy)."""
    if not batches:
        raise ValueError("task_objective needs at least one batch")
    task, correct, seen = 0.0, 0, 0
    for x, y in batches:
        out = torch.func.functional_call(member.model, params, (x,))
        loss = F.cross_entropy(out, y) / len(batches)
        if loss.requires_grad:
            loss.backward()
        task += float(loss.detach())
        correct += int((out.argmax(1) == y).sum())
        seen += y.numel()
    return task, correct / max(seen, 1)


def member_step(metanet: MetaNetwork, member: Member, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                ) -> dict[str, float]:
    """Forward and backward of the meta-objective for one member; gradients accumulate in
    ``metanet``'s parameters. Returns the loss terms."""
    return members_step(metanet, [member], batches)


def members_step(metanet: MetaNetwork, members: Sequence[Member],
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]], draw: float = 0.5,
                 cfg: MetaTrainConfig | None = None) -> dict[str, float]:
    """``member_step`` for several members at once: one metanetwork pass over their graphs' union
    (``MetaNetwork.forward_many``), each member's objective on the same task batches, and one
    backward pass of the mean over members. Members made for the curve objective go to
    ``curve_step`` (``draw`` in [0, 1): where in their amount range this step prunes). Returns the
    mean loss terms."""
    batches = list(batches)
    if members[0].scores_map is not None:
        return curve_step(metanet, members, batches, draw, cfg)
    if cfg is not None and cfg.objective == "weight_curve":
        return weight_curve_step(metanet, members, batches, draw, cfg)
    graphs = [m.graph for m in members]
    edited = metanet(graphs) if len(members) > 1 else [metanet(graphs[0])]
    outputs, gradients = [], []
    terms = {"task_loss": 0.0, "sparsity_loss": 0.0, "train_acc": 0.0}
    for member, graph in zip(members, edited):
        params = graph_to_params(graph, member.model)
        leaves = {k: v.detach().requires_grad_(v.requires_grad) for k, v in params.items()}
        task, accuracy = task_objective(member, leaves, batches)
        if member.weight_names is not None:  # paper_l1: the paper's unstructured term, reg * sign(w) in the gradient
            sparse = (cfg or MetaTrainConfig()).l1_reg * sum(leaves[n].abs().sum() for n in member.weight_names)
        else:
            sparse = sparsity_term(member.sparsity, leaves, member.sparsity_form, member.group_weights)
        sparse.backward()
        for k in params:
            if params[k].requires_grad and leaves[k].grad is not None:
                outputs.append(params[k])
                gradients.append(leaves[k].grad / len(members))
        for name, value in (("task_loss", task), ("sparsity_loss", float(sparse.detach())), ("train_acc", accuracy)):
            terms[name] += value / len(members)
    torch.autograd.backward(outputs, gradients)
    return terms


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
    from distributed.progress import progress as bar_of

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
    from distributed.progress import progress as bar_of

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
        if cfg.objective == "curve" and cfg.score_targets:
            for member in group:
                attach_targets(member, data, cfg)
        # the curve objective's amount; drawn only for it, so the paper objective's batches stay as they were
        draw = float(torch.rand((), generator=gen)) if cfg.objective in ("curve", "weight_curve") else 0.5
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
