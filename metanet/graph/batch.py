"""Several networks' graphs as one disjoint graph, so the metanetwork edits them in one pass.

The metanetwork's layers act per node, per edge and along edges, so on a disjoint union its output
is each graph's own output (tests/test_dense_passing.py checks it). The union keeps the
``NetworkGraph`` rule that edges are grouped by type: the edges of type ``t`` are graph 0's, then
graph 1's, ...; so consecutive same-shaped layers of several members still form one stacked dense
group for the ``torch`` backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from metanet.graph.network_graph import NetworkGraph


@dataclass(frozen=True)
class GraphBatch:
    """The union (``graph``) and, per member, its node range and the union positions of its edges
    in the member's own edge order (``edge_index[i]``)."""

    graph: NetworkGraph
    node_ranges: tuple[tuple[int, int], ...]
    edge_index: tuple[torch.Tensor, ...]

    def nodes_of(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``i``'s rows of a per-node tensor of the union."""
        lo, hi = self.node_ranges[i]
        return x[lo:hi]

    def edges_of(self, i: int, e: torch.Tensor) -> torch.Tensor:
        """Member ``i``'s rows of a per-edge tensor of the union, in the member's edge order."""
        return e[self.edge_index[i]]


def batch_graphs(graphs: Sequence[NetworkGraph]) -> GraphBatch:
    """The disjoint union of ``graphs`` (their metadata is not kept: split results with
    ``GraphBatch.nodes_of`` / ``edges_of`` and put them back on each member's graph)."""
    if not graphs:
        raise ValueError("batch_graphs needs at least one graph")
    widths: dict[str, int] = {}
    for g in graphs:
        for t in g.edge_types:
            if widths.setdefault(t, g.edge_feat[t].shape[1]) != g.edge_feat[t].shape[1]:
                raise ValueError(f"edge type {t!r} has widths {widths[t]} and {g.edge_feat[t].shape[1]} "
                                 "in different graphs")
    types = tuple(widths)
    node_start = [0]
    for g in graphs:
        node_start.append(node_start[-1] + g.num_nodes)
    src, dst, kind, feat = [], [], [], {}
    position = 0
    member_positions: list[dict[str, torch.Tensor]] = [{} for _ in graphs]
    for k, t in enumerate(types):
        rows = []
        for i, g in enumerate(graphs):
            if t not in g.edge_feat:
                continue
            lo, hi = g.edge_offsets()[t]
            src.append(g.src[lo:hi] + node_start[i])
            dst.append(g.dst[lo:hi] + node_start[i])
            kind.append(torch.full((hi - lo,), k, dtype=g.edge_type.dtype, device=g.src.device))
            rows.append(g.edge_feat[t])
            member_positions[i][t] = torch.arange(position, position + hi - lo, device=g.src.device)
            position += hi - lo
        feat[t] = torch.cat(rows)
    union = NetworkGraph(node_start[-1], torch.cat([g.node_feat for g in graphs]), torch.cat(src), torch.cat(dst),
                         torch.cat(kind), types, feat, graphs[0].input_shape, graphs[0].counters,
                         "batch:" + ",".join(g.fingerprint for g in graphs),
                         torch.cat([g.statistics for g in graphs])
                         if all(g.statistics is not None for g in graphs) else None)
    edge_index = tuple(torch.cat([member_positions[i][t] for t in g.edge_types]) for i, g in enumerate(graphs))
    node_ranges = tuple((node_start[i], node_start[i + 1]) for i in range(len(graphs)))
    return GraphBatch(union, node_ranges, edge_index)
