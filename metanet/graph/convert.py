"""Network <-> graph: the conversions, over a per-architecture layout computed once and cached."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import nn

from metanet.graph import rules
from metanet.graph.layout import GraphLayout
from metanet.graph.network_graph import (NEUTRAL_NODE_FEATURES, NODE_FEATURES, STRUCTURAL_EDGE_TYPES,
                                         GraphMismatchError, NetworkGraph, UnsupportedNetworkError)
from metanet.graph.tracer import trace_layout

_LAYOUTS: "OrderedDict[tuple, GraphLayout]" = OrderedDict()
_LAYOUT_CACHE_SIZE = 32
# and at most this many edges over the cached layouts (a layout holds 3 int64 per edge: an 83M-
# parameter ResNeXt's 76.5 million edges are 1.8 GB; converting torchvision's classifiers one after
# another ran out of 24 GB with every layout kept)
_LAYOUT_CACHE_EDGES = 20_000_000


def clear_layout_cache() -> None:
    """Forget every cached layout (a rule was registered or replaced; or to time a fresh trace)."""
    _LAYOUTS.clear()


rules._on_change.append(clear_layout_cache)


def _structure_key(model: nn.Module, input_shape: tuple[int, ...]) -> tuple:
    """What decides a layout: module classes, the settings of user-defined modules (flags that may
    change forward), state shapes and the input shape. torch.nn layers' own settings (stride,
    padding) change no layout that the state shapes and the input shape do not already fix."""
    parts: list[Any] = [tuple(input_shape)]
    for name, m in model.named_modules():
        cls = type(m)
        parts.append((name, cls))
        if not cls.__module__.startswith("torch."):
            parts.append(tuple(sorted((k, v) for k, v in vars(m).items() if not k.startswith("_")
                                      and k != "training" and isinstance(v, (int, float, bool, str, tuple)))))
        for k, v in m._parameters.items():
            parts.append((k, None if v is None else (v.shape, v.dtype)))
        for k, v in m._buffers.items():
            parts.append((k, None if v is None else (v.shape, v.dtype)))
    return tuple(parts)


def graph_layout(model: nn.Module, input_shape: Sequence[int]) -> GraphLayout:
    """The layout of ``model``'s architecture for inputs of ``input_shape`` (cached)."""
    input_shape = tuple(int(s) for s in input_shape)
    key = _structure_key(model, input_shape)
    layout = _LAYOUTS.get(key)
    if layout is not None:
        _LAYOUTS.move_to_end(key)
        return layout
    layout = trace_layout(model, input_shape)
    _LAYOUTS[key] = layout
    while len(_LAYOUTS) > 1 and (len(_LAYOUTS) > _LAYOUT_CACHE_SIZE or
                                 sum(int(v.src.numel()) for v in _LAYOUTS.values()) > _LAYOUT_CACHE_EDGES):
        _LAYOUTS.popitem(last=False)
    return layout


