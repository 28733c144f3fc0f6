"""Message passing in plain PyTorch over the dense blocks of a network's graph (backend ``torch``).

The edges of one Conv/Linear layer are a complete bipartite block: output channel ``r`` receives
from every input channel ``c``, stored output-major (``metanet.graph.rules``), so the block's edge
states ``e[start : start + R*C]`` are a free view ``[R, C, h]``. Consecutive blocks of one shape
(a ResNet stage's convolutions) are one stacked view ``[B, R, C, h]``. Then, with
``S [B, C]`` / ``D [B, R]`` the blocks' source / destination nodes:

- forward aggregation (into output channels): ``z[b, r, c] = a[S[b, c]] * e[b, r, c]``, reduced
  (sum, sum of squares, max, min) over ``c``: a reduction over a dense axis;
- reversed aggregation (into input channels): ``a[D[b, r]] * e[b, r, c]`` reduced over ``r``;
- edge product ``c[src] * d[dst]``: ``d[D][:, :, None] * c[S][:, None, :]`` by broadcasting.

Only node states are gathered (``a[S]``: ``B*C`` rows, not one per edge), and the per-block
statistics of a node that receives from several blocks (a residual block's output channel: its
convolution and an identity edge) are combined with node-level ``index_add`` / ``scatter_reduce``.
Edges outside any dense block (identity shortcuts, which are one edge per channel) are handled
edge by edge, which for them is node-sized work.

The statistics equal ``PyGMessagePassing``'s (tests/test_dense_passing.py: outputs and gradients
to 1e-5 on ResNets, VGG, a flattened Linear and a pruned uneven network).
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DenseGroup:
    """``B`` consecutive blocks of one shape: edges ``[start, start + B*R*C)`` in order
    (block, output row, input column); ``S [B, C]`` source nodes, ``D [B, R]`` destination nodes."""

    start: int
    B: int
    R: int
    C: int
    S: torch.Tensor
    D: torch.Tensor

    @property
    def stop(self) -> int:
        return self.start + self.B * self.R * self.C


@dataclass(frozen=True)
class SparseRun:
    """Edges ``[start, stop)`` outside any dense block, with their own ``src`` / ``dst``."""

    start: int
    stop: int
    src: torch.Tensor
    dst: torch.Tensor


def find_blocks(src: torch.Tensor, dst: torch.Tensor, bounds: list[tuple[int, int]]) -> list[DenseGroup | SparseRun]:
    """Splits the edges (in their stored order, within each ``bounds`` range: one per edge type)
    into dense groups and sparse runs. A row is a maximal run of edges with one destination; a
    block is consecutive rows of equal length over the same sources; a group is consecutive blocks
    of one shape. Rows of one edge join a sparse run."""
    s, d = src.cpu().numpy(), dst.cpu().numpy()
    parts: list = []
    for lo, hi in bounds:
        if hi <= lo:
            continue
        # rows: maximal runs of one destination
        change = np.flatnonzero(d[lo + 1:hi] != d[lo:hi - 1]) + lo + 1
        starts = np.concatenate([[lo], change])
        lengths = np.diff(np.concatenate([starts, [hi]]))
        i = 0
        while i < len(starts):
            p, c = int(starts[i]), int(lengths[i])
            if c == 1:  # single-edge rows: a sparse run
                j = i
                while j + 1 < len(starts) and lengths[j + 1] == 1:
                    j += 1
                q = int(starts[j]) + 1
                parts.append(("sparse", p, q))
                i = j + 1
                continue
            sources = s[p:p + c]
            j = i
            while (j + 1 < len(starts) and lengths[j + 1] == c
                   and np.array_equal(s[starts[j + 1]:starts[j + 1] + c], sources)):
                j += 1
            parts.append(("dense", p, j - i + 1, c))
            i = j + 1
    out: list[DenseGroup | SparseRun] = []
    for part in parts:
        if part[0] == "sparse":
            _, p, q = part
            if out and isinstance(out[-1], SparseRun) and out[-1].stop == p:
                prev = out.pop()
                p = prev.start
            out.append(SparseRun(p, q, src[p:q], dst[p:q]))
            continue
        _, p, rows, c = part
        block_s = src[p:p + c]
        block_d = dst[p:p + rows * c:c]
        last = out[-1] if out else None
        if isinstance(last, DenseGroup) and last.stop == p and (last.R, last.C) == (rows, c):
            out[-1] = DenseGroup(last.start, last.B + 1, rows, c, torch.cat([last.S, block_s[None]]),
                                 torch.cat([last.D, block_d[None]]))
        else:
            out.append(DenseGroup(p, 1, rows, c, block_s[None].clone(), block_d[None].clone()))
    return out


class BlockStatistics(torch.autograd.Function):
    """Sum, sum of squares, max and min over ``axis`` of ``z = a * block``, with a hand-written
    backward that keeps nothing edge-sized alive between the passes.

    ``a``: ``[B, C, h]`` (``axis`` 2: reduce over the columns, ``a`` broadcast over the rows) or
    ``[B, R, h]`` (``axis`` 1: the other way round); ``block``: ``[B, R, C, h]``; each statistic ``[B, R, h]`` / ``[B, C, h]``. Autograd's
    own backward saves ``z`` and ``z**2`` and builds the gradient of ``z`` from four edge-sized
    pieces (a broadcast, a product and two scatters into zeros); here ``z`` is recomputed and

        dz = ds + 2 z dq  (one ``addcmul``), plus dmax / dmin added at the arg-max / arg-min,
        da = sum over the broadcast axis of dz * block,   d block = dz * a

    (the arg-max gets the whole gradient, as ``torch.max(dim)``'s backward gives it)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, block: torch.Tensor, axis: int):
        z = a.unsqueeze(3 - axis) * block  # a is broadcast over the axis it is not reduced over
        ctx.axis = axis
        if not any(ctx.needs_input_grad[:2]):  # no backward: amax/amin, 6x faster than max(dim) with indices
            return z.sum(axis), z.square().sum(axis), z.amax(axis), z.amin(axis)
        mx, arg_max = z.max(axis)
        mn, arg_min = z.min(axis)
        ctx.save_for_backward(a, block, arg_max, arg_min)
        return z.sum(axis), z.square().sum(axis), mx, mn

    @staticmethod
    def backward(ctx, d_sum, d_squares, d_max, d_min):
        a, block, arg_max, arg_min = ctx.saved_tensors
        axis = ctx.axis
        a_b = a.unsqueeze(3 - axis)
        z = a_b * block
        grads = [g if g is not None else torch.zeros_like(a) for g in (d_sum, d_squares, d_max, d_min)]
        dz = torch.addcmul(grads[0].unsqueeze(axis).expand_as(z), z, 2 * grads[1].unsqueeze(axis))
        dz.scatter_add_(axis, arg_max.unsqueeze(axis), grads[2].unsqueeze(axis))
        dz.scatter_add_(axis, arg_min.unsqueeze(axis), grads[3].unsqueeze(axis))
        d_a = (dz * block).sum(3 - axis) if ctx.needs_input_grad[0] else None
        d_block = dz.mul_(a_b) if ctx.needs_input_grad[1] else None
        return d_a, d_block, None


class DenseMessagePassing:
    """One direction of message passing over ``find_blocks``' groups (``reverse``: dst -> src).
    ``fused``: the metanetwork layer calls ``layer`` (both directions in one compiled function)
    instead of ``aggregate`` and ``edge_product`` per direction."""

    def __init__(self, parts: list[DenseGroup | SparseRun], num_nodes: int, num_edges: int, reverse: bool,
                 device: torch.device):
        self.parts, self.num_nodes, self.num_edges, self.reverse = parts, num_nodes, num_edges, reverse
        self.fused = fused_enabled() and not reverse
        # the node indices every statistic row goes to, in the order ``_partials`` produces them
        targets, degree = [], torch.zeros(num_nodes, dtype=torch.float32)
        for part in parts:
            if isinstance(part, DenseGroup):
                targets.append((part.S if reverse else part.D).reshape(-1))
                counts = part.R if reverse else part.C
            else:
                targets.append(part.src if reverse else part.dst)
                counts = 1
            degree.index_add_(0, targets[-1].cpu(), torch.full((targets[-1].numel(),), float(counts)))
        # one split of the edge states per call: a slice per part would give each part's backward
        # a full-size zero gradient to add into (measured: a third of the backward pass)
        self.sizes = [part.stop - part.start for part in parts]
        self.target = torch.cat(targets).to(device) if targets else torch.zeros(0, dtype=torch.long, device=device)
        self.degree = degree.clamp(min=1).unsqueeze(1).to(device)
        self.has_incoming = (degree > 0).unsqueeze(1).to(device)

    def _partials(self, a: torch.Tensor, e: torch.Tensor):
        """Per group: sum, sum of squares, max and min of the messages into each target row."""
        sums, squares, maxima, minima = [], [], [], []
        h = e.shape[1]
        for part, chunk in zip(self.parts, e.split(self.sizes)):
            if isinstance(part, DenseGroup):
                block = chunk.view(part.B, part.R, part.C, h)
                # into input channels: reduce over the output rows; into output channels: over the inputs
                axis = 1 if self.reverse else 2
                stats = BlockStatistics.apply(a[part.D if self.reverse else part.S], block, axis)
                for acc, stat in zip((sums, squares, maxima, minima), stats):
                    acc.append(stat.reshape(-1, h))
            else:
                z = a[part.dst if self.reverse else part.src] * chunk
                sums.append(z)
                squares.append(z.square())
                maxima.append(z)
                minima.append(z)
        return sums, squares, maxima, minima

    def aggregate(self, a: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(mean, mean of squares, max, min) over incoming edges of ``a[src] * e``; 0 without edges."""
        return self._combine(self._partials(a, e), self.target, self.degree, self.has_incoming)

    def layer(self, e: torch.Tensor, a_fwd: torch.Tensor, a_rev: torch.Tensor, c_fwd: torch.Tensor,
              d_fwd: torch.Tensor, c_rev: torch.Tensor, d_rev: torch.Tensor, normalize: bool):
        """One metanetwork layer's edge work in both directions (``block_layer`` per part):
        (forward statistics, reversed statistics, new edge states). ``a_rev`` carries the sign
        flip; statistics are (mean, mean of squares, max, min) per node, as ``aggregate``'s."""
        if self.reverse:
            raise ValueError("call layer() on the forward passing")
        fused = kernel()
        h = e.shape[1]
        fwd, rev, new_e = ([], [], [], []), ([], [], [], []), []
        rev_target = []
        for part, chunk in zip(self.parts, e.split(self.sizes)):
            if isinstance(part, DenseGroup):
                sf, sr, ne = fused(chunk.view(part.B, part.R, part.C, h), a_fwd[part.S], a_rev[part.D],
                                   c_fwd[part.S], d_fwd[part.D], c_rev[part.D], d_rev[part.S], normalize)
                rev_target.append(part.S.reshape(-1))
            else:
                sf, sr, ne = sparse_layer(chunk, a_fwd[part.src], a_rev[part.dst], c_fwd[part.src], d_fwd[part.dst],
                                          c_rev[part.dst], d_rev[part.src], normalize)
                rev_target.append(part.src)
            for acc, stat in zip(fwd, sf):
                acc.append(stat.reshape(-1, h))
            for acc, stat in zip(rev, sr):
                acc.append(stat.reshape(-1, h))
            new_e.append(ne.reshape(-1, h))
        return (self._combine(fwd, self.target, self.degree, self.has_incoming),
                self._combine(rev, self.rev_target, self.rev_degree, self.rev_has_incoming), torch.cat(new_e))

    def _combine(self, stats, target, degree, has_incoming):
        """Per-node (mean, mean of squares, max, min) from per-part rows going to ``target``."""
        sums, squares, maxima, minima = (torch.cat(rows) for rows in stats)
        n, h = self.num_nodes, sums.shape[1]
        index = target.unsqueeze(1).expand(-1, h)
        mean = sums.new_zeros(n, h).index_add(0, target, sums) / degree
        mean_sq = sums.new_zeros(n, h).index_add(0, target, squares) / degree
        mx = sums.new_full((n, h), float("-inf")).scatter_reduce(0, index, maxima, "amax", include_self=False)
        mn = sums.new_full((n, h), float("inf")).scatter_reduce(0, index, minima, "amin", include_self=False)
        return mean, mean_sq, torch.where(has_incoming, mx, 0.0), torch.where(has_incoming, mn, 0.0)

    def update_edges(self, e, en, c_f, d_f, c_r, d_r) -> torch.Tensor:
        """Both directions' edge updates of a layer, ``e + (c_f[src] d_f[dst] + c_r[dst] d_r[src]) en``
        (``EdgeUpdate``: the factor is recomputed in the backward pass, not stored)."""
        if self.reverse:
            raise ValueError("call update_edges() on the forward passing")
        return EdgeUpdate.apply(e, en, c_f, d_f, c_r, d_r, self)

    def edge_product(self, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``c[src] * d[dst]`` per edge, in the stored edge order: [E, h]."""
        if self.reverse:  # the reversed graph's sources are the stored destinations
            c, d = d, c
        out = []
        h = c.shape[1]
        for part in self.parts:
            if isinstance(part, DenseGroup):
                out.append((d[part.D].unsqueeze(2) * c[part.S].unsqueeze(1)).reshape(-1, h))
            else:
                out.append(c[part.src] * d[part.dst])
        return torch.cat(out) if out else c.new_zeros(0, h)


class EdgeUpdate(torch.autograd.Function):
    """``e + (c_f[src] * d_f[dst] + c_r[dst] * d_r[src]) * en`` over the dense blocks of ``passing``
    (a forward ``DenseMessagePassing``), with a backward that recomputes the edge factor from the
    four node tensors instead of keeping it: one edge-sized tensor less per metanetwork layer.

    Backward, with ``g`` the output's gradient and ``ge = g * en``: ``de = g``,
    ``d en = g * factor``, and per dense group ``[B, R, C]`` the node gradients are reductions of
    ``ge`` over the other axis: ``dc_f[S] += sum_r ge d_f[D]``, ``dd_f[D] += sum_c ge c_f[S]``,
    ``dc_r[D] += sum_c ge d_r[S]``, ``dd_r[S] += sum_r ge c_r[D]``."""

    @staticmethod
    def forward(ctx, e, en, c_f, d_f, c_r, d_r, passing):
        ctx.passing = passing
        ctx.save_for_backward(en, c_f, d_f, c_r, d_r)
        return torch.addcmul(e, EdgeUpdate.factor(passing, c_f, d_f, c_r, d_r), en)

    @staticmethod
    def factor(passing, c_f, d_f, c_r, d_r) -> torch.Tensor:
        h, out = c_f.shape[1], []
        for part in passing.parts:
            if isinstance(part, DenseGroup):
                f = d_f[part.D].unsqueeze(2) * c_f[part.S].unsqueeze(1)
                out.append(f.addcmul_(c_r[part.D].unsqueeze(2), d_r[part.S].unsqueeze(1)).reshape(-1, h))
            else:
                out.append(c_f[part.src] * d_f[part.dst] + c_r[part.dst] * d_r[part.src])
        return torch.cat(out) if out else c_f.new_zeros(0, h)

    @staticmethod
    def backward(ctx, g):
        en, c_f, d_f, c_r, d_r = ctx.saved_tensors
        passing = ctx.passing
        d_en = g * EdgeUpdate.factor(passing, c_f, d_f, c_r, d_r) if ctx.needs_input_grad[1] else None
        ge = g * en
        grads = [torch.zeros_like(t) for t in (c_f, d_f, c_r, d_r)]
        h = g.shape[1]
        for part, chunk in zip(passing.parts, ge.split(passing.sizes)):
            if isinstance(part, DenseGroup):
                block = chunk.view(part.B, part.R, part.C, h)
                S, D = part.S.reshape(-1), part.D.reshape(-1)
                grads[0].index_add_(0, S, (block * d_f[part.D].unsqueeze(2)).sum(1).reshape(-1, h))
                grads[1].index_add_(0, D, (block * c_f[part.S].unsqueeze(1)).sum(2).reshape(-1, h))
                grads[2].index_add_(0, D, (block * d_r[part.S].unsqueeze(1)).sum(2).reshape(-1, h))
                grads[3].index_add_(0, S, (block * c_r[part.D].unsqueeze(2)).sum(1).reshape(-1, h))
            else:
                grads[0].index_add_(0, part.src, chunk * d_f[part.dst])
                grads[1].index_add_(0, part.dst, chunk * c_f[part.src])
                grads[2].index_add_(0, part.dst, chunk * d_r[part.src])
                grads[3].index_add_(0, part.src, chunk * c_r[part.dst])
        return (g, d_en, *[gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[2:6])], None)


# Groups smaller than this many edges are passed edge by edge, with their neighbours: every part
# costs a dozen small kernel launches per layer and direction, which on a small network's graph
# (the digits zoo: a median 2,900 edges in 10-20 groups) outweighs what the dense layout saves
# (docs/performance.md: the threshold measured on the digits zoo and ResNet-56).
DENSE_MIN_EDGES_ENV = "METAPRUNE_DENSE_MIN_EDGES"
DENSE_MIN_EDGES = 4096


def dense_min_edges() -> int:
    return int(os.environ.get(DENSE_MIN_EDGES_ENV, DENSE_MIN_EDGES))


def merge_small_groups(parts: list[DenseGroup | SparseRun], src: torch.Tensor, dst: torch.Tensor,
                       min_edges: int) -> list[DenseGroup | SparseRun]:
    """``parts`` with every dense group of fewer than ``min_edges`` edges turned into a sparse
    run, and consecutive sparse runs joined into one (the edges stay in their stored order)."""
    out: list[DenseGroup | SparseRun] = []
    for part in parts:
        if isinstance(part, DenseGroup) and part.stop - part.start >= min_edges:
            out.append(part)
            continue
        start = part.start
        if out and isinstance(out[-1], SparseRun) and out[-1].stop == start:
            start = out.pop().start
        out.append(SparseRun(start, part.stop, src[start:part.stop], dst[start:part.stop]))
    return out


def build_dense(graph, device: torch.device) -> tuple[DenseMessagePassing, DenseMessagePassing]:
    """The forward and reversed passing over ``graph``'s edges, split into dense blocks (those of
    at least ``dense_min_edges()`` edges; the rest edge by edge)."""
    bounds = list(graph.edge_offsets().values())
    parts = merge_small_groups(find_blocks(graph.src, graph.dst, bounds), graph.src, graph.dst, dense_min_edges())
    covered = sum((p.stop - p.start) for p in parts)
    if covered != graph.num_edges:
        raise AssertionError(f"dense blocks cover {covered} of {graph.num_edges} edges")
    parts = [_to(p, device) for p in parts]
    fwd = DenseMessagePassing(parts, graph.num_nodes, graph.num_edges, False, device)
    rev = DenseMessagePassing(parts, graph.num_nodes, graph.num_edges, True, device)
    fwd.rev_target, fwd.rev_degree, fwd.rev_has_incoming = rev.target, rev.degree, rev.has_incoming
    return fwd, rev


def _to(part, device):
    if isinstance(part, DenseGroup):
        return DenseGroup(part.start, part.B, part.R, part.C, part.S.to(device), part.D.to(device))
    return SparseRun(part.start, part.stop, part.src.to(device), part.dst.to(device))


# ------------------------------------------------------------------ one layer's edge work, fused
def block_layer(e: torch.Tensor, a_src: torch.Tensor, a_dst: torch.Tensor, c_src: torch.Tensor,
                d_dst: torch.Tensor, c_dst: torch.Tensor, d_src: torch.Tensor, normalize: bool):
    """All edge work of one metanetwork layer on one stacked group, both directions.

    ``e [B, R, C, h]``: edge states; ``a_src [B, C, h]``: forward messages of the sources;
    ``a_dst [B, R, h]``: reversed messages of the destinations (the sign flip already applied);
    ``c_src, d_dst`` / ``c_dst, d_src``: the forward / reversed edge-update factors. With
    ``en = LayerNorm(e)`` (``normalize``) or ``e``:

        z_f = a_src[:, None] * en  -> sum, sum of squares, max, min over C: [B, R, h] each
        z_r = a_dst[:, :, None] * en -> the same over R: [B, C, h] each
        e'  = e + en * (c_src[:, None] * d_dst[:, :, None] + c_dst[:, :, None] * d_src[:, None])

    (the reversed edge update ``sign * (c_r[dst] d_r[src] (sign * en))`` is ``c_r[dst] d_r[src] en``:
    sign * sign = 1). Compiled, this reads ``e`` once and writes ``e'`` once; eager PyTorch makes
    a dozen edge-sized temporaries."""
    en = F.layer_norm(e, e.shape[-1:]) if normalize else e
    zf = a_src.unsqueeze(1) * en
    zr = a_dst.unsqueeze(2) * en
    update = c_src.unsqueeze(1) * d_dst.unsqueeze(2) + c_dst.unsqueeze(2) * d_src.unsqueeze(1)
    return ((zf.sum(2), zf.square().sum(2), zf.amax(2), zf.amin(2)),
            (zr.sum(1), zr.square().sum(1), zr.amax(1), zr.amin(1)), e + en * update)


def sparse_layer(e: torch.Tensor, a_src: torch.Tensor, a_dst: torch.Tensor, c_src: torch.Tensor,
                 d_dst: torch.Tensor, c_dst: torch.Tensor, d_src: torch.Tensor, normalize: bool):
    """``block_layer`` for edges outside dense blocks (one row each: ``[M, h]`` everywhere)."""
    en = F.layer_norm(e, e.shape[-1:]) if normalize else e
    zf, zr = a_src * en, a_dst * en
    zf2, zr2 = zf.square(), zr.square()
    return (zf, zf2, zf, zf), (zr, zr2, zr, zr), e + en * (c_src * d_dst + c_dst * d_src)


# "1": run each layer's edge work as one compiled function (``block_layer``). Off by default: on
# the 2-core CPU it was slower than the eager path (1.35 s against 1.07 s forward+backward on
# ResNet-56, 8 x 64, static or dynamic shapes) and its first call compiles for 22-27 s (docs/performance.md).
COMPILE_ENV = "METAPRUNE_COMPILE"
_KERNEL = {}


def fused_enabled() -> bool:
    return os.environ.get(COMPILE_ENV, "0") == "1"


def compiler_available() -> bool:
    """torch.compile's CPU code needs a C++ compiler; on CUDA it needs Triton (shipped with torch)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


DYNAMIC_ENV = "METAPRUNE_DYNAMIC"  # "0": compile once per group shape instead (measured no faster either)


def kernel():
    """``block_layer``, compiled with dynamic shapes (one compilation serves every group shape;
    ``METAPRUNE_DYNAMIC=0``: one per shape); the eager function when no C++ compiler is there
    (with a warning)."""
    if "fn" not in _KERNEL:
        use = compiler_available()
        if not use:
            warnings.warn("metanet: no C++ compiler found for torch.compile: the fused layer runs eagerly; "
                          f"install g++, or unset {COMPILE_ENV}")
        dynamic = os.environ.get(DYNAMIC_ENV, "1") == "1"
        _KERNEL["fn"] = torch.compile(block_layer, dynamic=dynamic, fullgraph=True) if use else block_layer
    return _KERNEL["fn"]
