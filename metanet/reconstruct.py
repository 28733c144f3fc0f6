"""Least-squares reconstruction after pruning: every Conv/Linear whose input channels were removed
is re-fitted so that its outputs on the kept output channels match the unpruned network's, on
calibration inputs (no labels). Channel pruning by least squares (He et al. 2017), ThiNet (2017),
Neuron Merging (2020), OBSPA and OSSCAR (2024) repair a cut this way; Torch-Pruning does not.

For one layer with kept output channels ``O`` and (pruned) input ``x'`` the fit is ridge
regression on its unfolded inputs (im2col for a convolution, tokens for a Linear):

    W* = argmin_W  sum_batches || unfold(x') W - y_O ||^2  +  lambda ||W||^2,
    lambda = ridge * trace(G) / dim(G),  G = sum unfold(x')^T unfold(x')

accumulated batch by batch as normal equations (``G`` and ``H = sum unfold(x')^T y_O``, float64),
so memory is bounded by one batch's unfolded input, never the whole calibration set. The target
``y_O`` is the unpruned layer's output on the kept channels; the input ``x'`` is the pruned
network's own, already re-fitted up to this layer (``sequential``: each layer corrects what the
ones before it left), or the unpruned network's input to the layer on the kept channels
(``local``). Layers are fitted in the order the network calls them; grouped and depthwise
convolutions per group. With sequential targets a residual block's last convolution is fitted to
the block's output (its BatchNorm output plus the shortcut) minus the pruned shortcut: it makes up
for the shortcut branch's loss too. BatchNorm statistics are kept (the fit restores the outputs
they describe); ``recalibrate`` recomputes them instead.

``reconstruct`` acts; ``ReconstructReport`` says what it did: layers fitted and skipped (with
why), each fitted layer's relative output error on the calibration batches before and after,
seconds and peak memory of the normal equations.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from metanet.forward_taps import ResidualBlock, call_order, capture, norms_fed, residual_blocks
from metanet.normal_equations import ROWS_PER_CHUNK, NormalEquations, layer_rows, sampled_positions
from metanet.prune import ChannelMap

TARGETS = ("sequential", "local")
LAYERS = ("pruned", "all")


@dataclass(frozen=True)
class ReconstructSettings:
    """``batches``: calibration batches the normal equations are summed over; ``ridge``: the
    regularisation, relative to the mean diagonal of ``G`` (0: plain least squares); ``targets``:
    ``sequential`` or ``local`` (the module docstring)."""

    batches: int = 10
    # output positions of a convolution sampled per batch (the same for every image in it; 0: all):
    # a layer has few weights per output channel, and sampled rows fit them as well at a fraction
    # of the cost (channel pruning and ThiNet sample 10 positions per image)
    positions: int = 64
    ridge: float = 1e-3
    targets: str = "sequential"
    # "pruned": the layers whose input channels were removed; "all": every Conv/Linear but the first
    # the network calls (sequential targets then also correct what upstream fits left)
    layers: str = "pruned"
    # sequential targets: a residual block's last convolution fitted to the block's output (its BN
    # output plus the shortcut) minus the pruned network's shortcut, not to its own output, so that
    # it also makes up for what the shortcut's branch lost (``RESIDUAL_BLOCKS``)
    block_targets: bool = True
    # recompute BatchNorm statistics after the fit? None: by level. Channel pruning keeps them: the
    # fit matches the unpruned outputs whose statistics BatchNorm holds, and recomputing them undoes
    # what a block target compensates (bench/reconstruct_settings.py, digits validation split: a
    # ResNet-20 at 4x 84.7% kept, 76.9% recomputed). Weight-level pruning recomputes them: a global
    # mask can leave a layer that no fit restores (Wanda at 80% zeros: 12.3% kept, 76.9% recomputed)
    recalibrate: bool | None = None
    # fit an intercept too where a layer has no bias but feeds a BatchNorm (the intercept is folded
    # into its running mean): the channels removed carried a mean (after a ReLU, a positive one) that
    # no combination of the kept ones need reproduce. Off by default: on the 5 validation members of
    # the CIFAR-10 zoo it gained nothing (without it +0.1 [-0.4, +0.5] at 2x, +0.5 [-0.7, +1.7] at
    # 3x; docs/benchmarks.md), though it helped small digits networks at 4x. Where the statistics
    # are recomputed after the fit (weight level), the folded offset is recomputed away with them
    intercept: bool = False

    @classmethod
    def parse(cls, text: str) -> "ReconstructSettings":
        """Settings from ``key=value,...`` over the fields ("default" or "": none changed; booleans
        as 0/1), as the bench scripts take them; a ValueError names the item that is wrong."""
        changes = {}
        for item in ([] if text in ("", "default") else text.split(",")):
            key, _, value = item.partition("=")
            if key not in cls.__dataclass_fields__ or not value:
                raise ValueError(f"{item!r} is not key=value with a key of {', '.join(cls.__dataclass_fields__)}")
            default = getattr(cls, key)
            boolean = isinstance(default, bool) or default is None  # recalibrate: None, or a boolean
            try:
                if boolean and value not in ("0", "1"):
                    raise ValueError
                changes[key] = value == "1" if boolean else type(default)(value)
            except ValueError:
                kind = "0 or 1" if boolean else {int: "an integer", float: "a number"}.get(type(default), "valid")
                raise ValueError(f"{item!r}: {value!r} is not {kind}") from None
        return cls(**changes)

    def recalibrates(self, channels: bool) -> bool:
        """Are BatchNorm statistics recomputed after the fit (channel pruning, or weight-level)?"""
        return self.recalibrate if self.recalibrate is not None else not channels

    def __post_init__(self):
        if self.layers not in LAYERS:
            raise ValueError(f"reconstruction layers must be one of {', '.join(LAYERS)}, not {self.layers!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"reconstruction targets must be one of {', '.join(TARGETS)}, not {self.targets!r}")
        if not (self.ridge >= 0 and self.batches >= 1 and self.positions >= 0):
            raise ValueError(f"reconstruction needs ridge >= 0, batches >= 1 and positions >= 0, not {self.ridge}, "
                             f"{self.batches} and {self.positions}")


@dataclass
class ReconstructReport:
    fitted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it was left as pruned
    error_before: dict[str, float] = field(default_factory=dict)  # relative output error, pruned weights
    error_after: dict[str, float] = field(default_factory=dict)  # relative output error, re-fitted
    seconds: float = 0.0
    peak_mb: float = 0.0  # the largest normal equations plus one chunk of unfolded input, in MB

    def summary(self) -> dict:
        """What a row records: layers fitted, mean relative errors before and after, seconds, MB."""
        mean = lambda d: sum(d.values()) / len(d) if d else float("nan")  # noqa: E731
        return {"reconstructed_layers": len(self.fitted), "reconstruct_error_before": mean(self.error_before),
                "reconstruct_error_after": mean(self.error_after), "reconstruct_seconds": self.seconds,
                "reconstruct_peak_mb": self.peak_mb}


def _picked(layer: nn.Module, y: torch.Tensor, keep: Sequence[int], batch: int,
            settings: ReconstructSettings) -> torch.Tensor:
    """A layer's output (or anything of its shape) on channels ``keep``, at the positions of
    ``sampled_positions``: ``[N, C, positions]`` for a convolution, ``[..., C]`` for a Linear."""
    if not isinstance(layer, nn.Conv2d):
        return y[..., keep]
    y = y[:, keep].flatten(2)
    at = sampled_positions(batch, y.shape[2], settings.positions, y.device)
    return y if at is None else y[:, :, at]


def _target_rows(layer: nn.Module, y: torch.Tensor, group: int = 0) -> torch.Tensor:
    """A ``_picked`` output as rows ``[positions, outputs]`` matching ``layer_rows``."""
    if isinstance(layer, nn.Conv2d):
        per = y.shape[1] // layer.groups
        y = y[:, group * per:(group + 1) * per]
        return y.transpose(1, 2).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def _weights(layer: nn.Module, group: int = 0, offset: bool = False) -> torch.Tensor:
    """The layer's current weights (group ``group``) as ``[inputs (+1), outputs]``, like ``solve``'s
    (``offset``: a zero intercept row for a layer without a bias)."""
    w = layer.weight
    if isinstance(layer, nn.Conv2d):
        per = w.shape[0] // layer.groups
        w = w[group * per:(group + 1) * per]
    w = w.reshape(w.shape[0], -1).T
    if layer.bias is not None:
        b = layer.bias if not isinstance(layer, nn.Conv2d) else layer.bias[group * (layer.bias.numel() // layer.groups):
                                                                            (group + 1) * (layer.bias.numel() // layer.groups)]
        w = torch.cat([w, b.unsqueeze(0)], 0)
    elif offset:
        w = torch.cat([w, torch.zeros(1, w.shape[1], dtype=w.dtype, device=w.device)], 0)
    return w.detach()


@torch.no_grad()
def _set_weights(layer: nn.Module, solution: torch.Tensor, group: int = 0, norm: nn.Module | None = None) -> None:
    """Writes ``solution`` into the layer (group ``group``); an intercept row of a layer without a
    bias goes into the BatchNorm ``norm`` it feeds: ``BN(y + c)`` with running mean ``m`` is
    ``BN(y)`` with running mean ``m - c``."""
    w = layer.weight
    per = w.shape[0] // (layer.groups if isinstance(layer, nn.Conv2d) else 1)
    rows = slice(group * per, (group + 1) * per)
    if layer.bias is not None:
        layer.bias[rows] = solution[-1].to(layer.bias.dtype)
        solution = solution[:-1]
    elif norm is not None:
        _fold_intercept(norm, rows, solution[-1])
        solution = solution[:-1]
    w[rows] = solution.T.reshape(w[rows].shape).to(w.dtype)


@torch.no_grad()
def _fold_intercept(norm: nn.Module, rows: slice, intercept: torch.Tensor) -> None:
    """``BN(y + c)`` with running mean ``m`` is ``BN(y)`` with running mean ``m - c``: the fitted
    intercept ``c`` of channels ``rows`` goes into the BatchNorm the layer feeds."""
    norm.running_mean[rows] -= intercept.to(norm.running_mean)


@torch.no_grad()
def reconstruct(pruned: nn.Module, unpruned: nn.Module, channels: ChannelMap, batches: Iterable[torch.Tensor],
                settings: ReconstructSettings = ReconstructSettings()) -> ReconstructReport:
    """Re-fits, in place, every Conv/Linear of ``pruned`` whose input channels were removed
    (``channels``: the kept channels per layer, from ``metanet.prune``) to ``unpruned``'s outputs on
    the kept output channels, over the first ``settings.batches`` of ``batches`` (inputs only);
    returns what it did. Both networks are put in eval mode (BatchNorm with its running statistics,
    as they will be used)."""
    with _fitting(pruned, unpruned, batches, settings) as (xs, report):
        _reconstruct(pruned, unpruned, channels, xs, settings, report)
    return report


@contextlib.contextmanager
def _fitting(model: nn.Module, reference: nn.Module, batches: Iterable[torch.Tensor], settings: ReconstructSettings):
    """Both networks in eval mode (BatchNorm with the running statistics they will be used with)
    for the fit, the first ``settings.batches`` calibration batches on the model's device, and the
    report, timed; the modes are restored afterwards."""
    start = time.perf_counter()
    report = ReconstructReport()
    xs = [x for _, x in zip(range(settings.batches), batches)]
    if not xs:
        raise ValueError("reconstruction needs at least one calibration batch")
    was = model.training, reference.training
    model.eval()
    reference.eval()
    device = next(model.parameters()).device
    try:
        yield [x.to(device) for x in xs], report
    finally:
        model.train(was[0])
        reference.train(was[1])
        report.seconds = time.perf_counter() - start


def _reconstruct(pruned: nn.Module, unpruned: nn.Module, channels: ChannelMap, xs: list[torch.Tensor],
                 settings: ReconstructSettings, report: ReconstructReport) -> None:
    layers = dict(pruned.named_modules())
    order = call_order(pruned, xs[0][:1])
    blocks = residual_blocks(pruned) if settings.block_targets and settings.targets == "sequential" else {}
    for conv, block in blocks.items():  # a block's shortcut is fitted before the convolution that reads it
        if block.shortcut is not None and conv in order:
            inside = [n for n in order if n.startswith(block.shortcut + ".")]
            order = [n for n in order if n not in inside]
            order[order.index(conv):order.index(conv)] = inside
    for name, layer in layers.items():
        if name in channels and isinstance(layer, (nn.Conv2d, nn.Linear)) and name not in order:
            report.skipped[name] = "not called as a module in the forward pass (its weights are read directly)"
        elif isinstance(layer, nn.MultiheadAttention) and layer.embed_dim != dict(unpruned.named_modules())[name].embed_dim:
            # its projections are read as tensors by F.multi_head_attention_forward: no hook sees them
            report.skipped[name] = (f"attention over pruned channels ({dict(unpruned.named_modules())[name].embed_dim}"
                                    f" -> {layer.embed_dim}): its projections are not re-fitted")
    norms = norms_fed(pruned, xs[0][:1]) if settings.intercept else {}
    todo: dict[str, tuple[list[int], list[int]]] = {}
    for position, name in enumerate(order):
        original = dict(unpruned.named_modules())[name]
        width = (lambda m: (m.out_channels, m.in_channels) if isinstance(m, nn.Conv2d) else
                 (m.out_features, m.in_features))(original)
        out_ids, in_ids = channels.get(name, (tuple(range(width[0])), tuple(range(width[1]))))
        if (len(in_ids) == width[1] and settings.layers == "pruned") or position == 0:
            continue  # its inputs are all there (or are the network's own): nothing to make up for
        todo[name] = (list(out_ids), list(in_ids))
    # sequential targets: the unpruned network's side of every fit, from one pass per batch
    cached = (_unpruned_targets(unpruned, {n: (layers[n], o) for n, (o, _) in todo.items()}, blocks, xs, settings)
              if settings.targets == "sequential" else None)
    for name, (out_ids, in_ids) in todo.items():
        layer = layers[name]
        groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
        fits = _fit_layer(pruned, unpruned, name, layer, out_ids, in_ids, xs, settings, groups, report,
                          blocks.get(name), cached, name in norms)
        for g, (equations, solution) in enumerate(fits):
            _set_weights(layer, solution, g, norms.get(name))
        report.fitted.append(name)


def _shortcut(block: ResidualBlock) -> tuple[str, str]:
    """Where a block's shortcut is read: its module's output, or the block's input (identity)."""
    return (block.shortcut, "output") if block.shortcut else (block.block, "input")


