"""The meta-objectives: one class per name in ``OBJECTIVES``, each with what a zoo member needs for
it (``member``), its forward and backward for a step (``step``), the settings it trains with unless
given (``defaults``), the head it trains and how its checkpoints are chosen.

- ``paper``: the edited network's task loss + GroupNormPruner's group sparsity on its weights (the
  paper's objective; an ``additive`` or ``gate`` head);
- ``paper_l1``: the paper's unstructured objective: the additive edit's task loss + ``l1_reg *
  sum |w|`` over the pruned layers' edited weights, magnitude pruning afterwards;
- ``curve``: a learned channel criterion (``scores``) trained on the pruning curve: per step an
  amount drawn in the member's range, the masked network's task loss (``metanet.curve``), plus
  optionally the regression on the member's own ``curve`` scores (``score_targets``);
- ``weight_curve``: the same at the weight level (``weight_scores``, ``metanet.masks.WeightMask``);
- ``allocation``: a learned allocation (the ``allocation`` head): per step a target speed-up drawn in
  ``allocation_speedups``, each group's kept fraction from the metanetwork's logits put on the
  target's MACs (``metanet.allocation_fit``), the masked network's task loss with magnitude ranking
  inside each group.

The default objective is ``curve`` with the settings of the best learned criterion measured
(docs/benchmarks.md, "The curve objective's gradient as an input"): a per-channel MLP (no message
passing) over the channel's evidence, calibration statistics and the curve objective's gradient at
magnitude's ranking, regressed on each member's own ``curve`` scores (x10). ``meta_train.py``, Tune's
default trial (``zoo.search.default_trial``) and ``bench/quality.py`` read ``OBJECTIVES``, so what
``meta`` means follows it everywhere.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metanet.allocation_fit import GroupInputs, allocation_logits, group_inputs
from metanet.curve import batch_stat_copy, fit_scores
from metanet.data import TaskData
from metanet.graph import NetworkGraph, graph_to_network, graph_to_params
from metanet.heads import HEADS
from metanet.levels import Level
from metanet.metanetwork import MetaNetwork
from metanet.prune import amounts_for
from metanet.registry import Registry
from metanet.masks import WeightMask
from metanet.scoring import ScoreMap, attach_statistics, channel_scores, metanet_weight_scores, node_statistics, score_map
from metanet.sparsity import GroupSparsity, sparsity_term

if TYPE_CHECKING:
    from metanet.meta_training import MetaTrainConfig

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
# the types of the settings an objective fills (their pipeline defaults are None: "the objective's")
TYPES = {"edit": str, "layers": int, "evidence": bool, "calibration": bool, "gradient": bool,
         "score_targets": float, "lr": float, "batch_size": int}


class _Cache(OrderedDict):
    """A small least-recently-used dict: what is worth keeping per member (its sparsity index maps,
    amount range, score targets) without growing with every zoo a long-lived worker sees."""

    def __init__(self, size: int = 512):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        if len(self) > self.size:
            self.popitem(last=False)
        return value


_SPARSITY = _Cache()
_AMOUNTS = _Cache()
_TARGETS = _Cache()


@dataclass
class Member:
    """A zoo network ready for meta-training: its graph and a module of its architecture (used only
    for its structure: the weights come from the graph)."""

    id: str
    graph: NetworkGraph
    model: nn.Module


@dataclass
class EditMember(Member):
    """The paper objective's: the group-sparsity index maps and the member's own normalisation."""

    sparsity: GroupSparsity
    sparsity_form: str = "none"  # metanet.sparsity.SPARSITY_FORMS
    group_weights: torch.Tensor | None = None  # the "group" form's normalisation


@dataclass
class CurveMember(Member):
    """The curve objective's: the channel map, the member's own parameters, its amount range and
    (with ``score_targets``) its per-network curve scores."""

    scores_map: ScoreMap
    params: dict[str, torch.Tensor]
    amounts: tuple[float, float]
    targets: torch.Tensor | None = None


@dataclass
class WeightMember(Member):
    """The weight-level objectives': the member's own parameters and the weights a pruning masks."""

    params: dict[str, torch.Tensor]
    mask: WeightMask


def task_objective(member: Member, params: dict[str, torch.Tensor], batches: Batches) -> tuple[float, float]:
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


def _terms() -> dict[str, float]:
    return {"task_loss": 0.0, "sparsity_loss": 0.0, "train_acc": 0.0}


class Objective:
    """One meta-objective. ``head``: the head it trains (None: the edit it is given); ``level``: what
    the metanetwork it trains prunes; ``draws``: it draws where to prune each step (from the
    epoch's generator, so the others' batches stay as they were); ``sparsity_term``: it reports a
    sparsity (or L1) term beside the task loss; ``selection``: how its checkpoints are chosen
    (``metanet.selection``: measured by ``bench/selection.py``, docs/method.md)."""

    name: ClassVar[str]
    defaults: ClassVar[dict]
    head: ClassVar[str | None] = None
    level: ClassVar[Level] = Level.CHANNELS
    draws: ClassVar[bool] = False
    sparsity_term: ClassVar[bool] = False
    selection: ClassVar[str] = "recipe"

    def member(self, member_id: str, model: nn.Module, graph: NetworkGraph, cfg: "MetaTrainConfig") -> Member:
        raise NotImplementedError

    def before_step(self, members: Sequence[Member], data: TaskData, cfg: "MetaTrainConfig") -> None:
        """What the members need before this step that costs more than a step (computed once)."""

    def step(self, metanet: MetaNetwork, members: Sequence[Member], batches: Batches, draw: float,
             cfg: "MetaTrainConfig") -> dict[str, float]:
        """Forward and backward for ``members`` on ``batches`` (``draw`` in [0, 1): where in its range
        this step prunes); gradients accumulate in ``metanet``. Returns the mean loss terms."""
        raise NotImplementedError

    def refusal(self, edit: str) -> str | None:
        """Why ``edit`` cannot be meta-trained with this objective (None: it can)."""
        if self.head is not None:
            return None if edit == self.head else f"objective {self.name} trains edit {self.head}"
        owner = next((o for o in OBJECTIVES.values() if o.head == edit and not HEADS[o.head].edits), None)
        return None if owner is None else f"edit {edit} is trained with objective {owner.name}"


OBJECTIVES: Registry[Objective] = Registry("objective")
register = OBJECTIVES.register
objective = OBJECTIVES  # objective(name): the objective called ``name``; ValueError naming the known ones


def _edited_step(metanet, members, batches, cfg, extra_term) -> dict[str, float]:
    """The edit objectives' step: one metanetwork pass over the members' graphs' union, each
    member's task loss on its edited weights plus ``extra_term(member, leaves)``, and one backward
    pass through the metanetwork of the mean over members."""
    graphs = [m.graph for m in members]
    edited = metanet(graphs) if len(members) > 1 else [metanet(graphs[0])]
    outputs, gradients = [], []
    terms = _terms()
    for member, graph in zip(members, edited):
        params = graph_to_params(graph, member.model)
        leaves = {k: v.detach().requires_grad_(v.requires_grad) for k, v in params.items()}
        task, accuracy = task_objective(member, leaves, batches)
        sparse = extra_term(member, leaves)
        sparse.backward()
        for k in params:
            if params[k].requires_grad and leaves[k].grad is not None:
                outputs.append(params[k])
                gradients.append(leaves[k].grad / len(members))
        for name, value in (("task_loss", task), ("sparsity_loss", float(sparse.detach())), ("train_acc", accuracy)):
            terms[name] += value / len(members)
    torch.autograd.backward(outputs, gradients)
    return terms


def _masked_step(members: Sequence[Member], batches: Batches, masked_logits, extra=None) -> dict[str, float]:
    """The curve objectives' step at either level: for each member ``masked_logits(member)`` gives
    ``x -> logits`` of its network soft-masked by the metanetwork's scores (channels or weights);
    the mean cross-entropy over ``batches`` and members, plus ``extra(member)`` (None, or a term's
    name, its value and its weight in the loss: the value is what the terms report), backward once;
    gradients accumulate in the metanetwork. Returns the mean loss terms."""
    terms = _terms()
    total = 0.0
    for member in members:
        logits_of = masked_logits(member)
        correct, seen = 0, 0
        for x, y in batches:
            out = logits_of(x)
            loss = F.cross_entropy(out, y) / (len(batches) * len(members))
            total = total + loss
            terms["task_loss"] += float(loss.detach())
            correct += int((out.argmax(1) == y).sum())
            seen += y.numel()
        terms["train_acc"] += correct / max(seen, 1) / len(members)
        term = extra(member) if extra is not None else None
        if term is not None:
            name, value, weight = term
            total = total + weight * value
            terms[name] = terms.get(name, 0.0) + float(value.detach())
    total.backward()
    return terms


_PAPER = {"edit": "additive", "layers": 4, "evidence": False, "calibration": False, "gradient": False,
          "score_targets": 0.0, "lr": 1e-3, "batch_size": 256}


@register
class Paper(Objective):
    name = "paper"
    defaults = _PAPER
    sparsity_term = True

    def member(self, member_id, model, graph, cfg):
        key = (graph.fingerprint, cfg.reg, cfg.alpha)
        sparsity = _SPARSITY.get_or(key, lambda: GroupSparsity(model, torch.zeros(graph.input_shape), reg=cfg.reg,
                                                               alpha=cfg.alpha))
        weights = sparsity.group_weights(graph_to_params(graph, model)) if cfg.sparsity_norm == "group" else None
        return EditMember(member_id, graph, model.train(cfg.bn_mode == "train"), sparsity, cfg.sparsity_norm, weights)

    def step(self, metanet, members, batches, draw, cfg):
        return _edited_step(metanet, members, batches, cfg, lambda m, leaves: sparsity_term(
            m.sparsity, leaves, m.sparsity_form, m.group_weights))


@register
class Curve(Objective):
    name = "curve"
    defaults = {"edit": "scores", "layers": 0, "evidence": True, "calibration": True, "gradient": True,
                "score_targets": 10.0, "lr": 3e-3, "batch_size": 128}
    head = "scores"
    draws = True
    selection = "auc"

    def member(self, member_id, model, graph, cfg):
        device = graph.node_feat.device
        scores_map = score_map(model.cpu(), graph.to("cpu") if device.type != "cpu" else graph)

        def amount_range():
            amounts = amounts_for(model, torch.zeros(graph.input_shape), sorted(cfg.curve_speedups)).values()
            return min(amounts), max(amounts)

        amounts = _AMOUNTS.get_or((graph.fingerprint, tuple(cfg.curve_speedups)), amount_range)
        work = batch_stat_copy(model).to(device)  # eval mode, BatchNorm on the masked network's batch statistics
        params = {k: v.detach() for k, v in graph_to_params(graph, work).items()}
        return CurveMember(member_id, graph, work, scores_map, params, amounts)

    def before_step(self, members, data, cfg):
        if cfg.score_targets:
            for member in members:
                attach_targets(member, data, cfg)

    def step(self, metanet, members, batches, draw, cfg):
        """Each member's channel scores from one metanetwork pass (``metanet.scoring.channel_scores``),
        the hard-to-soft mask at the amount ``lo + draw * (hi - lo)`` of its range, the masked
        network's mean cross-entropy over ``batches``; with ``score_targets``, the regression on
        the member's own curve scores."""
        core = metanet.module if hasattr(metanet, "module") else metanet
        scores_of = {}

        def masked_logits(member):
            lo, hi = member.amounts
            if core.config.calibration and member.graph.statistics is None:
                # the member's own channel statistics (eval mode), on its first step's batches
                reference = graph_to_network(member.graph, member.model).eval()
                attach_statistics(member.graph, node_statistics(core, reference, member.graph, batches,
                                                                member.scores_map))
            scores = scores_of[member.id] = channel_scores(metanet, member.graph, member.params, member.scores_map)
            masker = member.scores_map.masker
            masked = masker.masked(member.params, scores, lo + draw * (hi - lo), cfg.curve_temperature, cfg.curve_mask)
            return lambda x: torch.func.functional_call(member.model, masked, (x,))

        def target_term(member):
            if not cfg.score_targets or member.targets is None:
                return None
            scores = scores_of[member.id]
            loss = F.mse_loss(member.scores_map.masker.standardise(scores), member.targets.to(scores.device))
            return "target_loss", loss / len(members), cfg.score_targets

        return _masked_step(members, batches, masked_logits, target_term)


