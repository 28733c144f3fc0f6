"""A learned pruning criterion: a metanetwork's scores per channel (or per weight), trained on the
curve objective.

A ``scores`` metanetwork (``MetaNetConfig(edit="scores")``) edits nothing; it decodes one number
per graph node from its final node state (``MetaNetwork.node_scores``). A channel of a dependency
group that Torch-Pruning couples (a residual stage's channel is one output row of several layers,
so several graph nodes) gets

    score_c = z_g(log I_c) + mean over c's nodes n of s_n

where ``I_c`` is the channel's group L2 importance (what magnitude pruning ranks by), ``z_g`` the
standardisation within its group g, and ``s`` the decoded node scores. The decoder's last layer
starts at zero, so an untrained metanetwork is magnitude pruning exactly, and what meta-training
learns is a correction in units of a group's spread: the same parametrisation as the per-network
``curve`` method's free scores (``metanet.curve.fit_scores``), which is what the metanetwork is
meant to approach in one forward pass.

``ScoreMap`` holds, per architecture, the channel map of the curve objective (``ChannelMask``)
and which graph nodes carry each channel; ``channel_scores`` turns a graph into scores [C].

The weight level is the same idea one level down: a ``weight_scores`` metanetwork decodes one
correction per edge (``MetaNetwork.weight_deltas``) and ``metanet_weight_scores`` adds it to each
weight's log magnitude (so an untrained one is global magnitude pruning), meta-trained with
``objective="weight_curve"``.

``learned_criterion`` turns either into the pruner's criterion (``metanet.criteria.GivenScores`` at
the level the metanetwork's head ranks): one forward pass per network at pruning time.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from metanet.criteria import GivenScores
from metanet.curve import curve_gradient, fit_scores
from metanet.graph import NetworkGraph, graph_layout, graph_to_params, network_to_graph
from metanet.levels import Level
from metanet.masks import ChannelMask, WeightMask, magnitude_base
from metanet.metanetwork import MetaNetwork
from metanet.gates import _within_layer


def row_nodes(layout) -> dict[str, torch.Tensor]:
    """{Conv/Linear weight name: [its output rows] graph node of each row}, from a layout's edge
    slots (a layer's edges are output-major: one output row's edges are consecutive)."""
    counts = torch.bincount(layout.edge_type, minlength=len(layout.edge_types))
    type_start = dict(zip(layout.edge_types, (torch.cumsum(counts, 0) - counts).tolist()))
    out = {}
    for slot in layout.edge_slots:
        if slot.transposed or not slot.shape:
            continue
        per_row = slot.rows // slot.shape[0]
        first = type_start[slot.etype] + slot.start + torch.arange(slot.shape[0]) * per_row
        out[slot.name] = layout.dst[first]
    return out


class ScoreMap:
    """One architecture's prunable channels (``masker``: Torch-Pruning's coupled groups) and the
    graph nodes that carry each: ``nodes[k]`` is an output channel of a Conv/Linear layer whose
    row is channel ``channels[k]``."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, masker: ChannelMask | None = None):
        self.masker = masker or ChannelMask(model, example_inputs)
        self.row_nodes = row_nodes(graph_layout(model, tuple(example_inputs.shape)))
        nodes, channels = [], []
        for name, (idx, gid) in self.masker.groups.rows.items():
            if name not in self.row_nodes:  # a layer the graph stores otherwise (attention projections): magnitude only
                continue
            nodes.append(self.row_nodes[name][idx])
            channels.append(gid)
        self.nodes = torch.cat(nodes) if nodes else torch.zeros(0, dtype=torch.int64)
        self.channels = torch.cat(channels) if channels else torch.zeros(0, dtype=torch.int64)
        self.num_channels = self.masker.num_channels
        self.node_counts = torch.bincount(self.channels, minlength=self.num_channels).clamp_min(1)

    def base(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[C] magnitude's ranking as scores: the log group importance, standardised per group."""
        groups = self.masker.groups
        with torch.no_grad():
            norms, ids = groups.slice_norms({k: v.detach() for k, v in params.items()})
            importance = groups.channel_importance(norms, ids)
        return self.masker.standardise(importance.clamp_min(1e-12).log())

    def pool(self, node_scores: torch.Tensor) -> torch.Tensor:
        """[C] the mean of ``node_scores`` ([N]) over each channel's nodes (0 where it has none)."""
        dev = node_scores.device
        total = torch.zeros(self.num_channels, device=dev, dtype=node_scores.dtype).index_add(
            0, self.channels.to(dev), node_scores[self.nodes.to(dev)])
        return total / self.node_counts.to(dev, node_scores.dtype)


STATISTICS = ("abs_mean", "std", "taylor")  # per channel, over calibration batches; each as (z, rank) in its layer


def channel_statistics(model: nn.Module, graph: NetworkGraph, batches, scores_map: "ScoreMap") -> torch.Tensor:
    """[N, 2 * len(STATISTICS)] per-node statistics of ``model`` (eval mode) over ``batches`` ((x, y)
    pairs): for every Conv/Linear output channel the mean absolute activation, its standard deviation
    and the first-order Taylor score ``|sum over positions of a * dL/da|`` (mean over samples), each
    as log-value standardised within the layer and as rank within the layer in [0, 1]; zeros for
    nodes that are no layer's output (the input)."""
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    names = {m: n for n, m in model.named_modules()}
    sums: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(module, _inputs, out):
        if out.requires_grad:
            out.retain_grad()
        outputs[names[module]] = (out, isinstance(module, nn.Linear))

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))
              and f"{names[m]}.weight" in scores_map.row_nodes]
    handles = [m.register_forward_hook(hook) for m in layers]
    seen = 0
    try:
        for x, y in batches:
            outputs.clear()
            with torch.enable_grad():
                x = x.requires_grad_(True)  # activations need gradients even where weights are frozen
                loss = F.cross_entropy(model(x), y, reduction="sum")
                loss.backward(inputs=[o for o, _ in outputs.values() if o.requires_grad])
            for name, (a, linear) in outputs.items():
                # a Linear's channels are its last dimension (tokens or positions before it: a ViT's
                # MLP, ConvNeXt's channels-last blocks), a convolution's its second
                channels = a.dim() - 1 if linear else 1
                grad = a.grad if a.grad is not None else torch.zeros_like(a)
                flat, grad = (t.detach().movedim(channels, 0).reshape(a.shape[channels], a.shape[0], -1)
                              for t in (a, grad))  # [C, batch, positions]
                stats = torch.stack([flat.abs().mean((1, 2)) * a.shape[0], flat.std((1, 2)) * a.shape[0],
                                     (flat * grad).sum(2).abs().sum(1)], 1)
                sums[name] = sums.get(name, 0) + stats
            seen += int(y.numel())
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)

    out = torch.zeros(graph.num_nodes, 2 * len(STATISTICS))
    for name, total in sums.items():
        nodes = scores_map.row_nodes[f"{name}.weight"]
        value = (total / max(seen, 1)).clamp_min(1e-12).log()
        z = (value - value.mean(0)) / (value.std(0, unbiased=False) + 1e-6)
        layer = torch.zeros(len(nodes), dtype=torch.int64)
        ranks = torch.stack([_within_layer(value[:, k], layer)[1] for k in range(len(STATISTICS))], 1)
        out[nodes] = torch.cat([z, ranks], 1)
    return torch.nan_to_num(out)


