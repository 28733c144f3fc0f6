"""``NetworkGraph``: one network's graph (nodes, typed edges, features), and its DGL and PyG forms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

NODE_FEATURES = ("bn_weight", "bn_bias", "bn_running_mean", "bn_running_var", "bias")
NEUTRAL_NODE_FEATURES = (1.0, 0.0, 0.0, 1.0, 0.0)
IDENTITY = "identity"
# edges that stand for an operation, not a weight: width 1, feature 1.0, never edited.
# "gate": an elementwise product of two branches (Squeeze-and-Excitation), from the shallower
# operand's node into the deeper one's, which stands for the product; "norm": a norm layer on
# channels that already carry a norm's parameters (DenseNet), from each channel to the norm's own node
# "attention": from each query and key channel of a head to each value channel of that head
ATTENTION, GATE, NORM = "attention", "gate", "norm"
STRUCTURAL_EDGE_TYPES = (ATTENTION, GATE, IDENTITY, NORM)


class UnsupportedNetworkError(ValueError):
    """The network has a layer or operation that the graph of the method cannot represent."""


class GraphMismatchError(ValueError):
    """A graph was paired with a network of another architecture."""


@dataclass
class NetworkGraph:
    """The graph of one network. Edges are grouped by type, in the order of ``edge_types``.

    ``edge_feat[t]`` holds the features of the edges of type ``t`` ([E_t, k_t]); ``counters`` the
    integer BatchNorm batch counters (not channel features, kept so that the round trip is exact);
    ``fingerprint`` identifies the architecture the graph came from.
    """

    num_nodes: int
    node_feat: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    edge_type: torch.Tensor
    edge_types: tuple[str, ...]
    edge_feat: dict[str, torch.Tensor]
    input_shape: tuple[int, ...]
    counters: torch.Tensor
    fingerprint: str
    # per-node calibration statistics of these weights ([N, k]: metanet.scoring.attach_statistics),
    # for a metanetwork that reads them; None until attached. ``to`` moves them, ``with_features``
    # drops them (other weights, other statistics)
    statistics: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # quantities computed from this graph's tensors, kept so that each is computed once per graph
    # (metanet.gates: which nodes are gatable, layer ids, per-channel evidence); ``to`` and
    # ``with_features`` start empty (another device, other weights)
    derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_edges(self) -> int:
        return int(self.src.numel())

    @property
    def edge_counts(self) -> dict[str, int]:
        return {t: int(self.edge_feat[t].shape[0]) for t in self.edge_types}

    def with_features(self, node_feat: torch.Tensor, edge_feat: Mapping[str, torch.Tensor]) -> "NetworkGraph":
        """The same topology carrying other features (a metanetwork's output, say)."""
        if node_feat.shape != self.node_feat.shape:
            raise ValueError(f"node features of shape {tuple(node_feat.shape)}, graph has "
                             f"{tuple(self.node_feat.shape)}")
        for t in self.edge_types:
            if t not in edge_feat or edge_feat[t].shape != self.edge_feat[t].shape:
                got = None if t not in edge_feat else tuple(edge_feat[t].shape)
                raise ValueError(f"edge features of type {t!r}: got {got}, graph has "
                                 f"{tuple(self.edge_feat[t].shape)}")
        return NetworkGraph(self.num_nodes, node_feat, self.src, self.dst, self.edge_type,
                            self.edge_types, dict(edge_feat), self.input_shape, self.counters,
                            self.fingerprint)

    def to(self, device: torch.device | str) -> "NetworkGraph":
        return NetworkGraph(self.num_nodes, self.node_feat.to(device), self.src.to(device),
                            self.dst.to(device), self.edge_type.to(device), self.edge_types,
                            {t: f.to(device) for t, f in self.edge_feat.items()}, self.input_shape,
                            self.counters, self.fingerprint,
                            None if self.statistics is None else self.statistics.to(device))

    def _meta(self) -> dict[str, Any]:
        return {"input_shape": self.input_shape, "counters": self.counters,
                "fingerprint": self.fingerprint, "edge_types": self.edge_types}

    def to_dgl(self):
        """A DGL heterograph: one node type ``channel``, one edge type per kernel shape.

        Node features are ``g.ndata["feat"]``, edge features ``g.edges[t].data["feat"]``. DGL has
        no graph-level store, so input shape, counters and fingerprint ride along as the Python
        attribute ``g.network_meta`` (``NetworkGraph.from_dgl`` reads them back).
        """
        from metanet.dgl_compat import dgl

        bounds = self.edge_offsets()
        data = {("channel", t, "channel"): (self.src[a:b], self.dst[a:b]) for t, (a, b) in bounds.items()}
        g = dgl.heterograph(data, num_nodes_dict={"channel": self.num_nodes}, idtype=torch.int64,
                            device=self.src.device)
        g.ndata["feat"] = self.node_feat
        for t in self.edge_types:
            g.edges[t].data["feat"] = self.edge_feat[t]
        g.network_meta = self._meta()
        return g

    @classmethod
    def from_dgl(cls, g) -> "NetworkGraph":
        meta = getattr(g, "network_meta", None)
        if meta is None:
            raise ValueError("this DGL graph has no `network_meta`: make it with NetworkGraph.to_dgl()")
        types = tuple(meta["edge_types"])
        srcs, dsts, kinds = [], [], []
        for i, t in enumerate(types):
            s, d = g.edges(etype=t)
            srcs.append(s), dsts.append(d), kinds.append(torch.full_like(s, i))
        return cls(g.num_nodes(), g.ndata["feat"], torch.cat(srcs), torch.cat(dsts), torch.cat(kinds),
                   types, {t: g.edges[t].data["feat"] for t in types}, tuple(meta["input_shape"]),
                   meta["counters"], meta["fingerprint"])

    def to_pyg(self):
        """A ``torch_geometric.data.Data``: ``x``, ``edge_index``, ``edge_type`` and, per edge type
        ``t``, the attribute ``edge_attr_<t>``; the metadata as plain attributes."""
        from torch_geometric.data import Data

        data = Data(x=self.node_feat, edge_index=torch.stack([self.src, self.dst]),
                    edge_type=self.edge_type, num_nodes=self.num_nodes)
        for t in self.edge_types:
            data[f"edge_attr_{t}"] = self.edge_feat[t]
        data.network_meta = self._meta()
        return data

    @classmethod
    def from_pyg(cls, data) -> "NetworkGraph":
        meta = data.network_meta
        types = tuple(meta["edge_types"])
        return cls(int(data.num_nodes), data.x, data.edge_index[0], data.edge_index[1], data.edge_type,
                   types, {t: data[f"edge_attr_{t}"] for t in types}, tuple(meta["input_shape"]),
                   meta["counters"], meta["fingerprint"])

    def edge_offsets(self) -> dict[str, tuple[int, int]]:
        """Edge type -> (first, last + 1) position of its edges in ``src``/``dst``."""
        out, start = {}, 0
        for t in self.edge_types:
            n = int(self.edge_feat[t].shape[0])
            out[t] = (start, start + n)
            start += n
        return out