def _unpruned_targets(unpruned: nn.Module, fits: dict[str, tuple], blocks: dict[str, ResidualBlock], xs: list[torch.Tensor],
                      settings: ReconstructSettings) -> list[dict]:
    """Per calibration batch, from one forward pass of the unpruned network: each layer of ``fits``
    (name -> (layer, kept output channels)) its ``_picked`` output, and for a block's last
    convolution also the block's sum (BatchNorm output + shortcut) there. Small: positions are
    sampled, so the targets of every layer fit in memory and the unpruned network runs once."""
    modules = dict(unpruned.named_modules())
    cached = []
    for b, x in enumerate(xs):
        found: dict = {}
        handles = []

        def keep(key, layer, out_ids, value):
            found[key] = _picked(layer, value, out_ids, b, settings)

        for name, (layer, out_ids) in fits.items():
            handles.append(modules[name].register_forward_hook(
                lambda m, a, out, k=name, l=layer, o=out_ids: keep(k, l, o, out)))
            block = blocks.get(name)
            if block is not None:
                handles.append(modules[block.bn].register_forward_hook(
                    lambda m, a, out, k=(name, "bn"), l=layer, o=out_ids: keep(k, l, o, out)))
                where, want = _shortcut(block)
                hook = (lambda m, a, out, k=(name, "shortcut"), l=layer, o=out_ids: keep(k, l, o, out)) \
                    if want == "output" else (lambda m, a, k=(name, "shortcut"), l=layer, o=out_ids: keep(k, l, o, a[0]))
                handles.append(modules[where].register_forward_hook(hook) if want == "output"
                               else modules[where].register_forward_pre_hook(hook))
        try:
            unpruned(x)
        finally:
            for h in handles:
                h.remove()
        for name in fits:
            if name in blocks:
                found[(name, "summed")] = found.pop((name, "bn")) + found.pop((name, "shortcut"))
        cached.append(found)
    return cached