def gradient_statistics(model: nn.Module, graph: NetworkGraph, batches, scores_map: "ScoreMap") -> torch.Tensor:
    """[N, 2] per-node: the curve objective's gradient at magnitude's ranking
    (``metanet.curve.curve_gradient`` over ``batches``) of the channel the node carries, divided by
    its group's root mean square (sign kept), and the channel's rank in its group by the negative
    gradient (1: the objective most wants it kept); zeros for nodes that carry no channel."""

    masker = scores_map.masker
    grad = curve_gradient(model, masker, batches).float().cpu()
    group_of = masker.group_of
    sizes = masker.sizes.to(grad.dtype)
    rms = (torch.zeros(len(sizes)).index_add(0, group_of, grad ** 2) / sizes).sqrt()
    scaled = grad / (rms[group_of] + 1e-12)
    _, rank = _within_layer(-grad, group_of)
    out = torch.zeros(graph.num_nodes, 2)
    out[scores_map.nodes] = torch.stack([scaled, rank], 1)[scores_map.channels]
    return torch.nan_to_num(out)


def node_statistics(metanet: MetaNetwork, model: nn.Module, graph: NetworkGraph, batches,
                    scores_map: "ScoreMap") -> torch.Tensor:
    """The per-node inputs ``metanet`` reads beside the graph: ``channel_statistics``, and with
    ``config.gradient`` also ``gradient_statistics``, over the same ``batches``."""
    core = metanet.module if hasattr(metanet, "module") else metanet
    batches = list(batches)
    stats = channel_statistics(model, graph, batches, scores_map)
    if core.config.gradient:
        stats = torch.cat([stats, gradient_statistics(model, graph, batches, scores_map)], 1)
    return stats


