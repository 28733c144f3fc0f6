"""A network as a graph, and back, exactly.

Nodes are the network's input channels and every output channel (or neuron) of each Conv/Linear
layer. A node's features are the parameters of the BatchNorm that normalises its channel (weight,
bias, running mean, running var) and its layer's bias, with neutral values (1, 0, 0, 1, 0) where a
layer has none. Every (output, input) channel pair of a layer is one edge whose feature is the
kernel between them, so a 3x3 convolution gives edges of 9 values and a 1x1 convolution or a
Linear layer edges of 1 value; a Linear layer reading a flattened HxW map gives edges of H*W
values. Edges are typed by kernel shape ("k3x3", "k1x1", ...), never zero-padded into one width.
A residual addition becomes one "identity" edge per channel, from the shallower operand's node to
the deeper one's, whose node then stands for the sum.

The mapping between the two is computed once per architecture by tracing the network with
torch.fx (``GraphLayout``): every parameter and buffer gets a slot, a contiguous block of edge
features or a column of node features. ``network_to_graph`` and ``graph_to_params`` are then plain
reshapes, so the round trip is exact and ``graph_to_params`` is differentiable.
"""

from __future__ import annotations

import copy
import hashlib
import operator
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

NODE_FEATURES = ("bn_weight", "bn_bias", "bn_running_mean", "bn_running_var", "bias")
NEUTRAL_NODE_FEATURES = (1.0, 0.0, 0.0, 1.0, 0.0)
IDENTITY = "identity"

_BN_COLUMNS = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3}


class UnsupportedNetworkError(ValueError):
    """The network has a layer or operation that the graph of the method cannot represent."""


class GraphMismatchError(ValueError):
    """A graph was paired with a network of another architecture."""


# -------------------------------------------------------------------------------- the graph
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
                            self.counters, self.fingerprint)

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


# ----------------------------------------------------------------- the per-architecture layout
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
    identity_counts: int
    fingerprint: str = ""
    state_names: tuple[str, ...] = field(default_factory=tuple)
    buffer_names: frozenset[str] = frozenset()


@dataclass
class _Channels:
    """The graph nodes standing for dimension 1 of a traced tensor; ``spatial`` is the (H, W) of
    each channel's block of features once a map has been flattened into [batch, C*H*W]."""

    nodes: torch.Tensor  # [C] int64
    spatial: tuple[int, int] = (1, 1)