def attach_targets(member: CurveMember, data: TaskData, cfg: "MetaTrainConfig") -> None:
    """The member's per-network curve scores (``fit_scores`` on its own network, standardised per
    group) as its regression target; computed once per member and settings."""
    def fitted():
        reference = graph_to_network(member.graph, member.model).eval()
        scores, _ = fit_scores(reference, data, member.amounts, steps=cfg.target_steps, batch_size=cfg.batch_size,
                               seed=cfg.seed, temperature=cfg.curve_temperature, mode=cfg.curve_mask,
                               masker=member.scores_map.masker)
        return member.scores_map.masker.standardise(scores).detach()

    key = (member.id, member.graph.fingerprint, member.amounts, cfg.target_steps, cfg.batch_size, cfg.seed,
           cfg.curve_temperature, cfg.curve_mask)
    member.targets = _TARGETS.get_or(key, fitted)


@register
class WeightCurve(Objective):
    name = "weight_curve"
    defaults = {**_PAPER, "edit": "weight_scores"}
    head = "weight_scores"
    level = Level.WEIGHTS
    draws = True

    def member(self, member_id, model, graph, cfg):
        work = batch_stat_copy(model)
        params = {k: v.detach() for k, v in graph_to_params(graph, work).items()}
        return WeightMember(member_id, graph, work.to(graph.node_feat.device), params, WeightMask(model))

    def step(self, metanet, members, batches, draw, cfg):
        """Each member's per-weight scores from one metanetwork pass
        (``metanet.scoring.metanet_weight_scores``), the soft mask at the sparsity
        ``lo + draw * (hi - lo)``, the masked network's mean cross-entropy over ``batches``."""
        lo, hi = cfg.weight_sparsities
        sparsity = lo + draw * (hi - lo)

        def masked_logits(member):
            scores = metanet_weight_scores(metanet, member.graph, member.model, member.params, member.mask.names)
            # the mask built per batch, as curve_loss builds it: the same sums in the backward
            return lambda x: torch.func.functional_call(
                member.model, member.mask.masked(member.params, scores, sparsity, cfg.weight_temperature), (x,))

        return _masked_step(members, batches, masked_logits)


