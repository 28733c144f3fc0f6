"""The curve objective: the task loss of a network masked as pruning to an amount would leave it,
at either level (``metanet.masks``: which channels, or which weights, the scores keep).

``curve_loss`` is the cross-entropy of the masked network with BatchNorm on batch statistics, i.e.
statistics recomputed for the masked network, as ``recalibrate_bn`` leaves a pruned one; optionally
plus distillation to the unmasked network. There is no sparsity weight: nothing is rewarded for
shrinking, only for keeping the channels (weights) the task needs.

``fit_scores`` is the per-network optimisation (the ``curve`` method, at both levels): free scores
initialised at magnitude's ranking (``mask.initial``), ``steps`` Adam steps of the curve objective,
one training batch and one amount drawn uniformly from ``amounts`` per step. Measured
(``bench/curve_objective.py``, docs/benchmarks.md): for channels the soft mask at temperature 0.2
trains the scores best; the straight-through hard mask barely moves them off magnitude's ranking.
``curve_gradient`` is its first step's direction, as a per-network input a learned criterion reads.
"""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metanet.masks import ChannelMask, WeightMask
from metanet.prune import recalibrate_bn
from metanet.train import evaluate

Mask = ChannelMask | WeightMask

def _masked_forward(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.func.functional_call(model, dict(params), (x,))


def curve_loss(model: nn.Module, masker: Mask, params: Mapping[str, torch.Tensor], scores, amount: float,
               x: torch.Tensor, y: torch.Tensor, *, temperature: float = 0.5, mode: str = "hard",
               distill: float = 0.0, teacher: torch.Tensor | None = None) -> torch.Tensor:
    """The curve objective on one batch: cross-entropy of ``model`` with ``params`` masked by
    ``scores`` at ``amount`` (``masker``'s level), BatchNorm on the batch's statistics (``model``
    must have its norm layers in train mode and be a copy whose running statistics may change), plus
    ``distill`` times the KL divergence to ``teacher`` (the unmasked network's logits) when given."""
    logits = _masked_forward(model, masker.masked(params, scores, amount, temperature, mode), x)
    loss = F.cross_entropy(logits, y)
    if distill and teacher is not None:
        loss = loss + distill * F.kl_div(F.log_softmax(logits, 1), F.log_softmax(teacher, 1), log_target=True,
                                         reduction="batchmean")
    return loss


def batch_stat_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode but with its BatchNorm layers on batch statistics: what the
    curve objective evaluates (dropout off, statistics those of the masked network)."""
    work = copy.deepcopy(model).eval()
    for m in work.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    for p in work.parameters():
        p.requires_grad_(False)
    return work


def fit_scores(model: nn.Module, data, amounts: Sequence[float], *, steps: int, batch_size: int, seed: int,
               lr: float | None = None, temperature: float = 0.2, mode: str = "soft", distill: float = 0.0,
               augment: bool = False, masker: Mask | None = None, start=None) -> tuple:
    """Scores optimised on ``model`` itself with the curve objective at ``masker``'s level (default:
    channels): ``steps`` Adam steps at ``lr`` (default: the mask's), each on one shuffled training
    batch of ``data`` (a ``TaskData``) and an amount drawn uniformly from [min(amounts),
    max(amounts)], starting from ``start`` (default: magnitude's ranking). Returns (the scores:
    [C] for channels, {weight name: scores} for weights; the mask, whose ``criterion`` ranks by them)."""
    device = next(model.parameters()).device
    masker = masker or ChannelMask(model, torch.zeros(data.input_shape, device=device))
    work = batch_stat_copy(model)
    params = {k: v.detach() for k, v in work.named_parameters()}
    scores = masker.initial(model, start)
    opt = torch.optim.Adam(masker.leaves(scores), lr=masker.lr if lr is None else lr)
    gen = torch.Generator().manual_seed(seed)
    lo, hi = min(amounts), max(amounts)
    done = 0
    while done < steps:
        for x, y in data.batches("train", batch_size, shuffle=True, augment=augment, generator=gen):
            if done >= steps:
                break
            x, y = x.to(device), y.to(device)
            amount = lo + (hi - lo) * float(torch.rand((), generator=gen))
            teacher = None
            if distill:
                with torch.no_grad():
                    teacher = _masked_forward(work, params, x)
            loss = curve_loss(work, masker, params, scores, amount, x, y, temperature=temperature, mode=mode,
                              distill=distill, teacher=teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
    return masker.detach(scores), masker


GRADIENT_AMOUNTS = (0.2, 0.35, 0.5)  # about 1.5x, 2x and 4x under per-layer pruning (MACs ~ (1 - amount)^2)


def curve_gradient(model: nn.Module, masker: ChannelMask, batches, amounts: Sequence[float] = GRADIENT_AMOUNTS,
                   temperature: float = 0.2) -> torch.Tensor:
    """[C] the gradient of the curve objective with respect to the channel scores at magnitude's
    ranking (standardised within each group), summed over ``batches`` ((x, y) pairs), one amount of
    ``amounts`` per batch in turn: the direction the per-network optimisation (``fit_scores``) takes
    first, as a per-network input a learned criterion can read (negative: the objective wants the
    channel kept)."""
    device = next(model.parameters()).device
    work = batch_stat_copy(model)
    params = {k: v.detach() for k, v in work.named_parameters()}
    scores = masker.standardise(masker.magnitude_scores(model).to(device).clamp_min(1e-12).log())
    scores = scores.detach().requires_grad_(True)
    with torch.enable_grad():
        for i, (x, y) in enumerate(batches):
            loss = curve_loss(work, masker, params, scores, amounts[i % len(amounts)], x.to(device), y.to(device),
                              temperature=temperature, mode="soft")
            loss.backward()
    return scores.grad.detach() if scores.grad is not None else torch.zeros_like(scores)


@torch.no_grad()
def masked_accuracy(model: nn.Module, masker: ChannelMask, scores: torch.Tensor, amount: float, data,
                    split: str = "val", batch_size: int = 256) -> float:
    """Accuracy of ``model`` hard-masked by ``scores`` at ``amount``, BatchNorm statistics
    recomputed on the masked network over the training split's first batches (as after pruning)."""

    work = copy.deepcopy(model)
    masked = masker.apply(dict(work.named_parameters()), masker.mask(scores, amount, mode="hard"))
    for name, p in work.named_parameters():
        p.copy_(masked[name])
    recalibrate_bn(work, (x for x, _ in data.batches("train", batch_size, limit=10)))
    return evaluate(work, data, split, batch_size)[0]