def attach_statistics(graph: NetworkGraph, statistics: torch.Tensor) -> NetworkGraph:
    """``graph`` carrying per-node calibration statistics for a metanetwork built with ``calibration``."""
    graph.statistics = statistics.to(graph.node_feat.device)
    return graph


_MAPS: dict[str, ScoreMap] = {}


def score_map(model: nn.Module, graph: NetworkGraph) -> ScoreMap:
    """The ``ScoreMap`` of ``graph``'s architecture (cached by its fingerprint)."""
    if graph.fingerprint not in _MAPS:
        with torch.enable_grad():  # Torch-Pruning traces the dependency graph with autograd
            _MAPS[graph.fingerprint] = ScoreMap(model, torch.zeros(graph.input_shape))
    return _MAPS[graph.fingerprint]


def channel_scores(metanet: MetaNetwork, graph: NetworkGraph, params: Mapping[str, torch.Tensor],
                   scores_map: ScoreMap) -> torch.Tensor:
    """[C] the metanetwork's score of every prunable channel of the network ``graph`` stands for
    (``params``: its parameters, for the magnitude base); differentiable in ``metanet``, which may
    be a DDP wrapper (called, not bypassed, so that its gradients are averaged across workers)."""
    base = scores_map.base(params).to(graph.node_feat.device)
    return base + scores_map.pool(metanet(graph, scores=True))


def _scores_of(metanet: MetaNetwork, model: nn.Module, example_inputs: torch.Tensor, batches) -> tuple:
    """([C] the metanetwork's channel scores of ``model``, its ``ScoreMap``): one forward pass."""
    metanet.eval().to(example_inputs.device)
    graph = network_to_graph(model, example_inputs)
    scores_map = score_map(model, graph)
    if metanet.config.calibration:
        if batches is None:
            raise ValueError("this metanetwork reads calibration statistics: give it calibration batches")
        attach_statistics(graph, node_statistics(metanet, model, graph, batches, scores_map))
    with torch.no_grad():
        return channel_scores(metanet, graph, dict(model.named_parameters()), scores_map), scores_map


