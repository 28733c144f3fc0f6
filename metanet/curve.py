"""The curve objective: the task loss of a network masked as pruning to an amount would leave it.

Per-layer pruning to a speed-up removes the same fraction ``amount`` of every dependency group's
channels, so what decides the accuracy right after pruning is which channels each group keeps.
Given one score per channel of every group Torch-Pruning couples (a residual stage's channels
are one group across its layers), ``ChannelMask.mask`` keeps each group's top-scored
``floor(n_g * (1 - amount))`` channels (Torch-Pruning's count) with a differentiable mask, and
``curve_loss`` is the cross-entropy of the masked network with BatchNorm on batch statistics, i.e.
statistics recomputed for the masked network, as ``recalibrate_bn`` leaves a pruned one; optionally
plus distillation to the unmasked network. There is no sparsity weight: nothing is rewarded for
shrinking, only for keeping the channels the task needs.

Masks, per group g with scores standardised within the group (z) and threshold tau_g halfway
between its keep-th and (keep+1)-th largest z:

- ``soft``: m = sigmoid((z - tau_g) / temperature);
- ``hard``: the straight-through mask: forward 1[z > tau_g] (exactly the channels the pruner
  keeps), backward the soft mask's gradient.

A mask m_c multiplies every parameter that carries channel c's output: the output rows (and bias)
of each Conv/Linear in the group, and the weight and bias of its BatchNorm/LayerNorm, so a masked
channel reads 0 downstream wherever it is summed (residual additions). LayerNorm statistics still
include a masked channel (pruning would drop it), an approximation for transformers.

``fit_scores`` is the per-network optimisation (the ``curve`` method): free scores initialised at
the channels' log magnitude importance, standardised within each group (so step 0 keeps what
magnitude pruning keeps, and ``lr`` is in units of a group's spread), ``steps`` Adam steps of the
curve objective, one training batch and one amount drawn uniformly from ``amounts`` per step.
Measured (``bench/curve_objective.py``, docs/benchmarks.md): the soft mask at temperature 0.2 trains
the scores best; the straight-through hard mask barely moves them off magnitude's ranking.
"""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metanet.sparsity import GroupSparsity
from metanet.prune import recalibrate_bn
from metanet.train import evaluate

MASKS = ("soft", "hard")


