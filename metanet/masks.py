"""How scores become a mask, at both levels: the part of the curve objective that depends on what
a pruning removes (``metanet.curve`` holds the rest: the loss, the per-network fit).

One interface, two classes:

- ``ChannelMask``: one score per channel of every group Torch-Pruning couples (a residual stage's
  channels are one group across its layers). Per-layer pruning to a speed-up removes the same
  fraction ``amount`` of every group, so the mask keeps each group's top-scored
  ``floor(n_g * (1 - amount))`` channels (Torch-Pruning's count). Scores are standardised within
  the group (z) and tau_g sits halfway between its keep-th and (keep+1)-th largest z:

  - ``soft``: m = sigmoid((z - tau_g) / temperature);
  - ``hard``: the straight-through mask: forward 1[z > tau_g] (exactly the channels the pruner
    keeps), backward the soft mask's gradient.

  A mask m_c multiplies every parameter that carries channel c's output: the output rows (and
  bias) of each Conv/Linear in the group, and the weight and bias of its BatchNorm/LayerNorm, so a
  masked channel reads 0 downstream wherever it is summed (residual additions). LayerNorm
  statistics still include a masked channel (pruning would drop it), an approximation for
  transformers.

- ``WeightMask``: one score per weight of the pruned layers (``metanet.weight_pruning.prunable_layers``);
  the soft mask keeps the top ``1 - s`` fraction of them over all layers together (global ranking):

      mask_i = sigmoid((score_i - tau_s) / temperature),   tau_s = the s-quantile of the scores

Both start from magnitude's ranking (``initial``: log importance, standardised per group for
channels; log|w| for weights, so ``temperature`` is in units of a factor e in magnitude), and turn
fitted scores into the pruner's criterion (``criterion``: a ``metanet.criteria.GivenScores``).
"""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn

from metanet.criteria import GivenScores
from metanet.levels import Level
from metanet.sparsity import GroupSparsity
from metanet.weight_pruning import prunable_layers

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

    level = Level.CHANNELS
    lr = 0.2  # the fit's step, in units of a group's spread

    def initial(self, model: nn.Module, start: torch.Tensor | None = None) -> torch.Tensor:
        """[C] the scores a fit starts from, a leaf that requires grad: ``start`` (default: the
        channels' log magnitude importance, magnitude's ranking) standardised within each group,
        so that lr means the same in every layer and network."""
        device = next(model.parameters()).device
        if start is None:
            start = self.magnitude_scores(model).to(device).clamp_min(1e-12).log()
        elif start.shape != (self.num_channels,):
            raise ValueError(f"fit_scores: start has shape {tuple(start.shape)}, the network has {self.num_channels} "
                             "prunable channels")
        return self.standardise(start.detach().to(device).float()).clone().requires_grad_(True)

    @staticmethod
    def leaves(scores: torch.Tensor) -> list[torch.Tensor]:
        return [scores]

    @staticmethod
    def detach(scores: torch.Tensor) -> torch.Tensor:
        return scores.detach()

    def masked(self, params: Mapping[str, torch.Tensor], scores: torch.Tensor, amount: float,
               temperature: float = 0.5, mode: str = "hard") -> dict[str, torch.Tensor]:
        """``params`` with each channel's outputs multiplied by its mask at ``amount``."""
        return self.apply(params, self.mask(scores, amount, temperature, mode))

    def criterion(self, scores: torch.Tensor, name: str = "scores") -> GivenScores:
        """The pruner's criterion ranking channels by ``scores`` ([C])."""
        return GivenScores(self.module_scores(scores), name=name)

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

    def kept_mask(self, scores: torch.Tensor, keep: torch.Tensor, temperature: float = 0.2,
                  mode: str = "soft") -> torch.Tensor:
        """[C] the soft mask keeping a fraction ``keep[g]`` ([G], each group's own, in group order) of
        every group's top-scored channels, differentiable in ``keep`` as well as in ``scores``.

        Keeping k of a group's n channels puts its threshold at the fractional position k - 0.5 of
        its z-scores in descending order (``mask``'s: halfway between the k-th and (k+1)-th),
        interpolated linearly between neighbours; below the weakest channel sits a sentinel 2
        below it (as ``mask`` puts it), so a group kept whole masks nothing. Positions are held
        in [0.5, n - 0.5]: at least one channel, at most all. ``mode`` as ``mask``'s (``hard``: the
        channels above the threshold in the forward pass, the soft mask's gradient)."""
        if mode not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, not {mode!r}")
        dev = scores.device
        group_of, padded, sizes = self.group_of.to(dev), self.padded.to(dev), self.sizes.to(dev)
        z = self.standardise(scores)
        table = torch.where(padded >= 0, z.detach()[padded.clamp_min(0)], torch.full_like(padded, -1e9, dtype=z.dtype))
        ranked = torch.cat([table.sort(dim=1, descending=True).values, table.new_zeros(len(sizes), 1)], dim=1)
        rows = torch.arange(len(sizes), device=dev)
        ranked[rows, sizes] = ranked[rows, sizes - 1] - 2.0  # the sentinel after each group's weakest
        n = sizes.to(keep.dtype)
        position = torch.minimum(torch.maximum(keep * n - 0.5, torch.full_like(n, 0.5).minimum(n - 0.5)), n - 0.5)
        low = position.detach().floor().long().clamp(max=ranked.shape[1] - 2)
        first, second = ranked[rows, low], ranked[rows, low + 1]
        tau = first + (position - low.to(position.dtype)) * (second - first)
        soft = torch.sigmoid((z - tau.to(z.dtype)[group_of]) / temperature)
        if mode == "soft":
            return soft
        hard = (z.detach() > tau.detach().to(z.dtype)[group_of]).to(z.dtype)
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
        ``metanet.criteria.GivenScores`` criterion reads."""
        table = {}
        for name, (idx, gid) in self.groups.rows.items():
            layer = name.removesuffix(".weight")
            full = torch.zeros(int(self.factors[name].numel()))
            full[idx] = scores.detach().float().cpu()[gid]
            table[layer] = full
        return table


class WeightMask:
    """The weights of ``model``'s pruned layers (``names``: their parameter names) and the soft
    mask that keeps a global top fraction of them."""

    level = Level.WEIGHTS
    lr = 0.1  # the fit's step, in units of log|w|
    amounts = (0.5, 0.95)  # the sparsities a per-network fit draws from (the benchmark's 0.5 ... 0.95)

    def __init__(self, model: nn.Module, dense_ends: bool = True):
        self.names = weight_names(model, dense_ends)

    def initial(self, model: nn.Module, start: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """{weight name: log|w|} (or ``start``'s scores), leaves that require grad."""
        if start is None:
            start = magnitude_base({k: v.detach() for k, v in model.named_parameters()}, self.names)
        return {n: start[n].detach().clone().requires_grad_(True) for n in self.names}

    @staticmethod
    def leaves(scores: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        return list(scores.values())

    @staticmethod
    def detach(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: s.detach() for n, s in scores.items()}

    def masked(self, params: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor], amount: float,
               temperature: float = 0.2, mode: str = "soft") -> dict[str, torch.Tensor]:
        """``params`` with each scored weight multiplied by its soft mask at sparsity ``amount`` (the
        threshold detached: the gradient moves scores across it, not it)."""
        if mode != "soft":
            raise ValueError(f"the weight-level mask is soft only, not {mode!r}")
        flat = torch.cat([s.flatten() for s in scores.values()])
        k = min(max(int(amount * flat.numel()), 1), flat.numel())
        tau = flat.detach().kthvalue(k).values
        out = dict(params)
        for name, s in scores.items():
            out[name] = params[name] * torch.sigmoid((s - tau) / temperature)
        return out

    def criterion(self, scores: Mapping[str, torch.Tensor], name: str = "learned") -> GivenScores:
        """The pruner's weight criterion ranking by ``scores`` ({weight name: scores like it})."""
        return GivenScores({n.removesuffix(".weight"): s.detach() for n, s in scores.items()}, Level.WEIGHTS, name)


def weight_names(model: nn.Module, dense_ends: bool = True) -> list[str]:
    """The parameter names of the weights a weight-level pruning of ``model`` masks."""
    return [f"{n}.weight" for n in prunable_layers(model, dense_ends)]


def magnitude_base(params: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """log |w| of each of ``names``: the scores of global magnitude pruning, as a starting point."""
    return {n: params[n].detach().abs().clamp_min(1e-12).log() for n in names}
