"""Per-channel gates: an edit that removes a channel with one number instead of a hundred.

A gate ``g_i > 0`` on node i (a hidden channel) scales everything that carries the channel: the
kernel rows that produce it (edges into i), the kernel columns that read it (edges out of i), its
layer's bias and its BatchNorm's weight, bias and running mean by ``g_i``, the running variance by
``g_i**2``. In eval mode BatchNorm then normalises as before (up to its eps), so the channel's output is
``g_i`` times what it was, and what the next layer sees of it ``g_i**2``; every slice of the
channel's dependency group shrinks together, so its group importance falls with ``g_i`` and a gate
near 0 marks a channel the pruner removes for free. Input channels and the classifier's outputs
are never gated; identity edges (residual additions) carry no weight and are left alone.

This is our design, beyond the paper (whose edit is additive, ``w + r * decoded``): with the
additive edit and r = 0.01 the decoder must output about -100 w to zero a weight, and the
metanetwork learned a near-uniform shrink instead (issue 11).

``channel_evidence`` gives the decoder what tells the channels of a layer apart, as features beside
the GNN's node embedding: the norms of the channel's kernel rows and columns, its BatchNorm scale
and shift, and each one's ratio to the layer's largest and rank within the layer.
``optimise_gates`` is the per-network control: free gates fitted to one network by gradient
descent on the meta-objective (the ``gate`` baseline, and the distillation targets).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metanet.graph import STRUCTURAL_EDGE_TYPES, NetworkGraph, graph_to_params
from metanet.sparsity import GroupSparsity, sparsity_term

EVIDENCE_FEATURES = ("log_row_norm", "log_col_norm", "bn_scale", "bn_shift",
                     "row_norm_of_max", "col_norm_of_max", "bn_scale_of_max",
                     "row_norm_rank", "col_norm_rank", "bn_scale_rank")
BN_EPS = 1e-5


def gate_from_logit(logit: torch.Tensor) -> torch.Tensor:
    """g = 2 sigmoid(s): 1 at s = 0 (the identity edit), in (0, 2)."""
    return 2.0 * torch.sigmoid(logit)


def _cached(graph: NetworkGraph, key: str, make):
    """``make()``, computed once per graph (``NetworkGraph.derived``)."""
    if key not in graph.derived:
        graph.derived[key] = make()
    return graph.derived[key]


def _weight_edges(graph: NetworkGraph) -> torch.Tensor:
    """A mask over all edges (in ``edge_types`` order): True for kernel edges, False for structural ones."""
    offsets = graph.edge_offsets()
    mask = torch.ones(graph.num_edges, dtype=torch.bool, device=graph.src.device)
    for t in STRUCTURAL_EDGE_TYPES:
        if t in offsets:
            a, b = offsets[t]
            mask[a:b] = False
    return mask


def gatable(graph: NetworkGraph) -> torch.Tensor:
    """[N] bool: hidden channels, i.e. nodes with kernel edges both in and out."""
    def make():
        w = _weight_edges(graph)
        n = graph.num_nodes
        has_in = torch.zeros(n, dtype=torch.bool, device=w.device).index_fill_(0, graph.dst[w], True)
        has_out = torch.zeros(n, dtype=torch.bool, device=w.device).index_fill_(0, graph.src[w], True)
        return has_in & has_out
    return _cached(graph, "gatable", make)


def layer_ids(graph: NetworkGraph) -> torch.Tensor:
    """[N] int: nodes produced by one layer share an id. A layer's output channels all read the
    same inputs (a dense block), so (first source, last source, in-degree) of a node's kernel edges
    identifies its layer; input channels (no kernel edges in) form one group per image."""
    def make():
        w = _weight_edges(graph)
        n, src, dst = graph.num_nodes, graph.src[w], graph.dst[w]
        big = torch.full((n,), graph.num_nodes, dtype=torch.int64, device=src.device)
        first = big.scatter_reduce(0, dst, src, "amin", include_self=True)
        last = torch.full_like(big, -1).scatter_reduce(0, dst, src, "amax", include_self=True)
        degree = torch.zeros_like(big).index_add_(0, dst, torch.ones_like(dst))
        return torch.unique(torch.stack([first, last, degree], 1), dim=0, return_inverse=True)[1]
    return _cached(graph, "layers", make)


def _within_layer(values: torch.Tensor, layers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each value's ratio to its layer's largest, and its rank in the layer scaled to [0, 1]."""
    count = int(layers.max()) + 1 if layers.numel() else 0
    top = torch.zeros(count, dtype=values.dtype, device=values.device).scatter_reduce(
        0, layers, values, "amax", include_self=False)
    ratio = values / top[layers].clamp_min(1e-12)
    # rank within the layer: sort by (layer, value), then subtract each layer's first position
    order = torch.argsort(layers.double() * (values.abs().max() + 1) * 4 + values.double(), stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    sizes = torch.zeros(count, dtype=torch.int64, device=values.device).index_add_(0, layers, torch.ones_like(layers))
    starts = torch.cumsum(sizes, 0) - sizes
    rank = (position - starts[layers]).to(values.dtype) / (sizes[layers] - 1).clamp_min(1).to(values.dtype)
    return ratio, rank


def channel_evidence(graph: NetworkGraph) -> torch.Tensor:
    """[N, len(EVIDENCE_FEATURES)] per-channel evidence, from the graph's own features (detached)."""
    def make():
        with torch.no_grad():
            w = _weight_edges(graph)
            e = torch.cat([graph.edge_feat[t].square().sum(1) for t in graph.edge_types])[w]
            n = graph.num_nodes
            rows = torch.zeros(n, device=e.device).index_add_(0, graph.dst[w], e).sqrt()
            cols = torch.zeros(n, device=e.device).index_add_(0, graph.src[w], e).sqrt()
            f = graph.node_feat
            scale = f[:, 0].abs() / (f[:, 3].clamp_min(0) + BN_EPS).sqrt()
            layers = layer_ids(graph)
            (r_ratio, r_rank), (c_ratio, c_rank), (s_ratio, s_rank) = (
                _within_layer(v, layers) for v in (rows, cols, scale))
            out = torch.stack([torch.log(rows + 1e-6), torch.log(cols + 1e-6), scale, f[:, 1],
                               r_ratio, c_ratio, s_ratio, r_rank, c_rank, s_rank], 1)
            return torch.nan_to_num(out)
    return _cached(graph, "evidence", make)


def apply_gates(graph: NetworkGraph, gate: torch.Tensor) -> NetworkGraph:
    """``graph`` with node i's channel scaled by ``gate[i]`` (see the module docstring); gates of
    nodes that are not hidden channels are ignored (treated as 1). Differentiable in ``gate``."""
    g = torch.where(gatable(graph), gate, torch.ones_like(gate))
    f = graph.node_feat
    node = torch.stack([f[:, 0] * g, f[:, 1] * g, f[:, 2] * g, f[:, 3] * g * g, f[:, 4] * g], 1)
    edges, offsets = {}, graph.edge_offsets()
    for t in graph.edge_types:
        if t in STRUCTURAL_EDGE_TYPES:
            edges[t] = graph.edge_feat[t]
            continue
        a, b = offsets[t]
        edges[t] = graph.edge_feat[t] * (g[graph.src[a:b]] * g[graph.dst[a:b]]).unsqueeze(1)
    return graph.with_features(node, edges)


def optimise_gates(model: nn.Module, graph: NetworkGraph, batches: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]],
                   sparsity, *, lr: float = 0.05, form: str = "relative", optimizer: str = "adam") -> torch.Tensor:
    """Free gate logits fitted to one network: for each entry of ``batches`` (a list of task
    batches), one step (Adam, or SGD with momentum 0.9) on the mean cross-entropy of the network
    with gated weights, its BatchNorm in eval mode (running statistics), plus ``sparsity`` (a
    ``GroupSparsity``) of the gated parameters in the ``form`` "relative" (scale-free,
    ``GroupSparsity.relative``), "group" (normalised by the network's own group norms) or "none".

    The relative form is the default because the others push every gate down together and, with
    frozen BatchNorm statistics, a plain deep network cannot absorb a uniform shrink: gates of 0.9
    on every channel of a digits VGG take it from 98% to 16%, and optimising with those forms left
    every VGG at chance whatever the reg and optimiser (bench/edits.py, docs/method.md). Returns the
    logits [N] (0 = gate 1)."""
    was_training = model.training
    model.eval()
    weights = sparsity.group_weights(graph_to_params(graph, model)) if form == "group" else None
    logit = torch.zeros(graph.num_nodes, device=graph.node_feat.device, requires_grad=True)
    opt = torch.optim.Adam([logit], lr=lr) if optimizer == "adam" else torch.optim.SGD([logit], lr=lr, momentum=0.9)
    for step_batches in batches:
        opt.zero_grad(set_to_none=True)
        params = graph_to_params(apply_gates(graph, gate_from_logit(logit)), model)
        loss = sparsity_term(sparsity, params, form, weights)
        for x, y in step_batches:
            loss = loss + F.cross_entropy(torch.func.functional_call(model, params, (x,)), y) / len(step_batches)
        loss.backward()
        opt.step()
    model.train(was_training)
    return logit.detach()


def fit_gates(model: nn.Module, graph: NetworkGraph, data, *, steps: int, batches_per_step: int, batch_size: int,
              augment: bool, seed: int, reg: float, alpha: float, lr: float) -> torch.Tensor:
    """``optimise_gates`` on ``steps`` steps of ``batches_per_step`` shuffled training batches of
    ``data`` (a ``zoo.data.TaskData``) with the relative sparsity term at ``reg``: the ``gate``
    baseline's and the distillation targets' gates. Returns the logits [N]."""
    import copy

    gen = torch.Generator().manual_seed(seed)
    batches = [list(data.batches("train", batch_size, shuffle=True, augment=augment, generator=gen,
                                 limit=batches_per_step)) for _ in range(steps)]
    sparsity = GroupSparsity(copy.deepcopy(model), torch.zeros(graph.input_shape, device=graph.src.device),
                             reg=reg, alpha=alpha)
    return optimise_gates(model, graph, batches, sparsity, lr=lr)