class ChannelMask:
    """The prunable channels of one architecture (Torch-Pruning's dependency groups, classifier
    outputs excluded) and how a per-channel mask enters its parameters."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor):
        groups = GroupSparsity(copy.deepcopy(model), example_inputs, reg=0.0)
        self.groups = groups
        self.num_channels = groups.num_channels
        params = dict(model.named_parameters())
        # per parameter: a gather index into [mask, 1] giving each of its output rows' factor
        self.factors: dict[str, torch.Tensor] = {}
        for maps in (groups.rows, groups.vecs, groups.norms):
            for name, (idx, gid) in maps.items():
                for pname in (name, name.removesuffix(".weight") + ".bias"):
                    if pname not in params:
                        continue
                    index = torch.full((params[pname].shape[0],), self.num_channels, dtype=torch.int64)
                    index[idx] = gid
                    self.factors[pname] = index
        # groups as rows of a padded [G, largest group] matrix of channel ids (-1: padding)
        group_of = groups.group_of
        sizes = torch.bincount(group_of, minlength=groups.num_groups)
        self.sizes = sizes
        order = torch.argsort(group_of, stable=True)
        starts = torch.cumsum(sizes, 0) - sizes
        col = torch.arange(group_of.numel()) - starts[group_of[order]]
        self.padded = torch.full((groups.num_groups, int(sizes.max()) if sizes.numel() else 0), -1, dtype=torch.int64)
        self.padded[group_of[order], col] = order
        self.group_of = group_of

    def keep_counts(self, amount: float) -> torch.Tensor:
        """[G] channels each group keeps after removing ``amount`` of them (at least one)."""
        return (self.sizes.double() * (1.0 - float(amount))).floor().long().clamp_min(1)

    def standardise(self, scores: torch.Tensor) -> torch.Tensor:
        """[C] ``scores`` centred and scaled to unit spread within each group."""
        dev = scores.device
        group_of = self.group_of.to(dev)
        sizes = self.sizes.to(dev).to(scores.dtype)
        mean = torch.zeros(len(sizes), device=dev, dtype=scores.dtype).index_add(0, group_of, scores) / sizes
        var = torch.zeros_like(mean).index_add(0, group_of, (scores - mean[group_of]) ** 2) / sizes
        return (scores - mean[group_of]) / (var.sqrt()[group_of] + 1e-8)

    def mask(self, scores: torch.Tensor, amount: float, temperature: float = 0.5, mode: str = "hard") -> torch.Tensor:
        """[C] mask keeping each group's top ``1 - amount`` channels by ``scores`` ([C])."""
        if mode not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, not {mode!r}")
        dev = scores.device
        group_of, padded = self.group_of.to(dev), self.padded.to(dev)
        z = self.standardise(scores)
        table = torch.where(padded >= 0, z.detach()[padded.clamp_min(0)], torch.full_like(padded, -1e9, dtype=z.dtype))
        ranked = table.sort(dim=1, descending=True).values
        keep = self.keep_counts(amount).to(dev)
        rows = torch.arange(len(keep), device=dev)
        kth = ranked[rows, keep - 1]
        nxt = torch.where(keep < self.sizes.to(dev), ranked[rows, keep.clamp_max(ranked.shape[1] - 1)], kth - 2.0)
        tau = (kth + nxt) / 2
        soft = torch.sigmoid((z - tau[group_of]) / temperature)
        if mode == "soft":
            return soft
        hard = (z.detach() > tau[group_of]).to(z.dtype)
        return hard + soft - soft.detach()

    def apply(self, params: Mapping[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``params`` with every channel's output parameters multiplied by its mask value."""
        padded = torch.cat([mask, mask.new_ones(1)])
        out = dict(params)
        for name, index in self.factors.items():
            w = params[name]
            f = padded[index.to(mask.device)]
            out[name] = w * f.view(-1, *([1] * (w.dim() - 1)))
        return out

    def magnitude_scores(self, model: nn.Module) -> torch.Tensor:
        """[C] each channel's group L2 importance in ``model`` (what magnitude pruning ranks by)."""
        with torch.no_grad():
            params = {k: v.detach() for k, v in model.named_parameters()}
            norms, ids = self.groups.slice_norms(params)
            return self.groups.channel_importance(norms, ids)

    def module_scores(self, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """``scores`` ([C]) as ``{Conv/Linear layer name: [its output channels]}``, the table a
        ``metanet.criteria.ChannelScores`` criterion reads."""
        table = {}
        for name, (idx, gid) in self.groups.rows.items():
            layer = name.removesuffix(".weight")
            full = torch.zeros(int(self.factors[name].numel()))
            full[idx] = scores.detach().float().cpu()[gid]
            table[layer] = full
        return table


def _masked_forward(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.func.functional_call(model, dict(params), (x,))


def curve_loss(model: nn.Module, masker: ChannelMask, params: Mapping[str, torch.Tensor], scores: torch.Tensor,
               amount: float, x: torch.Tensor, y: torch.Tensor, *, temperature: float = 0.5, mode: str = "hard",
               distill: float = 0.0, teacher: torch.Tensor | None = None) -> torch.Tensor:
    """The curve objective on one batch: cross-entropy of ``model`` with ``params`` masked by
    ``scores`` at ``amount``, BatchNorm on the batch's statistics (``model`` must have its norm
    layers in train mode and be a copy whose running statistics may change), plus ``distill``
    times the KL divergence to ``teacher`` (the unmasked network's logits) when given."""
    masked = masker.apply(params, masker.mask(scores, amount, temperature, mode))
    logits = _masked_forward(model, masked, x)
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
               lr: float = 0.2, temperature: float = 0.2, mode: str = "soft", distill: float = 0.0,
               augment: bool = False, masker: ChannelMask | None = None,
               start: torch.Tensor | None = None) -> tuple[torch.Tensor, ChannelMask]:
    """Per-channel scores optimised on ``model`` itself with the curve objective: ``steps`` Adam
    steps, each on one shuffled training batch of ``data`` (a ``TaskData``) and an amount drawn
    uniformly from [min(amounts), max(amounts)], starting from ``start`` ([C]; default: the
    channels' log magnitude importance), standardised within each group. Returns (scores [C], the
    mask's channel map)."""
    device = next(model.parameters()).device
    masker = masker or ChannelMask(model, torch.zeros(data.input_shape, device=device))
    work = batch_stat_copy(model)
    params = {k: v.detach() for k, v in work.named_parameters()}
    # in units of each group's spread, so that lr means the same in every layer and network
    if start is None:
        start = masker.magnitude_scores(model).to(device).clamp_min(1e-12).log()
    elif start.shape != (masker.num_channels,):
        raise ValueError(f"fit_scores: start has shape {tuple(start.shape)}, the network has {masker.num_channels} "
                         "prunable channels")
    scores = masker.standardise(start.detach().to(device).float()).clone().requires_grad_(True)
    opt = torch.optim.Adam([scores], lr=lr)
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
    return scores.detach(), masker


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
