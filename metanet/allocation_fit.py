"""The per-network allocation: each group's kept fraction and each channel's score optimised together
on one network with the curve objective, at its MAC target. What any allocation can gain over
``uniform`` on that network, and what a learned allocation should approach (the ``fitted``
allocation, ``metanet.allocation``).

Free parameters: a logit ``u_g`` per group and a score per channel (started at magnitude's ranking,
standardised within its group, as ``metanet.curve.fit_scores``). Group g keeps

    f_g(u, s) = lo_g + (1 - lo_g) * sigmoid(u_g + s)

of its channels (``lo_g``: one channel, or ``1 - max_ratio``). The scalar ``s`` puts the
differentiable MAC count (``metanet.widths.MacModel``) on the target's budget B: found by bisection
without gradient, then one Newton step with the slope held constant,

    s' = s - (MACs(f(u, s)) - B) / (dMACs/ds),

whose value is s (the residual is 0) and whose gradient is the implicit one, ds/du =
-(dMACs/du) / (dMACs/ds): the budget holds exactly and the gradient moves channels between groups
at constant MACs. The loss is the cross-entropy of the network masked by ``ChannelMask.kept_mask``
(each group's soft top-``f_g`` channels by score), BatchNorm on batch statistics, one training batch
per step. ``u`` starts at 0: the same fraction of every group.

A learned allocation (a metanetwork with the ``allocation`` head, ``metanet.heads``) replaces the
free ``u`` by the metanetwork's logits for the network's graph at the target (``learned_kept``),
and is meta-trained on the same loss with magnitude ranking inside each group (the ``allocation``
objective, ``metanet.objectives``).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metanet.curve import batch_stat_copy
from metanet.data import TaskData
from metanet.graph import NetworkGraph, network_to_graph
from metanet.masks import ChannelMask
from metanet.metanetwork import GROUP_FEATURE_WIDTH, MetaNetwork
from metanet.prune import DEFAULT_PRUNING, PruneSettings, structure
from metanet.scoring import score_map
from metanet.widths import MacModel

FIT_STEPS = 60
FIT_LR = 0.1  # Adam on the group logits u
SCORE_LR = 0.2  # Adam on the channel scores (``ChannelMask.lr``), in units of a group's spread
TEMPERATURE = 0.2  # the soft mask's, as ``fit_scores`` measured best for channels


@dataclass
class FittedAllocation:
    """{group root: fraction kept} and the jointly fitted channel scores ([C], ``masker``'s order)."""

    kept: dict[str, float]
    scores: torch.Tensor
    masker: ChannelMask
    losses: list[float]


class Widths:
    """Group logits -> kept fractions [G] (in ``masker``'s group order) on the MAC budget of a target."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, masker: ChannelMask,
                 settings: PruneSettings = DEFAULT_PRUNING):
        self.macs = MacModel(model, example_inputs, settings)
        rows = masker.groups.rows
        missing = [r for r in self.macs.roots if f"{r}.weight" not in rows]
        if missing:
            raise ValueError(f"{type(model).__name__}: groups {missing[:3]} have no channels in the mask")
        # a group's root layer's output rows carry its channels' ids; the group is theirs
        self.group = torch.tensor([int(masker.group_of[int(rows[f"{r}.weight"][1][0])]) for r in self.macs.roots])
        if sorted(self.group.tolist()) != list(range(len(masker.sizes))):
            raise ValueError(f"{type(model).__name__}: the MAC model's groups and the mask's do not match one to one")
        sizes = masker.sizes.double()
        self.lo = torch.maximum(1.0 / sizes, torch.full_like(sizes, 1.0 - settings.max_ratio))

    def _macs(self, kept: torch.Tensor) -> torch.Tensor:
        return self.macs(kept[self.group])  # the MAC model reads groups in its roots' order

    def kept(self, u: torch.Tensor, s) -> torch.Tensor:
        lo = self.lo.to(u.device)
        return lo + (1 - lo) * torch.sigmoid(u.double() + s)

    def at_budget(self, u: torch.Tensor, budget: float, iterations: int = 50) -> torch.Tensor:
        """[G] kept fractions with MACs = ``budget`` (as close as the fractions' bounds allow),
        differentiable in ``u`` at constant MACs (the implicit gradient of the shift)."""
        low, high = -40.0, 40.0
        with torch.no_grad():  # the shift's value: no gradient through the bisection
            for _ in range(iterations):
                mid = (low + high) / 2
                if float(self._macs(self.kept(u, mid))) > budget:
                    high = mid
                else:
                    low = mid
        with torch.enable_grad():  # the slope is a derivative even for a caller under no_grad
            s = torch.tensor((low + high) / 2, dtype=torch.float64, requires_grad=True)
            macs = self._macs(self.kept(u.detach(), s))
            (slope,) = torch.autograd.grad(macs, s)
        if float(slope) <= 0 or abs(float(macs.detach()) - budget) > 1e-3 * budget:
            # every group at a bound (the budget out of reach): no shift moves the MACs, no Newton step
            return self.kept(u, s.detach())
        shift = s.detach() - (self._macs(self.kept(u, s.detach())) - budget) / slope.detach()
        return self.kept(u, shift)


def fit_allocation(model: nn.Module, data: TaskData, target: float, *, steps: int = FIT_STEPS, batch_size: int = 128,
                   seed: int = 0, temperature: float = TEMPERATURE, mode: str = "soft",
                   settings: PruneSettings = DEFAULT_PRUNING) -> FittedAllocation:
    """Kept fractions and channel scores fitted to ``model`` at ``target`` (a MAC speed-up) with
    ``steps`` Adam steps, one shuffled training batch of ``data`` each."""
    device = next(model.parameters()).device
    x = torch.zeros(data.input_shape, device=device)
    masker = ChannelMask(model, x)
    widths = Widths(model, x, masker, settings)
    budget = widths.macs.total / float(target)
    work = batch_stat_copy(model)
    params = {k: v.detach() for k, v in work.named_parameters()}
    u = torch.zeros(len(masker.sizes), dtype=torch.float64, requires_grad=True)
    scores = masker.initial(model)
    opt = torch.optim.Adam([{"params": [u], "lr": FIT_LR}, {"params": [scores], "lr": SCORE_LR}])
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    while len(losses) < steps:
        for xb, yb in data.batches("train", batch_size, shuffle=True, generator=gen):
            if len(losses) >= steps:
                break
            kept = widths.at_budget(u, budget).float().to(device)
            masked = masker.apply(params, masker.kept_mask(scores, kept, temperature, mode))
            loss = F.cross_entropy(torch.func.functional_call(work, masked, (xb.to(device),)), yb.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    kept = widths.at_budget(u.detach(), budget).detach()
    roots = widths.macs.roots
    return FittedAllocation({r: float(kept[g]) for r, g in zip(roots, widths.group.tolist())}, scores.detach(),
                            masker, losses)


@dataclass
class GroupInputs:
    """What an allocation metanetwork reads of one architecture besides its graph: the graph
    ``nodes`` carrying each group's channels and their ``groups`` (in the mask's group order), the
    groups' ``features`` [G, GROUP_FEATURE_WIDTH], and the ``widths`` that put logits on a budget."""

    nodes: torch.Tensor
    groups: torch.Tensor
    features: torch.Tensor
    widths: Widths


_INPUTS: OrderedDict = OrderedDict()  # (graph, structure, settings) -> GroupInputs, least recently used last
_INPUTS_MAX = 256


def group_inputs(model: nn.Module, graph: NetworkGraph, settings: PruneSettings = DEFAULT_PRUNING) -> GroupInputs:
    """``GroupInputs`` of ``model``'s architecture, computed on the CPU (a copy) and remembered per
    graph layout, structure (strides and pooling change the MACs, not the layout) and settings.
    Each group's features: log2 of its channel count / 8; its share of the MACs (d log MACs / d log
    f_g at the unpruned widths, from the MAC model: how much pruning it saves); its depth (its root
    layer's position among the modules)."""
    x = torch.zeros(graph.input_shape)
    key = (graph.fingerprint, structure(model, x), repr(settings))
    if key in _INPUTS:
        _INPUTS.move_to_end(key)
        return _INPUTS[key]
    model = copy.deepcopy(model).cpu()
    with torch.enable_grad():  # Torch-Pruning traces the dependency graph with autograd
        found = _group_inputs(model, graph.to("cpu") if graph.node_feat.device.type != "cpu" else graph, x, settings)
    _INPUTS[key] = found
    if len(_INPUTS) > _INPUTS_MAX:
        _INPUTS.popitem(last=False)
    return found


def _group_inputs(model: nn.Module, graph: NetworkGraph, x: torch.Tensor, settings: PruneSettings) -> GroupInputs:
    scores_map = score_map(model, graph)
    masker = scores_map.masker
    widths = Widths(model, x, masker, settings)
    macs = widths.macs
    share = (macs.base.unsqueeze(1) * macs.exponents).sum(0) / macs.total
    order = [name for name, _ in model.named_modules()]
    features = torch.zeros(len(masker.sizes), GROUP_FEATURE_WIDTH)
    for i, root in enumerate(macs.roots):
        g = int(widths.group[i])
        features[g] = torch.tensor([float(torch.log2(masker.sizes[g].double())) / 8, float(share[i]),
                                    order.index(root) / max(len(order) - 1, 1)])
    return GroupInputs(scores_map.nodes, masker.group_of[scores_map.channels], features, widths)


def allocation_logits(metanet, graph: NetworkGraph, inputs: GroupInputs, target: float) -> torch.Tensor:
    """[G] the metanetwork's logits (``metanet`` may be a DDP wrapper: called, not bypassed)."""
    device = graph.node_feat.device
    return metanet(graph, scores=True, nodes=inputs.nodes.to(device), groups=inputs.groups.to(device),
                   features=inputs.features.to(device), target=float(target))


def learned_kept(metanet: MetaNetwork, model: nn.Module, example_inputs: torch.Tensor, target: float,
                 settings: PruneSettings = DEFAULT_PRUNING) -> dict[str, float]:
    """{group root: fraction kept} an allocation metanetwork gives ``model`` at ``target`` (one
    forward pass, then the shift onto the target's MACs of the differentiable count)."""
    if not metanet.head.allocates:
        raise ValueError(f"this metanetwork's edit is {metanet.config.edit!r}: it decodes no allocation "
                         "(an allocation metanetwork has edit 'allocation')")
    if metanet.config.calibration:
        raise ValueError("an allocation metanetwork reads no calibration statistics: build it with calibration=False")
    metanet.eval().to(example_inputs.device)
    graph = network_to_graph(model, example_inputs)
    inputs = group_inputs(model, graph, settings)
    with torch.no_grad():
        u = allocation_logits(metanet, graph, inputs, target).double().cpu()
    widths = inputs.widths
    kept = widths.at_budget(u, widths.macs.total / float(target)).detach()
    return {r: float(kept[g]) for r, g in zip(widths.macs.roots, widths.group.tolist())}
