"""Learned weight-level criteria: one score per weight, for unstructured and N:M sparsity.

The weight-level curve objective, the channel-level one's counterpart (``metanet.curve``): given a
score per weight of the pruned layers (``metanet.weight_pruning.prunable_layers``), a soft mask
keeps the top ``1 - s`` fraction of them over all layers together (global ranking), and the loss
is the masked network's cross-entropy with BatchNorm on batch statistics (as recalibration leaves
a pruned network), with ``s`` drawn per step from ``SPARSITY_RANGE``. Nothing rewards zeros: only
keeping the weights the task needs.

    mask_i = sigmoid((score_i - tau_s) / temperature),   tau_s = the s-quantile of the scores

Scores start at the weights' log magnitude, so that step 0 keeps what global magnitude pruning
keeps and ``temperature`` is in units of a factor e in magnitude. Two ways to get them:

- ``fit_weight_scores``: free scores optimised on one network (Adam), the per-network reference a
  learned criterion should approach (prune_batch's ``curve`` at the weight level);
- a metanetwork with edit ``weight_scores``: log|w| plus the per-weight corrections it decodes from
  its final edge states (``MetaNetwork.weight_deltas``, 0 before training), meta-trained over a
  zoo with ``meta_train(objective="weight_curve")``: one forward pass per network at pruning time.

``weight_criterion_of`` turns either into the ``metanet.weight_pruning`` criterion that ranks the
weights (for global, per-layer or N:M masks alike).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metanet.graph import NetworkGraph, graph_to_params, network_to_graph
from metanet.levels import Level
from metanet.metanetwork import apply_metanetwork
from metanet.weight_pruning import GivenScores, prunable_layers
from metanet.curve import batch_stat_copy
from metanet.weight_pruning import weight_criterion

SPARSITY_RANGE = (0.5, 0.95)  # the sparsities the objective draws from (the benchmark's 0.5 ... 0.95)
TEMPERATURE = 0.2


def weight_names(model: nn.Module, dense_ends: bool = True) -> list[str]:
    """The parameter names of the weights a weight-level pruning of ``model`` masks."""
    return [f"{n}.weight" for n in prunable_layers(model, dense_ends)]


def magnitude_base(params: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """log |w| of each of ``names``: the scores of global magnitude pruning, as a starting point."""
    return {n: params[n].detach().abs().clamp_min(1e-12).log() for n in names}


def soft_masked(params: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor], sparsity: float,
                temperature: float = TEMPERATURE) -> dict[str, torch.Tensor]:
    """``params`` with each scored weight multiplied by its soft mask at ``sparsity`` (the threshold
    detached: the gradient moves scores across it, not it)."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = min(max(int(sparsity * flat.numel()), 1), flat.numel())
    tau = flat.detach().kthvalue(k).values
    out = dict(params)
    for name, s in scores.items():
        out[name] = params[name] * torch.sigmoid((s - tau) / temperature)
    return out


def weight_curve_loss(model: nn.Module, params: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor],
                      sparsity: float, x: torch.Tensor, y: torch.Tensor,
                      temperature: float = TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, logits) of ``model`` (a ``metanet.curve.batch_stat_copy``) with ``params``
    soft-masked by ``scores`` at ``sparsity``, on one batch."""
    logits = torch.func.functional_call(model, soft_masked(params, scores, sparsity, temperature), (x,))
    return F.cross_entropy(logits, y), logits


def fit_weight_scores(model: nn.Module, data, *, steps: int, batch_size: int, seed: int = 0,
                      sparsities: tuple[float, float] = SPARSITY_RANGE, lr: float = 0.1,
                      temperature: float = TEMPERATURE, dense_ends: bool = True) -> dict[str, torch.Tensor]:
    """Per-weight scores optimised on ``model`` itself with the weight-level curve objective:
    ``steps`` Adam steps, each on one shuffled training batch and a sparsity drawn uniformly from
    ``sparsities``. Returns {layer name: scores shaped like its weight}."""

    device = next(model.parameters()).device
    work = batch_stat_copy(model)
    params = {k: v.detach() for k, v in work.named_parameters()}
    names = weight_names(model, dense_ends)
    scores = {n: s.clone().requires_grad_(True) for n, s in magnitude_base(params, names).items()}
    opt = torch.optim.Adam(list(scores.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    lo, hi = sparsities
    done = 0
    while done < steps:
        for x, y in data.batches("train", batch_size, shuffle=True, generator=gen):
            if done >= steps:
                break
            s = lo + (hi - lo) * float(torch.rand((), generator=gen))
            loss, _ = weight_curve_loss(work, params, scores, s, x.to(device), y.to(device), temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
    return {n.removesuffix(".weight"): s.detach() for n, s in scores.items()}


def metanet_weight_scores(metanet, graph: NetworkGraph, model: nn.Module, params: Mapping[str, torch.Tensor],
                          names: Sequence[str]) -> dict[str, torch.Tensor]:
    """{weight name: log|w| + the metanetwork's correction} for ``names``; differentiable in
    ``metanet`` (called, not bypassed, so that a DDP wrapper averages its gradients)."""
    deltas = metanet(graph, scores=True)
    as_graph = graph.with_features(graph.node_feat, {t: deltas.get(t, graph.edge_feat[t]) for t in graph.edge_types})
    corrections = graph_to_params(as_graph, model)
    base = magnitude_base(params, names)
    return {n: base[n] + corrections[n] for n in names}


def weight_level_view(metanet, model: nn.Module, example_inputs: torch.Tensor):
    """(the network to prune, the weight criterion ranking it) for a metanetwork at the weight
    level: a ``weight_scores`` one ranks ``model``'s own weights by its scores; an edit (the
    paper's, meta-trained with ``paper_l1``) changes them, then global magnitude ranks."""
    if metanet.head.ranks is Level.WEIGHTS:
        return model, learned_weight_criterion(metanet, model, example_inputs)
    if metanet.head.ranks is Level.CHANNELS:
        raise ValueError("a channel-scores metanetwork ranks channels, not weights")
    return apply_metanetwork(metanet, model, example_inputs), weight_criterion("magnitude")


def learned_weight_criterion(metanet, model: nn.Module, example_inputs: torch.Tensor,
                             dense_ends: bool = True) -> GivenScores:
    """The weight criterion a ``weight_scores`` metanetwork gives ``model``: one forward pass."""
    metanet.eval().to(example_inputs.device)
    graph = network_to_graph(model, example_inputs)
    names = weight_names(model, dense_ends)
    with torch.no_grad():
        scores = metanet_weight_scores(metanet, graph, model, dict(model.named_parameters()), names)
    return GivenScores({n.removesuffix(".weight"): s for n, s in scores.items()}, name="learned")