class _LayoutBuilder:
    """Walks a traced network once and records its graph layout."""

    _CHANNELWISE_MODULES = (
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
        nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout2d,
        nn.Dropout1d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
        nn.ZeroPad2d, nn.Upsample,
    )
    _CHANNELWISE_FUNCTIONS: set[Any] = {
        F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.hardtanh,
        F.mish, F.softplus, F.dropout, F.dropout2d, F.max_pool1d, F.max_pool2d, F.avg_pool1d,
        F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d,
        F.adaptive_max_pool2d, F.interpolate, torch.relu, torch.sigmoid, torch.tanh, F.sigmoid,
        F.tanh, torch.nn.functional.relu_, torch.relu_, operator.neg,
    }
    _CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach",
                            "float", "mean", "amax", "sum", "clamp", "clamp_min", "clamp_"}
    _ADD = {operator.add, operator.iadd, torch.add}
    _SCALE = {operator.mul, operator.imul, operator.truediv, operator.itruediv, operator.sub,
              operator.isub, torch.mul, torch.sub, torch.div}
    _RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
    _RESHAPE_METHODS = {"view", "reshape", "flatten"}
    _KNOWN_REASONS = {
        nn.MultiheadAttention: "attention mixes positions with weights computed from the input",
        nn.LSTM: "recurrent layers carry state across time steps",
        nn.GRU: "recurrent layers carry state across time steps",
        nn.RNN: "recurrent layers carry state across time steps",
        nn.LayerNorm: "only BatchNorm is a per-channel node feature",
        nn.GroupNorm: "only BatchNorm is a per-channel node feature",
        nn.Embedding: "an embedding table is not a channel-to-channel weight",
        nn.PReLU: "learned activation parameters have no place in the graph",
    }

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]):
        self.model = model
        self.input_shape = tuple(int(s) for s in input_shape)
        self.modules = dict(model.named_modules())
        self.num_nodes = 0
        self.depth = torch.zeros(0, dtype=torch.int64)  # longest path (in layers) to each node
        self.has_norm = torch.zeros(0, dtype=torch.bool)
        self.edges: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.edge_widths: dict[str, int] = {}
        self.edge_slots: list[EdgeSlot] = []
        self.node_slots: list[NodeSlot] = []
        self.counter_names: list[str] = []
        self.called: set[str] = set()
        self.identity_count = 0

    # ---------------------------------------------------------------------------- helpers
    def _fail(self, node: torch.fx.Node, what: str, why: str) -> UnsupportedNetworkError:
        stack = node.meta.get("nn_module_stack") or {}
        where = next(reversed(stack.values()))[0] if stack else ""
        place = f" in module '{where}'" if where else ""
        return UnsupportedNetworkError(
            f"unsupported network {type(self.model).__name__}: {what}{place}: {why}")

    def _new_nodes(self, count: int, depth: int) -> torch.Tensor:
        nodes = torch.arange(self.num_nodes, self.num_nodes + count)
        self.num_nodes += count
        self.depth = torch.cat([self.depth, torch.full((count,), depth)])
        self.has_norm = torch.cat([self.has_norm, torch.zeros(count, dtype=torch.bool)])
        return nodes

    def _add_edges(self, etype: str, src: torch.Tensor, dst: torch.Tensor, width: int) -> int:
        """Adds edges of one type; returns the row where they start in that type's features."""
        if self.edge_widths.setdefault(etype, width) != width:
            raise AssertionError(f"edge type {etype} with two widths")
        rows = self.edges.setdefault(etype, [])
        start = sum(int(s.numel()) for s, _ in rows)
        rows.append((src, dst))
        return start

    @staticmethod
    def _span(nodes: torch.Tensor) -> tuple[int, int] | None:
        if nodes.numel() and bool((nodes == torch.arange(int(nodes[0]), int(nodes[0]) + nodes.numel())).all()):
            return int(nodes[0]), int(nodes[0]) + nodes.numel()
        return None

    def _node_slot(self, name: str, column: int, nodes: torch.Tensor) -> None:
        self.node_slots.append(NodeSlot(name, column, nodes, self._span(nodes)))

    @staticmethod
    def _shape(node: Any) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def _channels_of(self, node: torch.fx.Node, arg: Any, env: dict) -> _Channels:
        if not isinstance(arg, torch.fx.Node) or not isinstance(env.get(arg), _Channels):
            raise self._fail(node, f"'{node.name}'", "its input is not a traced activation tensor")
        return env[arg]

    # ------------------------------------------------------------------------------ layers
    def _layer(self, node: torch.fx.Node, name: str, module: nn.Module, x: _Channels,
               in_shape: tuple[int, ...]) -> _Channels:
        if name in self.called:
            raise self._fail(node, f"layer '{name}'", "it is called twice (shared weights)")
        self.called.add(name)
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise self._fail(node, f"layer '{name}' (Conv2d, groups={module.groups})",
                                 "grouped and depthwise convolutions are not supported")
            out_count, in_count = module.out_channels, module.in_channels
            kh, kw = module.kernel_size
            etype, width = f"k{kh}x{kw}", kh * kw
            shape = tuple(module.weight.shape)
        elif isinstance(module, nn.Conv1d):
            if module.groups != 1:
                raise self._fail(node, f"layer '{name}' (Conv1d, groups={module.groups})",
                                 "grouped and depthwise convolutions are not supported")
            out_count, in_count = module.out_channels, module.in_channels
            (k,) = module.kernel_size
            etype, width = f"k1x{k}", k
            shape = tuple(module.weight.shape)
        else:  # nn.Linear
            if len(in_shape) != 2:
                raise self._fail(node, f"layer '{name}' (Linear on a {len(in_shape)}-d tensor)",
                                 "Linear layers must read [batch, features] tensors")
            out_count, in_count = module.out_features, int(x.nodes.numel())
            width = module.in_features // max(in_count, 1)
            if width * in_count != module.in_features:
                raise self._fail(node, f"layer '{name}'", "its input features do not map to channels")
            etype = f"k{x.spatial[0]}x{x.spatial[1]}"
            if x.spatial[0] * x.spatial[1] != width:
                raise self._fail(node, f"layer '{name}'", "its input features do not map to channels")
            shape = tuple(module.weight.shape)
        if x.nodes.numel() != in_count:
            raise self._fail(node, f"layer '{name}'", f"expects {in_count} input channels, "
                             f"the traced input has {x.nodes.numel()}")
        depth = int(self.depth[x.nodes].max()) + 1 if x.nodes.numel() else 1
        out = self._new_nodes(out_count, depth)
        src = x.nodes.repeat(out_count)
        dst = out.repeat_interleave(in_count)
        start = self._add_edges(etype, src, dst, width)
        self.edge_slots.append(EdgeSlot(f"{name}.weight", etype, start, out_count * in_count, shape))
        if module.bias is not None:
            self._node_slot(f"{name}.bias", 4, out)
        return _Channels(out)

    def _norm(self, node: torch.fx.Node, name: str, module: nn.Module, x: _Channels) -> _Channels:
        if name in self.called:
            raise self._fail(node, f"norm layer '{name}'", "it is called twice (shared weights)")
        self.called.add(name)
        if x.nodes.numel() != module.num_features:
            raise self._fail(node, f"norm layer '{name}'", "its width does not match its input")
        if bool(self.has_norm[x.nodes].any()):
            raise self._fail(node, f"norm layer '{name}'",
                             "its channels already carry another BatchNorm's parameters")
        self.has_norm[x.nodes] = True
        for attr, column in _BN_COLUMNS.items():
            if getattr(module, attr, None) is not None:
                self._node_slot(f"{name}.{attr}", column, x.nodes)
        if getattr(module, "num_batches_tracked", None) is not None:
            self.counter_names.append(f"{name}.num_batches_tracked")
        return x

    def _residual(self, node: torch.fx.Node, a: _Channels, b: _Channels) -> _Channels:
        if a.nodes.numel() != b.nodes.numel():
            raise self._fail(node, f"addition '{node.name}'", "its operands have different widths")
        if bool((a.nodes == b.nodes).any()):
            raise self._fail(node, f"addition '{node.name}'", "it adds channels to themselves")
        da, db = self.depth[a.nodes], self.depth[b.nodes]
        a_deeper = (da > db) | ((da == db) & (a.nodes > b.nodes))
        into = torch.where(a_deeper, a.nodes, b.nodes)
        come = torch.where(a_deeper, b.nodes, a.nodes)
        self._add_edges(IDENTITY, come, into, 1)
        self.identity_count += int(into.numel())
        return _Channels(into)

    # ---------------------------------------------------------------------------- the walk
    def build(self, gm: torch.fx.GraphModule) -> GraphLayout:
        env: dict[torch.fx.Node, Any] = {}
        seen_input = False
        for node in gm.graph.nodes:
            shape = self._shape(node)
            if node.op == "placeholder":
                if seen_input:
                    raise self._fail(node, f"input '{node.name}'", "only networks with one input")
                seen_input = True
                if shape is None or len(shape) < 2:
                    raise self._fail(node, f"input '{node.name}'", "expected a [batch, channels, ...] tensor")
                env[node] = _Channels(self._new_nodes(shape[1], 0))
            elif node.op == "get_attr":
                raise self._fail(node, f"tensor attribute '{node.target}'",
                                 "forward uses a parameter or buffer directly, outside a layer")
            elif node.op == "call_module":
                env[node] = self._call_module(node, env, shape)
            elif node.op in ("call_function", "call_method"):
                env[node] = self._call_function(node, env, shape)
            elif node.op == "output":
                out = node.args[0]
                if not isinstance(out, torch.fx.Node) or not isinstance(env.get(out), _Channels):
                    raise self._fail(node, "the output", "networks must return one tensor")
        return self._finish()

    def _call_module(self, node: torch.fx.Node, env: dict, shape: tuple[int, ...] | None) -> Any:
        name = str(node.target)
        module = self.modules[name]
        x = self._channels_of(node, node.args[0], env) if node.args else None
        in_shape = self._shape(node.args[0]) if node.args else None
        if isinstance(module, (nn.Conv2d, nn.Conv1d, nn.Linear)):
            return self._layer(node, name, module, x, in_shape)
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return self._norm(node, name, module, x)
        if isinstance(module, self._CHANNELWISE_MODULES):
            return self._keep_channels(node, x, in_shape, shape)
        if isinstance(module, nn.Flatten):
            return self._reshape(node, x, in_shape, shape)
        why = next((r for t, r in self._KNOWN_REASONS.items() if isinstance(module, t)),
                   "no rule maps this layer to graph nodes and edges")
        raise self._fail(node, f"layer '{name}' ({type(module).__name__})", why)

    def _keep_channels(self, node, x: _Channels, in_shape, shape) -> _Channels:
        if shape is None or in_shape is None or len(shape) < 2 or shape[1] != in_shape[1]:
            raise self._fail(node, f"operation '{node.name}'", "it changes the channel dimension")
        return _Channels(x.nodes, x.spatial if len(shape) == 2 else (1, 1))

    def _reshape(self, node, x: _Channels, in_shape, shape) -> _Channels:
        if shape is not None and in_shape is not None and shape == in_shape:
            return _Channels(x.nodes, x.spatial)
        if (shape is None or in_shape is None or len(shape) != 2 or len(in_shape) < 3
                or shape[0] != in_shape[0] or shape[1] != x.nodes.numel() * _prod(in_shape[2:])):
            raise self._fail(node, f"reshape '{node.name}'",
                             "only flattening [batch, channels, ...] into [batch, features] is supported")
        spatial = tuple(in_shape[2:]) if len(in_shape) == 4 else (1, _prod(in_shape[2:]))
        return _Channels(x.nodes, spatial)

    def _call_function(self, node: torch.fx.Node, env: dict, shape) -> Any:
        target = node.target
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node) and isinstance(env.get(a), _Channels)]
        if shape is None:  # sizes, shapes, tuples: not activations
            if tensor_args and target not in (getattr, "size", "dim", operator.getitem):
                raise self._fail(node, f"operation '{node.name}' ({_name(target)})",
                                 "it turns an activation into something that is not a tensor")
            return None
        x = env[tensor_args[0]] if tensor_args else None
        in_shape = self._shape(tensor_args[0]) if tensor_args else None
        if target in self._ADD or target in ("add", "add_"):
            if len(tensor_args) == 2:
                return self._residual(node, env[tensor_args[0]], env[tensor_args[1]])
            if len(tensor_args) == 1:
                return self._keep_channels(node, x, in_shape, shape)
        if target in self._SCALE or target in ("mul", "mul_", "div", "sub"):
            if len(tensor_args) == 1:
                return self._keep_channels(node, x, in_shape, shape)
            raise self._fail(node, f"operation '{node.name}' ({_name(target)})",
                             "a product of two activations (gating, attention) is not supported")
        if target in self._CHANNELWISE_FUNCTIONS or target in self._CHANNELWISE_METHODS:
            if x is None:
                raise self._fail(node, f"operation '{node.name}'", "it has no activation input")
            if node.op == "call_method" and target in ("mean", "amax", "sum"):
                dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
                if not dims or any(d % len(in_shape) in (0, 1) for d in dims):
                    raise self._fail(node, f"reduction '{node.name}'", "it reduces over channels")
            return self._keep_channels(node, x, in_shape, shape)
        if target in self._RESHAPE_FUNCTIONS or target in self._RESHAPE_METHODS:
            return self._reshape(node, x, in_shape, shape)
        if target is operator.getitem and x is not None:
            index = node.args[1]
            index = index if isinstance(index, tuple) else (index,)
            if len(index) >= 2 and index[1] == slice(None) and index[0] == slice(None):
                return self._keep_channels(node, x, in_shape, shape)
            raise self._fail(node, f"indexing '{node.name}'", "it selects or reorders channels")
        if target is torch.cat:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            parts = node.args[0]
            if dim in (1, -len(shape) + 1) and all(isinstance(env.get(p), _Channels) for p in parts):
                return _Channels(torch.cat([env[p].nodes for p in parts]))
            raise self._fail(node, f"concatenation '{node.name}'", "only concatenation along channels")
        raise self._fail(node, f"operation '{node.name}' ({_name(target)})",
                         "no rule maps this operation to graph nodes and edges")

    def _finish(self) -> GraphLayout:
        state = self.model.state_dict()
        placed = {s.name for s in self.edge_slots} | {s.name for s in self.node_slots} | set(self.counter_names)
        missing = [k for k in state if k not in placed]
        if missing:
            raise UnsupportedNetworkError(
                f"unsupported network {type(self.model).__name__}: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                "not used by a Conv/Linear/BatchNorm layer in forward, so the graph cannot hold it")
        bad = [k for k, v in state.items() if v.is_floating_point() and v.dtype != torch.float32]
        if bad:
            raise UnsupportedNetworkError(f"only float32 networks are supported; {bad[0]} is "
                                          f"{state[bad[0]].dtype}")
        types = tuple(sorted(self.edges))
        srcs, dsts, kinds = [], [], []
        for i, t in enumerate(types):
            s = torch.cat([s for s, _ in self.edges[t]])
            srcs.append(s), dsts.append(torch.cat([d for _, d in self.edges[t]]))
            kinds.append(torch.full_like(s, i))
        layout = GraphLayout(
            input_shape=self.input_shape, num_nodes=self.num_nodes,
            src=torch.cat(srcs) if srcs else torch.zeros(0, dtype=torch.int64),
            dst=torch.cat(dsts) if dsts else torch.zeros(0, dtype=torch.int64),
            edge_type=torch.cat(kinds) if kinds else torch.zeros(0, dtype=torch.int64),
            edge_types=types, edge_widths=dict(self.edge_widths), edge_slots=self.edge_slots,
            node_slots=self.node_slots, counter_names=self.counter_names,
            identity_counts=self.identity_count, state_names=tuple(state),
            buffer_names=frozenset(n for n, _ in self.model.named_buffers()))
        layout.fingerprint = _fingerprint(layout)
        return layout


def _all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` has no NaN or infinity. The sum is finite exactly then (short of overflow,
    which the exact check below settles); it is an order of magnitude faster than isfinite."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _prod(values: Iterable[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def _fingerprint(layout: GraphLayout) -> str:
    h = hashlib.sha1()
    h.update(repr((layout.input_shape, layout.num_nodes, layout.edge_types,
                   [(s.name, s.etype, s.start, s.rows, s.shape) for s in layout.edge_slots],
                   [(s.name, s.column, s.span) for s in layout.node_slots],
                   layout.counter_names)).encode())
    for t in (layout.src, layout.dst, *(s.nodes for s in layout.node_slots if s.span is None)):
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------- layout caching
_LAYOUTS: "OrderedDict[tuple, GraphLayout]" = OrderedDict()
_LAYOUT_CACHE_SIZE = 32


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
    layout = _trace_layout(model, input_shape)
    _LAYOUTS[key] = layout
    while len(_LAYOUTS) > _LAYOUT_CACHE_SIZE:
        _LAYOUTS.popitem(last=False)
    return layout


def _trace_layout(model: nn.Module, input_shape: tuple[int, ...]) -> GraphLayout:
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as err:  # tracing errors come from deep inside torch.fx: say what failed
        raise UnsupportedNetworkError(
            f"unsupported network {type(model).__name__}: torch.fx cannot trace its forward "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "data-dependent control flow is not supported") from None
    for node in gm.graph.nodes:  # a clear error for unsupported layers before running anything
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, tuple(_LayoutBuilder._KNOWN_REASONS)):
                raise _LayoutBuilder(model, input_shape)._fail(
                    node, f"layer '{node.target}' ({type(module).__name__})",
                    next(r for t, r in _LayoutBuilder._KNOWN_REASONS.items() if isinstance(module, t)))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    try:
        model.eval()  # shape propagation must not touch BatchNorm running statistics
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(input_shape, device=device))
    except Exception as err:
        raise UnsupportedNetworkError(
            f"unsupported network {type(model).__name__}: running it on an input of shape "
            f"{input_shape} failed ({type(err).__name__}: {err})") from None
    finally:
        model.train(was_training)
    return _LayoutBuilder(model, input_shape).build(gm)


# ---------------------------------------------------------------------- the conversions
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
        if slot.span is not None:
            node_feat[slot.span[0]:slot.span[1], slot.column] = state[slot.name]
        else:
            node_feat[slot.nodes.to(ref.device), slot.column] = state[slot.name]
    per_type: dict[str, list[torch.Tensor]] = {t: [] for t in layout.edge_types}
    for slot in layout.edge_slots:
        per_type[slot.etype].append(state[slot.name].reshape(slot.rows, -1))
    if IDENTITY in per_type:
        per_type[IDENTITY].append(torch.ones(layout.identity_counts, 1, dtype=ref.dtype, device=ref.device))
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
        params[slot.name] = graph.edge_feat[slot.etype][slot.start:slot.start + slot.rows].reshape(slot.shape)
    for slot in layout.node_slots:
        if slot.span is not None:
            value = graph.node_feat[slot.span[0]:slot.span[1], slot.column]
        else:
            value = graph.node_feat[slot.nodes.to(graph.node_feat.device), slot.column]
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
