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
convolutions per group. BatchNorm statistics are recomputed afterwards by the recipe.

``reconstruct`` acts; ``ReconstructReport`` says what it did: layers fitted and skipped (with
why), each fitted layer's relative output error on the calibration batches before and after,
seconds and peak memory of the normal equations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metanet.prune import ChannelMap

TARGETS = ("sequential", "local")
LAYERS = ("pruned", "all")
ROWS_PER_CHUNK = 1 << 15  # unfolded rows accumulated at a time: memory stays bounded on large inputs


@dataclass(frozen=True)
class ReconstructSettings:
    """``batches``: calibration batches the normal equations are summed over; ``ridge``: the
    regularisation, relative to the mean diagonal of ``G`` (0: plain least squares); ``targets``:
    ``sequential`` or ``local`` (the module docstring)."""

    batches: int = 10
    ridge: float = 1e-3
    targets: str = "sequential"
    # "pruned": the layers whose input channels were removed; "all": every Conv/Linear but the first
    # the network calls (sequential targets then also correct what upstream fits left)
    layers: str = "pruned"

    def __post_init__(self):
        if self.layers not in LAYERS:
            raise ValueError(f"reconstruction layers must be one of {', '.join(LAYERS)}, not {self.layers!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"reconstruction targets must be one of {', '.join(TARGETS)}, not {self.targets!r}")
        if not (self.ridge >= 0 and self.batches >= 1):
            raise ValueError(f"reconstruction needs ridge >= 0 and batches >= 1, not {self.ridge} and {self.batches}")


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


class _Stop(Exception):
    """Raised by a hook once the layer being fitted has been seen: the rest of the forward is not needed."""


class _NormalEquations:
    """``G``, ``H`` and ``sum ||y||^2`` of one layer (or one group of a grouped convolution),
    accumulated from (unfolded input, target) row blocks in float64."""

    def __init__(self, inputs: int, outputs: int):
        self.g = torch.zeros(inputs, inputs, dtype=torch.float64)
        self.h = torch.zeros(inputs, outputs, dtype=torch.float64)
        self.yy = 0.0

    def add(self, a: torch.Tensor, y: torch.Tensor) -> None:
        a, y = a.double().cpu(), y.double().cpu()
        self.g += a.T @ a
        self.h += a.T @ y
        self.yy += float((y * y).sum())

    def error(self, w: torch.Tensor) -> float:
        """Relative squared error ``sum ||a w - y||^2 / sum ||y||^2`` of weights ``w`` ([inputs, outputs])."""
        w = w.double()
        sse = float((w * (self.g @ w)).sum() - 2 * (w * self.h).sum()) + self.yy
        return max(sse, 0.0) / max(self.yy, 1e-30)

    def solve(self, ridge: float) -> torch.Tensor:
        n = self.g.shape[0]
        lam = ridge * float(torch.diagonal(self.g).sum()) / max(n, 1)
        g = self.g + lam * torch.eye(n, dtype=torch.float64)
        try:
            return torch.linalg.solve(g, self.h)
        except RuntimeError:  # singular (ridge 0 and fewer independent rows than inputs): the least-norm fit
            return torch.linalg.lstsq(g, self.h, driver="gelsd").solution

    @property
    def megabytes(self) -> float:
        return (self.g.numel() + self.h.numel()) * 8 / 1e6


def _layer_rows(layer: nn.Module, x: torch.Tensor, group: int = 0) -> torch.Tensor:
    """The unfolded input of ``layer`` (group ``group`` of a grouped convolution) as rows
    ``[positions, inputs (+1 for a bias)]``: im2col for a convolution, one row per token for a Linear."""
    if isinstance(layer, nn.Conv2d):
        per = x.shape[1] // layer.groups
        x = x[:, group * per:(group + 1) * per]
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # [N, C*k*k, L]
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    if layer.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)], 1)
    return rows


