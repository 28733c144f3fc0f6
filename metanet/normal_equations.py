"""Normal equations of a layer's least-squares fit, accumulated from its unfolded inputs: what the
reconstruction after pruning solves (``metanet.reconstruct``). For a Conv/Linear with inputs unfolded to rows ``A`` (im2col for a
convolution, one row per token for a Linear) and targets ``Y``: ``G = A^T A``, ``H = A^T Y``,
summed batch by batch in float64, so memory is bounded by one batch's rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROWS_PER_CHUNK = 1 << 15  # unfolded rows accumulated at a time: memory stays bounded on large inputs


class NormalEquations:
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
        w = w.double().cpu()  # the layer's own weights may sit on a GPU; the equations are on the CPU
        sse = float((w * (self.g @ w)).sum() - 2 * (w * self.h).sum()) + self.yy
        return max(sse, 0.0) / max(self.yy, 1e-30)

    def damping(self, ridge: float) -> float:
        """The ridge term ``lambda``: ``ridge`` times G's mean diagonal (the bias or intercept column
        is penalised too: at ridge 1e-3 of the mean diagonal, negligible)."""
        return ridge * float(torch.diagonal(self.g).sum()) / max(self.g.shape[0], 1)

    def solve(self, ridge: float) -> torch.Tensor:
        n = self.g.shape[0]
        g = self.g + self.damping(ridge) * torch.eye(n, dtype=torch.float64)
        try:
            return torch.linalg.solve(g, self.h)
        except RuntimeError:  # singular (ridge 0 and fewer independent rows than inputs): the least-norm fit
            return torch.linalg.lstsq(g, self.h, driver="gelsd").solution

    @property
    def megabytes(self) -> float:
        return (self.g.numel() + self.h.numel()) * 8 / 1e6


def layer_rows(layer: nn.Module, x: torch.Tensor, group: int = 0, batch: int = 0, positions: int = 0,
               offset: bool = False) -> torch.Tensor:
    """The unfolded input of ``layer`` (group ``group`` of a grouped convolution) as rows
    ``[positions, inputs + 1]`` where the layer has a bias or ``offset`` asks for an intercept,
    ``[positions, inputs]`` otherwise: im2col for a convolution (at the ``positions`` output positions ``sampled_positions`` draws
    for calibration batch ``batch``; 0: all), one row per token for a Linear."""
    if isinstance(layer, nn.Conv2d):
        per = x.shape[1] // layer.groups
        x = x[:, group * per:(group + 1) * per]
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # [N, C*k*k, L]
        at = sampled_positions(batch, cols.shape[2], positions, cols.device)
        cols = cols if at is None else cols[:, :, at]
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    if layer.bias is not None or offset:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)], 1)
    return rows


def sampled_positions(batch: int, size: int, positions: int, device) -> torch.Tensor | None:
    """``positions`` output positions sampled in calibration batch ``batch`` of a map of ``size``
    positions (None: all): the same in every run, and for every layer whose maps have that size."""
    if not positions or size <= positions:
        return None
    return torch.randperm(size, generator=torch.Generator().manual_seed(batch))[:positions].to(device)
