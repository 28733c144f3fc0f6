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


@dataclass(frozen=True)
class NodeSlot:
    """A per-channel tensor stored in column ``column`` of the node features of nodes ``nodes``."""

    name: str
    column: int
    nodes: torch.Tensor
    span: tuple[int, int] | None  # (first, last + 1) when ``nodes`` is a contiguous range


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


@dataclass
class Channels:
    """The graph nodes standing for dimension 1 of a traced tensor; ``spatial`` is the (H, W) of
    each channel's block of features once a map has been flattened into [batch, C*H*W]. While a
    view splits the channels over dimensions 1..k (a channel shuffle), ``nodes`` has those k
    dimensions."""

    nodes: torch.Tensor  # [C] int64 (or [g, C/g] while split)
    spatial: tuple[int, int] = (1, 1)


def fingerprint(layout: GraphLayout) -> str:
    """Identifies an architecture's layout (stored with every graph, checked when converting back)."""
    h = hashlib.sha1()
    h.update(repr((layout.input_shape, layout.num_nodes, layout.edge_types,
                   [(s.name, s.etype, s.start, s.rows, s.shape) for s in layout.edge_slots],
                   [(s.name, s.column, s.span) for s in layout.node_slots],
                   layout.counter_names)).encode())
    for t in (layout.src, layout.dst, *(s.nodes for s in layout.node_slots if s.span is None)):
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]