def _target_rows(layer: nn.Module, y: torch.Tensor, group: int = 0) -> torch.Tensor:
    """The layer's output as rows ``[positions, outputs]`` matching ``_layer_rows``."""
    if isinstance(layer, nn.Conv2d):
        per = y.shape[1] // layer.groups
        y = y[:, group * per:(group + 1) * per]
        return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def _weights(layer: nn.Module, group: int = 0) -> torch.Tensor:
    """The layer's current weights (group ``group``) as ``[inputs (+1), outputs]``, like ``solve``'s."""
    w = layer.weight
    if isinstance(layer, nn.Conv2d):
        per = w.shape[0] // layer.groups
        w = w[group * per:(group + 1) * per]
    w = w.reshape(w.shape[0], -1).T
    if layer.bias is not None:
        b = layer.bias if not isinstance(layer, nn.Conv2d) else layer.bias[group * (layer.bias.numel() // layer.groups):
                                                                            (group + 1) * (layer.bias.numel() // layer.groups)]
        w = torch.cat([w, b.unsqueeze(0)], 0)
    return w.detach()


@torch.no_grad()
def _set_weights(layer: nn.Module, solution: torch.Tensor, group: int = 0) -> None:
    w = layer.weight
    per = w.shape[0] // (layer.groups if isinstance(layer, nn.Conv2d) else 1)
    rows = slice(group * per, (group + 1) * per)
    if layer.bias is not None:
        layer.bias[rows] = solution[-1].to(layer.bias.dtype)
        solution = solution[:-1]
    w[rows] = solution.T.reshape(w[rows].shape).to(w.dtype)


def _call_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The Conv/Linear modules of ``model`` in the order one forward pass calls them."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda m, a, n=name: order.append(n) if n not in order else None)
               for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return order


def _capture(model: nn.Module, name: str, x: torch.Tensor, want: str) -> torch.Tensor:
    """The input (``want`` "input") or output ("output") of module ``name`` when ``model`` reads
    ``x``; the forward stops there."""
    module = dict(model.named_modules())[name]
    seen: list[torch.Tensor] = []

    def pre(m, args):
        if want == "input":
            seen.append(args[0])
            raise _Stop

    def post(m, args, out):
        seen.append(out)
        raise _Stop

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise RuntimeError(f"layer {name} was not called as a module in the forward pass")
    return seen[0]


@torch.no_grad()
def reconstruct(pruned: nn.Module, unpruned: nn.Module, channels: ChannelMap, batches: Iterable[torch.Tensor],
                settings: ReconstructSettings = ReconstructSettings()) -> ReconstructReport:
    """Re-fits, in place, every Conv/Linear of ``pruned`` whose input channels were removed
    (``channels``: the kept channels per layer, from ``metanet.prune``) to ``unpruned``'s outputs on
    the kept output channels, over the first ``settings.batches`` of ``batches`` (inputs only);
    returns what it did. Both networks are put in eval mode (BatchNorm with its running statistics,
    as they will be used)."""
    start = time.perf_counter()
    report = ReconstructReport()
    xs = [x for _, x in zip(range(settings.batches), batches)]
    if not xs:
        raise ValueError("reconstruction needs at least one calibration batch")
    was = pruned.training, unpruned.training
    pruned.eval()
    unpruned.eval()
    device = next(pruned.parameters()).device
    xs = [x.to(device) for x in xs]
    layers = dict(pruned.named_modules())
    order = _call_order(pruned, xs[0][:1])
    for name, layer in layers.items():
        if name in channels and isinstance(layer, (nn.Conv2d, nn.Linear)) and name not in order:
            report.skipped[name] = "not called as a module in the forward pass (its weights are read directly)"
        elif isinstance(layer, nn.MultiheadAttention) and layer.embed_dim != dict(unpruned.named_modules())[name].embed_dim:
            # its projections are read as tensors by F.multi_head_attention_forward: no hook sees them
            report.skipped[name] = (f"attention over pruned channels ({dict(unpruned.named_modules())[name].embed_dim}"
                                    f" -> {layer.embed_dim}): its projections are not re-fitted")
    for position, name in enumerate(order):
        layer = layers[name]
        original = dict(unpruned.named_modules())[name]
        width = (lambda m: (m.out_channels, m.in_channels) if isinstance(m, nn.Conv2d) else
                 (m.out_features, m.in_features))(original)
        out_ids, in_ids = channels.get(name, (tuple(range(width[0])), tuple(range(width[1]))))
        if (len(in_ids) == width[1] and settings.layers == "pruned") or position == 0:
            continue  # its inputs are all there (or are the network's own): nothing to make up for
        groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
        if groups > 1 and settings.targets == "local" and groups != (original.groups if isinstance(original, nn.Conv2d) else 1):
            report.skipped[name] = f"grouped convolution whose groups changed ({original.groups} -> {groups})"
            continue
        fits = _fit_layer(pruned, unpruned, name, layer, list(out_ids), list(in_ids), xs, settings, groups, report)
        for g, (equations, solution) in enumerate(fits):
            _set_weights(layer, solution, g)
        report.fitted.append(name)
    pruned.train(was[0])
    unpruned.train(was[1])
    report.seconds = time.perf_counter() - start
    return report


def _fit_layer(pruned, unpruned, name: str, layer: nn.Module, out_ids: Sequence[int], in_ids: Sequence[int],
               xs: list[torch.Tensor], settings: ReconstructSettings, groups: int,
               report: ReconstructReport) -> list[tuple[_NormalEquations, torch.Tensor]]:
    """The normal equations of one layer (one set per group) over the calibration batches, solved;
    records the layer's relative output error before and after."""
    equations: list[_NormalEquations] = []
    for x in xs:
        y = _capture(unpruned, name, x, "output")
        y = y[:, out_ids] if isinstance(layer, nn.Conv2d) else y[..., out_ids]
        if settings.targets == "sequential":
            inp = _capture(pruned, name, x, "input")
        else:
            full = _capture(unpruned, name, x, "input")
            inp = full[:, in_ids] if isinstance(layer, nn.Conv2d) else full[..., in_ids]
        for g in range(groups):
            a, t = _layer_rows(layer, inp, g), _target_rows(layer, y, g)
            if len(equations) <= g:
                equations.append(_NormalEquations(a.shape[1], t.shape[1]))
            for lo in range(0, a.shape[0], ROWS_PER_CHUNK):
                equations[g].add(a[lo:lo + ROWS_PER_CHUNK], t[lo:lo + ROWS_PER_CHUNK])
            chunk_mb = min(a.shape[0], ROWS_PER_CHUNK) * (a.shape[1] + t.shape[1]) * 8 / 1e6
            report.peak_mb = max(report.peak_mb, equations[g].megabytes + chunk_mb)
    fits = []
    before = after = total = 0.0
    for g, eq in enumerate(equations):
        solution = eq.solve(settings.ridge)
        before += eq.error(_weights(layer, g)) * eq.yy
        after += eq.error(solution) * eq.yy
        total += eq.yy
        fits.append((eq, solution))
    report.error_before[name] = before / max(total, 1e-30)
    report.error_after[name] = after / max(total, 1e-30)
    return fits
