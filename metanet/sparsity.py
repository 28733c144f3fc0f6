"""Torch-Pruning's GroupNormPruner regulariser as a differentiable, vectorised loss.

``GroupNormPruner.regularize`` adds ``reg * gamma_c * w`` to the gradient of every weight slice
that belongs to channel c of a dependency group (a Conv/Linear's output rows, a following layer's
input columns, a BatchNorm's weight), where, with ``I_c`` the group's L2 importance of channel c
(``GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="max")``, square-rooted),
``gamma_c = alpha ** ((max I - I_c) / (max I - min I))``: the less important a channel, the harder
it is pushed to zero. It loops over groups in Python and writes into ``.grad``.

Here the same term is a loss, ``0.5 * reg * sum_c gamma_c * ||slices of c||^2`` with gamma held
constant, so its gradient is exactly what ``regularize`` adds, it flows through
``functional_call`` parameters into a metanetwork, and one backward pass serves the task loss and
the regulariser together. The groups come from Torch-Pruning's own DependencyGraph, turned once
per architecture into flat index maps; evaluating the loss is a handful of tensor ops per layer.

Grouped convolutions: an input channel's slice is the weights that read it, the rows of its group
in column ``c mod (in / groups)``. (Torch-Pruning 1.6's ``regularize`` raises an IndexError on
grouped, non-depthwise convolutions, so there is no reference to match there; its importance
takes the column over all groups' rows.) Depthwise convolutions are left out of the term, as
``regularize`` and the importance leave them out (their pruning functions are not the plain
convolution's).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

_OUT = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
_IN = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
_BN = (tp.prune_batchnorm_out_channels,)
_LN = (tp.prune_layernorm_out_channels,)  # in the importance, not regularised (as in GroupNormPruner)
# layers whose parameters Torch-Pruning prunes itself; any other parameter is "unwrapped"
_WRAPPED = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
            nn.MultiheadAttention, nn.PReLU, nn.Embedding)


def torch_pruning_options(model: nn.Module) -> dict:
    """Keyword arguments every Torch-Pruning pruner of ``model`` gets: ``round_to`` the attention
    layers' head counts, so that every embedding width stays divisible by them, and the parameters
    used outside a layer (class tokens, position embeddings, layer scales), each pruned along its
    last non-singleton dimension (Torch-Pruning's own guess, given explicitly so it does not warn).
    Not ``num_heads``: with it, Torch-Pruning 1.6 left the embedding width of torchvision's ViT
    unpruned at every ratio (measured); without it a head loses ``1 / heads`` of its width per
    rounding step, and the heads keep their count."""
    import math

    options: dict = {}
    heads = [m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if heads:
        options["round_to"] = math.lcm(*heads)
    unwrapped = []
    for module in model.modules():
        if isinstance(module, _WRAPPED):
            continue
        for p in module.parameters(recurse=False):
            dims = [d for d, n in enumerate(p.shape) if n > 1]
            if dims:
                unwrapped.append((p, dims[-1]))
    if unwrapped:
        options["unwrapped_parameters"] = unwrapped
    return options


class UnprunableNetworkError(ValueError):
    """Torch-Pruning cannot prune this network (its dependency groups do not fit the layers)."""


def classifier_of(model: nn.Module) -> nn.Module:
    """The layer whose outputs are the network's outputs: the last Linear (or Conv) in the model."""
    last = None
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = m
    if last is None:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer")
    return last


class GroupSparsity:
    """The group-sparsity regulariser of one architecture (any module of that architecture).

    ``GroupSparsity(model, example_inputs, reg=10, alpha=16)(params)`` is the loss for the
    parameters ``params`` (a name -> tensor dict, e.g. from ``metanet.graph_to_params``, or
    ``dict(model.named_parameters())``).
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, *, reg: float = 10.0, alpha: float = 16.0,
                 ignored_layers: Sequence[nn.Module] | None = None):
        self.reg, self.alpha = float(reg), float(alpha)
        ignored = list(ignored_layers) if ignored_layers is not None else [classifier_of(model)]
        names = {m: n for n, m in model.named_modules()}
        pruner = tp.pruner.GroupNormPruner(
            model, example_inputs, importance=importance(), ignored_layers=ignored, global_pruning=False,
            **torch_pruning_options(model))
        rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        cols: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        vecs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        norms: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)  # LayerNorm weights
        members, group_of = [], []
        self.col_groups: dict[str, int] = {}  # grouped convolutions' input columns: weight name -> groups
        offset = 0
        for group in pruner._groups:
            size, count = None, 0
            for i, (dep, idxs) in enumerate(group):
                handler, layer = dep.handler, dep.target.module
                if handler not in _OUT + _IN + _BN + _LN or not isinstance(
                        layer, (nn.Conv2d, nn.Conv1d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                    continue
                if (handler in _BN and not layer.affine) or (handler in _LN and not layer.elementwise_affine):
                    continue
                root = torch.as_tensor(list(group[i].root_idxs), dtype=torch.int64)
                idx = torch.as_tensor(list(idxs), dtype=torch.int64)
                size = max(size or 0, int(root.max()) + 1)
                target = rows if handler in _OUT else cols if handler in _IN else vecs if handler in _BN else norms
                if handler in _IN and getattr(layer, "groups", 1) > 1:
                    self.col_groups[f"{names[layer]}.weight"] = layer.groups
                target[f"{names[layer]}.weight"].append((idx, offset + root))
                count += 1
            if count == 0:
                continue
            members.append(count)
            group_of.append(torch.full((size,), len(members) - 1, dtype=torch.int64))
            offset += size
        self.num_channels = offset
        self.num_groups = len(members)
        self.members = torch.tensor(members, dtype=torch.float32)
        self.group_of = torch.cat(group_of) if group_of else torch.zeros(0, dtype=torch.int64)
        merge = lambda d: {k: (torch.cat([i for i, _ in v]), torch.cat([g for _, g in v])) for k, v in d.items()}  # noqa: E731
        self.rows, self.cols, self.vecs, self.norms = merge(rows), merge(cols), merge(vecs), merge(norms)
        state = dict(model.named_parameters())
        for kind, maps, axis in (("output", self.rows, 0), ("input", self.cols, 1), ("channel", self.vecs, 0),
                                 ("channel", self.norms, 0)):
            for name, (idx, _) in maps.items():
                size = state[name].shape[axis] * (self.col_groups.get(name, 1) if kind == "input" else 1)
                if idx.numel() and int(idx.max()) >= size:
                    raise UnprunableNetworkError(
                        f"{type(model).__name__}: Torch-Pruning's dependency groups give {name} {kind} channel "
                        f"{int(idx.max())} of {size} (it mis-maps this network's channel splits or shuffles): "
                        "it cannot be pruned or regularised")

    def slice_norms(self, params: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared L2 norm of every group-member slice, its global channel id)."""
        norms, ids = [], []
        for name, (idx, gid) in self.rows.items():
            w = params[name]
            norms.append(w.reshape(w.shape[0], -1).square().sum(1)[idx])
            ids.append(gid)
        for name, (idx, gid) in self.cols.items():
            w = params[name]
            if name in self.col_groups:  # input channel c: the rows of its group, column c mod (in / groups)
                g = self.col_groups[name]
                per_channel = w.reshape(g, w.shape[0] // g, w.shape[1], -1).square().sum((1, 3)).reshape(-1)
            else:
                per_channel = w.transpose(0, 1).reshape(w.shape[1], -1).square().sum(1)
            norms.append(per_channel[idx])
            ids.append(gid)
        for name, (idx, gid) in self.vecs.items():
            norms.append(params[name].square()[idx])
            ids.append(gid)
        return torch.cat(norms), torch.cat(ids)

    def channel_importance(self, norms: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Every channel's group L2 importance: sqrt of the mean squared norm of its slices over
        the group's members (Torch-Pruning's importance before normalisation)."""
        ids = ids.to(norms.device)
        imp = torch.zeros(self.num_channels, device=norms.device, dtype=norms.dtype).index_add_(0, ids, norms)
        return (imp / self.members.to(norms.device)[self.group_of.to(norms.device)]).sqrt()

    def group_reduce(self, values: torch.Tensor, reduce: str) -> torch.Tensor:
        """Per group, ``reduce`` ('amax', 'amin', 'sum', 'mean') of a per-channel tensor."""
        fill = {"amax": float("-inf"), "amin": float("inf")}.get(reduce, 0.0)
        group_of = self.group_of.to(values.device)
        out = torch.full((self.num_groups,), fill, device=values.device, dtype=values.dtype)
        return out.scatter_reduce(0, group_of, values, reduce=reduce, include_self=reduce in ("amax", "amin"))

    def gamma_of(self, params: Mapping[str, torch.Tensor], norms: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``gamma`` of the channels, with the LayerNorm weights of ``params`` in their importance:
        GroupNormPruner's importance counts them, its ``regularize`` leaves them alone."""
        if not self.norms:
            return self.gamma(norms.detach(), ids)
        extra = [params[name].detach().square()[idx] for name, (idx, _) in self.norms.items()]
        extra_ids = [gid for _, gid in self.norms.values()]
        return self.gamma(torch.cat([norms.detach(), *[e.to(norms.device) for e in extra]]),
                          torch.cat([ids, *extra_ids]))

    def gamma(self, norms: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Per channel: alpha ** ((max I - I) / (max I - min I)) within its group; constant."""
        with torch.no_grad():
            imp = self.channel_importance(norms, ids)
            group_of = self.group_of.to(imp.device)
            hi, lo = self.group_reduce(imp, "amax"), self.group_reduce(imp, "amin")
            span = (hi - lo)[group_of]
            # a group whose channels are all equally important: Torch-Pruning divides 0 by 0; use 1
            scaled = torch.where(span > 0, (hi[group_of] - imp) / span.clamp_min(1e-30), torch.zeros_like(imp))
            return self.alpha ** scaled

    def group_weights(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[num_groups] 1 / each group's total squared norm in ``params`` (constant). Passed to
        ``__call__``, they normalise the term per group: a group's share of the loss is then
        ``sum_c gamma_c n_c / sum_c n0_c`` (n0: the norms of ``params``), the same for a layer of
        large weights as for one of small weights, so ``reg`` means the same on every network."""
        with torch.no_grad():
            norms, ids = self.slice_norms(params)
            per_channel = torch.zeros(self.num_channels, device=norms.device, dtype=norms.dtype)
            per_channel.index_add_(0, ids.to(norms.device), norms)
            return 1.0 / self.group_reduce(per_channel, "sum").clamp_min(1e-12)

    def relative(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The scale-free form: per group ``sum_c gamma_c n_c / sum_c n_c`` (the gamma-weighted mean
        of where the group's squared norm sits), summed over groups, times ``reg / 2``. A uniform
        shrink leaves it unchanged; only moving norm from less to more important channels lowers
        it, so it rewards selectivity and never a shrink that the task loss must resist."""
        norms, ids = self.slice_norms(params)
        gamma = self.gamma_of(params, norms, ids)
        ids = ids.to(norms.device)
        per_channel = torch.zeros(self.num_channels, device=norms.device, dtype=norms.dtype).index_add(0, ids, norms)
        weighted = torch.zeros_like(per_channel).index_add(0, ids, gamma[ids] * norms)
        totals = self.group_reduce(per_channel, "sum").clamp_min(1e-12)
        return 0.5 * self.reg * (self.group_reduce(weighted, "sum") / totals).sum()

    def __call__(self, params: Mapping[str, torch.Tensor], group_weights: torch.Tensor | None = None) -> torch.Tensor:
        norms, ids = self.slice_norms(params)
        gamma = self.gamma_of(params, norms, ids)
        if group_weights is not None:
            gamma = gamma * group_weights.to(gamma.device)[self.group_of.to(gamma.device)]
        return 0.5 * self.reg * (gamma[ids.to(gamma.device)] * norms).sum()


SPARSITY_FORMS = ("none", "group", "relative")


def sparsity_term(sparsity: GroupSparsity, params: Mapping[str, torch.Tensor], form: str,
                  group_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The group-sparsity loss in one of ``SPARSITY_FORMS``: "none" (the paper's, on the weights'
    own scale), "group" (normalised by ``group_weights``, see ``GroupSparsity.group_weights``) or
    "relative" (scale-free, ``GroupSparsity.relative``)."""
    if form not in SPARSITY_FORMS:
        raise ValueError(f"sparsity form must be one of {SPARSITY_FORMS}, not {form!r}")
    if form == "relative":
        return sparsity.relative(params)
    return sparsity(params, group_weights if form == "group" else None)


def importance(normalizer: str | None = "max") -> tp.importance.GroupMagnitudeImportance:
    """The method's channel importance: group L2 norm, mean over the group, normalised within the
    group by ``normalizer`` (the paper: the maximum)."""
    return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=normalizer)

