"""``GraphLayout``: where each parameter and buffer of one architecture lives in its graph.

A layout is computed once per architecture by the tracer (``metanet.graph.tracer``) from the rules
(``metanet.graph.rules``); converting a network to its graph and back is then plain reshapes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class EdgeSlot:
    """A weight stored as rows [start, start + rows) of the edge features of type ``etype``."""

    name: str
    etype: str
    start: int
    rows: int
    shape: tuple[int, ...]
    # the tensor holds the rows as its last axis ([..., width, rows]: a position embedding [1, T, C]
    # is C rows of width T), so it is transposed on the way in and out
    transposed: bool = False


@dataclass(frozen=True)
class NodeSlot:
    """A per-channel tensor stored in column ``column`` of the node features of nodes ``nodes``."""

    name: str
    column: int
    nodes: torch.Tensor
    span: tuple[int, int] | None  # (first, last + 1) when ``nodes`` is a contiguous range
    shape: tuple[int, ...] | None = None  # the tensor's shape when it is not [len(nodes)] (a scale [C, 1, 1])


@dataclass
class GraphLayout:
    """Where each parameter and buffer of one architecture lives in its graph."""

    input_shape: tuple[int, ...]
    num_nodes: int
    src: torch.Tensor
    dst: torch.Tensor
    edge_type: torch.Tensor
    edge_types: tuple[str, ...]
    edge_widths: dict[str, int]
    edge_slots: list[EdgeSlot]
    node_slots: list[NodeSlot]
    counter_names: list[str]
    fingerprint: str = ""
    state_names: tuple[str, ...] = field(default_factory=tuple)
    buffer_names: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ParameterRef:
    """A parameter the forward uses directly (``self.class_token``, ``self.pos_embedding``, a
    layer scale), as the tracer meets it: a rule that combines it with an activation gives it a
    place in the graph."""

    name: str
    shape: tuple[int, ...]


@dataclass
class Channels:
    """The graph nodes standing for the channel dimension of a traced tensor (``dim``: 1 for
    [batch, C, ...] maps, the last for token sequences and channels-last maps); ``spatial`` is the (H, W) of
    each channel's block of features once a map has been flattened into [batch, C*H*W]. While a
    view splits the channels over dimensions 1..k (a channel shuffle), ``nodes`` has those k
    dimensions."""

    nodes: torch.Tensor  # [C] int64 (or [g, C/g] while split)
    spatial: tuple[int, int] = (1, 1)
    dim: int = 1  # the tensor dimension holding the channels: 1, or the last for tokens [batch, T, C]


def fingerprint(layout: GraphLayout) -> str:
    """Identifies an architecture's layout (stored with every graph, checked when converting back)."""
    h = hashlib.sha1()
    h.update(repr((layout.input_shape, layout.num_nodes, layout.edge_types,
                   # new slot fields count only where set, so that older layouts keep their fingerprints
                   [(s.name, s.etype, s.start, s.rows, s.shape) + (("T",) if s.transposed else ())
                    for s in layout.edge_slots],
                   [(s.name, s.column, s.span) + ((s.shape,) if s.shape is not None else ())
                    for s in layout.node_slots],
                   layout.counter_names)).encode())
    for t in (layout.src, layout.dst, *(s.nodes for s in layout.node_slots if s.span is None)):
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]