def _block_target(bn: nn.Module, summed: torch.Tensor, shortcut: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """The output a block's last convolution should have so that the pruned block's sum, its
    BatchNorm ``bn``'s output (eval mode) plus the pruned network's ``shortcut``, equals the unpruned
    block's ``summed`` on the kept channels: ``mean + std / gamma * (summed - shortcut - beta)``. A
    channel whose gamma is 0 (its convolution cannot change the sum) keeps its own target ``own``."""
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    std = (bn.running_var + bn.eps).sqrt()
    view = (1, -1, 1)  # [N, C, positions]
    want = bn.running_mean.view(view) + (std / gamma).view(view) * (summed - shortcut - beta.view(view))
    return torch.where((gamma.abs() > 1e-8).view(view), want, own)


def _fit_layer(pruned, unpruned, name: str, layer: nn.Module, out_ids: Sequence[int], in_ids: Sequence[int],
               xs: list[torch.Tensor], settings: ReconstructSettings, groups: int, report: ReconstructReport,
               block: ResidualBlock | None = None, cached: list[dict] | None = None,
               offset: bool = False) -> list[tuple[NormalEquations, torch.Tensor]]:
    """The normal equations of one layer (one set per group) over the calibration batches, solved;
    records the layer's relative output error before and after. ``block``: the layer is a residual
    block's last convolution (``ReconstructSettings.block_targets``); ``cached``: the unpruned
    network's targets (``_unpruned_targets``; sequential targets), else they are computed here;
    ``offset``: an intercept is fitted too (the layer has no bias; ``norms_fed``)."""
    equations: list[NormalEquations] = []
    for b, x in enumerate(xs):
        if cached is not None:  # sequential: the pruned network's own input (and shortcut)
            got = capture(pruned, [(name, "input"), *([_shortcut(block)] if block is not None else [])], x)
            inp, y = got[0], cached[b][name]
            if block is not None:
                shortcut = _picked(layer, got[1], slice(None), b, settings)
                y = _block_target(dict(pruned.named_modules())[block.bn], cached[b][(name, "summed")], shortcut, y)
        else:  # local: the unpruned network's input on the kept channels
            y, full = capture(unpruned, [(name, "output"), (name, "input")], x)
            y = _picked(layer, y, out_ids, b, settings)
            inp = full[:, in_ids] if isinstance(layer, nn.Conv2d) else full[..., in_ids]
        for g in range(groups):
            a, t = layer_rows(layer, inp, g, b, settings.positions, offset), _target_rows(layer, y, g)
            if len(equations) <= g:
                equations.append(NormalEquations(a.shape[1], t.shape[1]))
            for lo in range(0, a.shape[0], ROWS_PER_CHUNK):
                equations[g].add(a[lo:lo + ROWS_PER_CHUNK], t[lo:lo + ROWS_PER_CHUNK])
            chunk_mb = min(a.shape[0], ROWS_PER_CHUNK) * (a.shape[1] + t.shape[1]) * 8 / 1e6
            report.peak_mb = max(report.peak_mb, equations[g].megabytes + chunk_mb)
    fits = []
    before = after = total = 0.0
    for g, eq in enumerate(equations):
        solution = eq.solve(settings.ridge)
        before += eq.error(_weights(layer, g, offset)) * eq.yy
        after += eq.error(solution) * eq.yy
        total += eq.yy
        fits.append((eq, solution))
    report.error_before[name] = before / max(total, 1e-30)
    report.error_after[name] = after / max(total, 1e-30)
    return fits


@torch.no_grad()
def reconstruct_masked(sparse: nn.Module, dense: nn.Module, layer_names: Sequence[str], batches: Iterable[torch.Tensor],
                       settings: ReconstructSettings = ReconstructSettings()) -> ReconstructReport:
    """Weight-level pruning's reconstruction (the row-wise masked least squares of SparseGPT-style
    pruning): each masked layer of ``sparse`` (``layer_names``, in the order the network calls them;
    torch's pruning masks, ``weight_orig`` * ``weight_mask``) is re-fitted to ``dense``'s outputs on
    its inputs in ``sparse`` (sequential), every output row over its unmasked weights only, so the
    mask and the zeros stay where they are; a bias (or an intercept folded into the BatchNorm the
    layer feeds, ``ReconstructSettings.intercept``) is fitted too. Grouped convolutions are skipped
    (named in the report)."""
    with _fitting(sparse, dense, batches, settings) as (xs, report):
        _reconstruct_masked(sparse, dense, layer_names, xs, settings, report)
    return report


def _reconstruct_masked(sparse: nn.Module, dense: nn.Module, layer_names: Sequence[str], xs: list[torch.Tensor],
                        settings: ReconstructSettings, report: ReconstructReport) -> None:
    layers = dict(sparse.named_modules())
    order = [n for n in call_order(sparse, xs[0][:1]) if n in set(layer_names)]
    norms = norms_fed(sparse, xs[0][:1]) if settings.intercept else {}
    for name in order:
        layer = layers[name]
        offset = name in norms
        mask = getattr(layer, "weight_mask", None)
        if mask is None:
            report.skipped[name] = "no pruning mask (not pruned at weight level)"
            continue
        if isinstance(layer, nn.Conv2d) and layer.groups > 1:
            report.skipped[name] = f"grouped convolution ({layer.groups} groups): not re-fitted at weight level"
            continue
        equations = None
        for b, x in enumerate(xs):
            (y,) = capture(dense, [(name, "output")], x)
            (inp,) = capture(sparse, [(name, "input")], x)
            y = _picked(layer, y, slice(None), b, settings)
            a, t = layer_rows(layer, inp, 0, b, settings.positions, offset), _target_rows(layer, y, 0)
            equations = equations or NormalEquations(a.shape[1], t.shape[1])
            for lo in range(0, a.shape[0], ROWS_PER_CHUNK):
                equations.add(a[lo:lo + ROWS_PER_CHUNK], t[lo:lo + ROWS_PER_CHUNK])
            report.peak_mb = max(report.peak_mb, equations.megabytes
                                 + min(a.shape[0], ROWS_PER_CHUNK) * (a.shape[1] + t.shape[1]) * 8 / 1e6)
        keep = mask.reshape(mask.shape[0], -1).bool().T.cpu()  # [inputs, outputs]
        if layer.bias is not None or offset:
            keep = torch.cat([keep, torch.ones(1, keep.shape[1], dtype=torch.bool)], 0)
        current = _weights(layer, 0, offset)
        solution = torch.zeros_like(equations.h)
        lam = equations.damping(settings.ridge)
        for j in range(keep.shape[1]):  # one output row at a time, over its unmasked inputs
            free = keep[:, j].nonzero().squeeze(1)
            g = equations.g[free][:, free] + lam * torch.eye(len(free), dtype=torch.float64)
            solution[free, j] = torch.linalg.lstsq(g, equations.h[free, j:j + 1], driver="gelsd").solution[:, 0]
        report.error_before[name] = equations.error(current)
        report.error_after[name] = equations.error(solution)
        original = layer.weight_orig
        if layer.bias is not None:
            layer.bias.copy_(solution[-1].to(layer.bias.dtype))
            solution = solution[:-1]
        elif offset:
            _fold_intercept(norms[name], slice(None), solution[-1])
            solution = solution[:-1]
        original.copy_(solution.T.reshape(original.shape).to(original.dtype))
        report.fitted.append(name)