@register
class PaperL1(Objective):
    name = "paper_l1"
    defaults = _PAPER
    head = "additive"
    level = Level.WEIGHTS
    sparsity_term = True

    def member(self, member_id, model, graph, cfg):
        work = model.train(cfg.bn_mode == "train")
        params = {k: v.detach() for k, v in graph_to_params(graph, work).items()}
        return WeightMember(member_id, graph, work.to(graph.node_feat.device), params, WeightMask(model))

    def step(self, metanet, members, batches, draw, cfg):
        # the paper's unstructured term: reg * sign(w) in the gradient
        return _edited_step(metanet, members, batches, cfg, lambda m, leaves: cfg.l1_reg * sum(
            leaves[n].abs().sum() for n in m.mask.names))


@dataclass
class AllocationMember(Member):
    """The allocation objective's: the channel map, the member's own parameters, magnitude's scores
    ([C], the ranking inside each group) and what the allocation head reads of its groups."""

    scores_map: ScoreMap
    params: dict[str, torch.Tensor]
    base: torch.Tensor
    inputs: GroupInputs


@register
class AllocationCurve(Objective):
    name = "allocation"
    defaults = {"edit": "allocation", "layers": 4, "evidence": True, "calibration": False, "gradient": False,
                "score_targets": 0.0, "lr": 3e-3, "batch_size": 128}
    head = "allocation"
    draws = True

    def member(self, member_id, model, graph, cfg):
        device = graph.node_feat.device
        on_cpu = graph.to("cpu") if device.type != "cpu" else graph
        scores_map = score_map(model.cpu(), on_cpu)
        inputs = group_inputs(model, on_cpu)  # remembered per architecture
        work = batch_stat_copy(model).to(device)
        params = {k: v.detach() for k, v in graph_to_params(graph, work).items()}
        return AllocationMember(member_id, graph, work, scores_map, params, scores_map.base(params), inputs)

    def step(self, metanet, members, batches, draw, cfg):
        """Each member's group logits at the target ``lo * (hi / lo) ** draw`` from one metanetwork
        pass, the kept fractions on the target's MACs, the soft mask of each group's top fraction
        by magnitude (``ChannelMask.kept_mask``; always soft: the straight-through mask moved the
        per-network fit's fractions less, ``metanet.allocation_fit``), the masked network's mean
        cross-entropy."""
        lo, hi = cfg.allocation_speedups
        target = lo * (hi / lo) ** draw

        def masked_logits(member):
            widths = member.inputs.widths
            u = allocation_logits(metanet, member.graph, member.inputs, target)
            kept = widths.at_budget(u.double().cpu(), widths.macs.total / target).to(u.device, u.dtype)
            masker = member.scores_map.masker
            masked = masker.apply(member.params, masker.kept_mask(member.base, kept, cfg.curve_temperature))
            return lambda x: torch.func.functional_call(member.model, masked, (x,))

        return _masked_step(members, batches, masked_logits)


DEFAULT_OBJECTIVE = "curve"


def objective_defaults(name: str) -> dict:
    """The settings objective ``name`` trains with unless they are given (a copy)."""
    return dict(objective(name).defaults)


def fill(config: dict, objective_key: str = "objective") -> dict:
    """``config`` with every setting that is None (or absent) taken from its objective's defaults."""
    for key, value in objective_defaults(config[objective_key]).items():
        if config.get(key) is None:
            config[key] = value
    return config


def trained_edit(name: str, edit: str) -> str:
    """The edit objective ``name`` trains when given ``edit``: its own head, if it has one."""
    return objective(name).head or edit


def edit_refusal(name: str, edit: str) -> str | None:
    """Why ``edit`` cannot be meta-trained with objective ``name``, in words for an error line (None:
    it can). One check for ``meta_train.py``, Tune's search files and ``bench/quality.py``."""
    return objective(name).refusal(edit)