def metanet_weight_scores(metanet, graph: NetworkGraph, model: nn.Module, params: Mapping[str, torch.Tensor],
                          names: Sequence[str]) -> dict[str, torch.Tensor]:
    """{weight name: log|w| + the metanetwork's correction} for ``names``, a ``weight_scores``
    metanetwork's per-weight scores (its edge decoders' outputs, 0 before training); differentiable
    in ``metanet`` (called, not bypassed, so that a DDP wrapper averages its gradients)."""
    deltas = metanet(graph, scores=True)
    as_graph = graph.with_features(graph.node_feat, {t: deltas.get(t, graph.edge_feat[t]) for t in graph.edge_types})
    corrections = graph_to_params(as_graph, model)
    base = magnitude_base(params, names)
    return {n: base[n] + corrections[n] for n in names}


def _learned_channels(metanet: MetaNetwork, model: nn.Module, example_inputs: torch.Tensor, batches,
                      dense_ends: bool) -> GivenScores:
    scores, scores_map = _scores_of(metanet, model, example_inputs, batches)
    return scores_map.masker.criterion(scores)


def _learned_weights(metanet: MetaNetwork, model: nn.Module, example_inputs: torch.Tensor, batches,
                     dense_ends: bool) -> GivenScores:
    metanet.eval().to(example_inputs.device)
    graph = network_to_graph(model, example_inputs)
    mask = WeightMask(model, dense_ends)
    with torch.no_grad():
        scores = metanet_weight_scores(metanet, graph, model, dict(model.named_parameters()), mask.names)
    return mask.criterion(scores, "learned")


_LEARNED = {Level.CHANNELS: _learned_channels, Level.WEIGHTS: _learned_weights}


def learned_criterion(metanet: MetaNetwork, model: nn.Module, example_inputs: torch.Tensor, batches=None,
                      dense_ends: bool = True) -> GivenScores:
    """The pruner's criterion for ``model`` from one forward pass of a learned criterion, at the level
    its head ranks: channel scores (``batches``: (x, y) calibration batches, for a metanetwork that
    reads channel statistics) or weight scores (of the layers a pruning with ``dense_ends`` masks)."""
    level = metanet.head.ranks
    if level not in _LEARNED:
        raise ValueError(f"a metanetwork with the {metanet.config.edit!r} head edits weights and ranks nothing")
    return _LEARNED[level](metanet, model, example_inputs, batches, dense_ends)


def refined_criterion(metanet: MetaNetwork, model: nn.Module, data, amounts, *, steps: int, batch_size: int,
                      seed: int = 0, batches=None, **fit) -> GivenScores:
    """The metanetwork's scores of ``model`` as the starting point of the per-network curve
    optimisation (``metanet.curve.fit_scores``: ``steps`` Adam steps on ``data``'s training
    batches at amounts between those in ``amounts``; ``fit``: its lr, temperature, mask, distill):
    ``steps`` 0 is ``learned_criterion``, no metanetwork (the untrained one) is ``curve``."""
    x = torch.zeros(data.input_shape, device=next(model.parameters()).device)
    scores, scores_map = _scores_of(metanet, model, x, batches)
    if steps:
        scores, _ = fit_scores(model, data, amounts, steps=steps, batch_size=batch_size, seed=seed,
                               masker=scores_map.masker, start=scores, **fit)
    return GivenScores(scores_map.masker.module_scores(scores))


def gated_by_scores(metanet: MetaNetwork, model: nn.Module, example_inputs: torch.Tensor, amount: float,
                    temperature: float = 0.2, batches=None) -> nn.Module:
    """The paper's framing of the same scores: an edit, not a criterion. A copy of ``model`` whose
    channels are multiplied by the soft mask that keeps each group's top ``1 - amount`` channels by
    the metanetwork's scores (``ChannelMask.mask``, ``temperature`` in units of a group's spread):
    the channels the scores would drop shrink towards zero, so that magnitude pruning, after the
    finetune, removes them."""
    import copy

    scores, scores_map = _scores_of(metanet, model, example_inputs, batches)
    masker = scores_map.masker
    mask = masker.mask(scores.to(example_inputs.device), amount, temperature, mode="soft")
    gated = masker.apply({k: v.detach() for k, v in model.named_parameters()}, mask)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(gated[name])
    return out