def _all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` has no NaN or infinity. The sum is finite exactly then (short of overflow,
    which the exact check below settles); it is an order of magnitude faster than isfinite."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _input_shape(example_inputs: Any) -> tuple[int, ...]:
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) != 1:
            raise UnsupportedNetworkError("only networks with one input tensor are supported")
        example_inputs = example_inputs[0]
    if isinstance(example_inputs, torch.Size):
        return tuple(example_inputs)
    if not isinstance(example_inputs, torch.Tensor):
        raise TypeError(f"example_inputs must be a tensor (or its shape), not {type(example_inputs).__name__}")
    return (1, *example_inputs.shape[1:])


def network_to_graph(model: nn.Module, example_inputs: Any) -> NetworkGraph:
    """The graph of ``model``: see the module docstring. ``example_inputs`` is one input batch
    (or its shape); only its shape is used, with the batch size set to 1."""
    layout = graph_layout(model, _input_shape(example_inputs))
    state = model.state_dict()
    ref = state[layout.edge_slots[0].name] if layout.edge_slots else torch.zeros(0)
    node_feat = torch.tensor(NEUTRAL_NODE_FEATURES, dtype=ref.dtype, device=ref.device).repeat(layout.num_nodes, 1)
    for slot in layout.node_slots:
        value = state[slot.name].reshape(-1)
        if slot.span is not None:
            node_feat[slot.span[0]:slot.span[1], slot.column] = value
        else:
            node_feat[slot.nodes.to(ref.device), slot.column] = value
    per_type: dict[str, list[torch.Tensor]] = {t: [] for t in layout.edge_types}
    for slot in layout.edge_slots:
        value = state[slot.name]
        per_type[slot.etype].append(value.reshape(-1, slot.rows).t().contiguous() if slot.transposed
                                    else value.reshape(slot.rows, -1))
    for t in STRUCTURAL_EDGE_TYPES:  # operations, not weights: a constant 1 per edge
        if t in per_type:
            count = int((layout.edge_type == layout.edge_types.index(t)).sum())
            per_type[t].append(torch.ones(count, 1, dtype=ref.dtype, device=ref.device))
    edge_feat = {t: torch.cat(v) if len(v) > 1 else v[0].clone() for t, v in per_type.items()}
    for feat in (node_feat, *edge_feat.values()):
        if not _all_finite(feat):
            bad = next(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
            raise ValueError(f"network_to_graph: {bad} has NaN or infinite values")
    counters = torch.tensor([int(state[n]) for n in layout.counter_names], dtype=torch.int64)
    return NetworkGraph(layout.num_nodes, node_feat, layout.src.to(ref.device), layout.dst.to(ref.device),
                        layout.edge_type.to(ref.device), layout.edge_types, edge_feat, layout.input_shape,
                        counters, layout.fingerprint)


def _as_graph(graph: Any) -> NetworkGraph:
    if isinstance(graph, NetworkGraph):
        return graph
    if hasattr(graph, "network_meta") and hasattr(graph, "edge_index"):
        return NetworkGraph.from_pyg(graph)
    if hasattr(graph, "network_meta"):
        return NetworkGraph.from_dgl(graph)
    raise TypeError(f"expected a NetworkGraph (or one made into DGL/PyG), not {type(graph).__name__}")


def _checked_layout(graph: NetworkGraph, model: nn.Module) -> GraphLayout:
    layout = graph_layout(model, graph.input_shape)
    if graph.fingerprint != layout.fingerprint:
        raise GraphMismatchError(
            f"the graph (architecture {graph.fingerprint}, {graph.num_nodes} nodes, edges "
            f"{graph.edge_counts}) does not come from a {type(model).__name__} of this shape "
            f"(architecture {layout.fingerprint}, {layout.num_nodes} nodes)")
    extra = sorted(set(graph.edge_feat) - set(layout.edge_types))
    if extra:
        raise GraphMismatchError(f"the graph has edge features of type(s) {extra} that a "
                                 f"{type(model).__name__} of this shape does not have")
    for i, t in enumerate(layout.edge_types):
        feat = graph.edge_feat.get(t)
        width = layout.edge_widths[t]
        rows = int((layout.edge_type == i).sum())
        if feat is None or feat.dim() != 2 or feat.shape[1] != width or feat.shape[0] != rows:
            # name the layer whose rows are missing, or the first one past the end
            got = 0 if feat is None or feat.dim() != 2 else feat.shape[0]
            slot = next((s for s in layout.edge_slots if s.etype == t and s.start + s.rows > got), None)
            where = f" (layer weight {slot.name!r} needs rows {slot.start}..{slot.start + slot.rows - 1})" \
                if slot is not None and got < rows else ""
            raise GraphMismatchError(f"edge features of type {t!r} must be [{rows}, {width}], got "
                                     f"{None if feat is None else tuple(feat.shape)}{where}")
    if graph.node_feat.shape != (layout.num_nodes, len(NODE_FEATURES)):
        raise GraphMismatchError(f"node features must be [{layout.num_nodes}, {len(NODE_FEATURES)}], "
                                 f"got {tuple(graph.node_feat.shape)}")
    return layout


def graph_to_params(graph: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model``, taken from ``graph`` by differentiable torch ops.

    The result can go straight into ``torch.func.functional_call(model, params, x)``; gradients
    flow from the parameters back to the graph's node and edge features. Buffers (BatchNorm
    running statistics) are detached copies: BatchNorm updates them in place and takes no
    gradient through them.
    """
    graph = _as_graph(graph)
    layout = _checked_layout(graph, model)
    params: dict[str, torch.Tensor] = {}
    for slot in layout.edge_slots:
        rows = graph.edge_feat[slot.etype][slot.start:slot.start + slot.rows]
        params[slot.name] = (rows.t() if slot.transposed else rows).reshape(slot.shape)
    for slot in layout.node_slots:
        if slot.span is not None:
            value = graph.node_feat[slot.span[0]:slot.span[1], slot.column]
        else:
            value = graph.node_feat[slot.nodes.to(graph.node_feat.device), slot.column]
        if slot.shape is not None:
            value = value.reshape(slot.shape)
        # running statistics are buffers: BatchNorm updates them in place and takes no gradient
        params[slot.name] = value.detach().clone() if slot.name in layout.buffer_names else value
    for i, name in enumerate(layout.counter_names):
        params[name] = graph.counters[i].clone()
    return {k: params[k] for k in layout.state_names}


def graph_to_network(graph: Any, model: nn.Module) -> nn.Module:
    """A new module of ``model``'s architecture whose every parameter and buffer comes from
    ``graph``, bit for bit; ``model`` itself is not changed."""
    graph = _as_graph(graph)
    params = graph_to_params(graph, model)
    for what, feat in (("node", graph.node_feat), *((f"{t!r} edge", f) for t, f in graph.edge_feat.items())):
        if not _all_finite(feat):
            raise ValueError(f"graph_to_network: the graph's {what} features have NaN or infinite values")
    fresh: dict[int, Any] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        fresh[id(p)] = nn.Parameter(params[name].detach().clone(), requires_grad=p.requires_grad)
    for name, b in model.named_buffers(remove_duplicate=False):
        if name in params:
            fresh[id(b)] = params[name].detach().clone().to(b.device)
    return _clone_module(model, fresh)


_SHARED_TYPES = (int, float, bool, str, bytes, tuple, frozenset, type(None), torch.dtype, torch.device,
                 torch.Size, type)


def _clone_module(module: nn.Module, fresh: dict[int, Any], memo: dict[int, Any] | None = None) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are the tensors in ``fresh`` (by the id of
    the tensor they replace). Like ``copy.deepcopy``, but it does not walk into what needs no copy
    (settings, classes, functions), which makes it several times faster on deep networks."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    clone = module.__class__.__new__(module.__class__)
    memo[id(module)] = clone
    state = module.__dict__.copy()
    for key, value in state.items():
        if key == "_parameters" or key == "_buffers":
            state[key] = {k: None if v is None else fresh[id(v)] if id(v) in fresh else copy.deepcopy(v, memo)
                          for k, v in value.items()}
        elif key == "_modules":
            state[key] = {k: None if v is None else _clone_module(v, fresh, memo) for k, v in value.items()}
        elif type(value) in (dict, OrderedDict, list, set):
            state[key] = value.copy()
        elif not (isinstance(value, _SHARED_TYPES) or callable(value)):
            state[key] = copy.deepcopy(value, memo)
    clone.__dict__ = state
    return clone
