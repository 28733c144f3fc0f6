"""The metanetwork's sparse message-passing backends, DGL (fused kernels) and PyG, beside the
default plain-PyTorch one (``metanet.dense_passing``).

The metanetwork's message on edge j -> i is ``m_ij = f(x_i) * g(x_j) * e_ij`` and it aggregates
mean, std, max and min over each node's incoming edges. Since ``f(x_i)`` is the same for every
edge into node i, the backends aggregate only ``z_ij = g(x_j) * e_ij`` and the caller applies
``f(x_i)`` afterwards (``scale_by_destination``): mean(f z) = f mean(z), std(f z) = |f| std(z),
and max/min swap where f < 0. The result is the same messages, and DGL computes each statistic
with one fused sparse kernel that never stores a per-edge message tensor.

A backend also gives the per-edge product ``c(x_src) * d(x_dst)`` of the edge update.
"""

from __future__ import annotations

from typing import Protocol

import torch

from metanet.graph import NetworkGraph
from metanet.dense_passing import build_dense

STD_EPS = 1e-5
BACKENDS = ("torch", "dgl", "pyg")


class MessagePassing(Protocol):
    def aggregate(self, a: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(mean, mean of squares, max, min) over incoming edges of ``a[src] * e``; 0 without edges."""

    def edge_product(self, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``c[src] * d[dst]`` per edge."""


class PyGMessagePassing:
    """Reference implementation: gather per edge, then ``torch_geometric.utils.scatter``."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, num_nodes: int):
        self.src, self.dst, self.num_nodes = src, dst, num_nodes

    def aggregate(self, a, e):
        from torch_geometric.utils import scatter

        z = a[self.src] * e
        out = [scatter(v, self.dst, 0, self.num_nodes, reduce=r)
               for v, r in ((z, "mean"), (z * z, "mean"), (z, "max"), (z, "min"))]
        return tuple(out)

    def edge_product(self, c, d):
        return c[self.src] * d[self.dst]


class DGLMessagePassing:
    """DGL's fused generalized SpMM (aggregation) and SDDMM (edge product) kernels."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, num_nodes: int):
        from metanet.dgl_compat import dgl  # registers the GraphBolt stub before any `import dgl`

        self.g = dgl.graph((src, dst), num_nodes=num_nodes)
        # DGL's fused max/min leave -inf/+inf at nodes without incoming edges; PyG (and we) use 0
        self.has_incoming = (self.g.in_degrees() > 0).unsqueeze(-1)

    def aggregate(self, a, e):
        from dgl import ops

        g = self.g
        mean = ops.u_mul_e_mean(g, a, e)
        mean_sq = ops.u_mul_e_mean(g, a * a, e * e)
        mx = torch.where(self.has_incoming, ops.u_mul_e_max(g, a, e), 0.0)
        mn = torch.where(self.has_incoming, ops.u_mul_e_min(g, a, e), 0.0)
        return mean, mean_sq, mx, mn

    def edge_product(self, c, d):
        from dgl import ops

        return ops.u_mul_v(self.g, c, d)


def build(graph: NetworkGraph, backend: str) -> tuple[MessagePassing, MessagePassing]:
    """The forward (src -> dst) and reversed (dst -> src) message passing over ``graph``'s edges,
    cached on the graph object: the metanetwork runs many times over one graph."""
    if backend not in BACKENDS:
        raise ValueError(f"message-passing backend must be one of {BACKENDS}, not {backend!r}")
    cache = graph.__dict__.setdefault("_mp_cache", {})
    key = (backend, graph.src.device)
    if key not in cache:
        if backend == "torch":

            cache[key] = build_dense(graph, graph.src.device)
        else:
            cls = DGLMessagePassing if backend == "dgl" else PyGMessagePassing
            cache[key] = (cls(graph.src, graph.dst, graph.num_nodes), cls(graph.dst, graph.src, graph.num_nodes))
    return cache[key]


def scale_by_destination(stats: tuple[torch.Tensor, ...], f: torch.Tensor) -> torch.Tensor:
    """[mean, std, max, min] of ``f_i * z_ij`` from the statistics of ``z_ij``: [N, 4h]."""
    mean, mean_sq, mx, mn = stats
    std = torch.sqrt(torch.relu(mean_sq - mean * mean) + STD_EPS)
    positive = f >= 0
    return torch.cat([f * mean, f.abs() * std, torch.where(positive, f * mx, f * mn),
                      torch.where(positive, f * mn, f * mx)], dim=-1)
