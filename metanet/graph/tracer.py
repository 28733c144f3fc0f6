"""The tracer: a torch.fx trace of the network, walked once, each call handed to its rule
(``metanet.graph.rules``); the result is the architecture's ``GraphLayout``."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from metanet.graph.layout import Channels, EdgeSlot, GraphLayout, NodeSlot, ParameterRef, fingerprint
from metanet.graph.network_graph import UnsupportedNetworkError
from metanet.graph.rules import FUNCTION_RULES, Refuse, _name, module_rule, torchvision_rules


class LayoutBuilder:
    """Walks a traced network once and records its graph layout; the rules call its methods."""

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

    # ------------------------------------------------------------------- what rules call
    def fail(self, node: torch.fx.Node, what: str, why: str) -> UnsupportedNetworkError:
        stack = node.meta.get("nn_module_stack") or {}
        where = next(reversed(stack.values()))[0] if stack else ""
        place = f" in module '{where}'" if where else ""
        return UnsupportedNetworkError(f"unsupported network {type(self.model).__name__}: {what}{place}: {why}")

    def claim(self, node: torch.fx.Node, what: str, name: str) -> None:
        """A layer's parameters have one place in the graph: a second call of it is refused."""
        if name in self.called:
            raise self.fail(node, what, "it is called twice (shared weights)")
        self.called.add(name)

    def new_nodes(self, count: int, depth: int) -> torch.Tensor:
        nodes = torch.arange(self.num_nodes, self.num_nodes + count)
        self.num_nodes += count
        self.depth = torch.cat([self.depth, torch.full((count,), depth)])
        self.has_norm = torch.cat([self.has_norm, torch.zeros(count, dtype=torch.bool)])
        return nodes

    def add_edges(self, etype: str, src: torch.Tensor, dst: torch.Tensor, width: int) -> int:
        """Adds edges of one type; returns the row where they start in that type's features."""
        if self.edge_widths.setdefault(etype, width) != width:
            raise AssertionError(f"edge type {etype} with two widths")
        rows = self.edges.setdefault(etype, [])
        start = sum(int(s.numel()) for s, _ in rows)
        rows.append((src, dst))
        return start

    def edge_slot(self, name: str, etype: str, start: int, rows: int, shape: tuple[int, ...],
                  transposed: bool = False) -> None:
        """Parameter ``name`` is rows [start, start + rows) of the features of edge type ``etype``
        (``transposed``: the tensor's last axis runs over the rows)."""
        self.edge_slots.append(EdgeSlot(name, etype, start, rows, shape, transposed))

    def node_slot(self, name: str, column: int, nodes: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
        """Parameter or buffer ``name`` is column ``column`` of the node features of ``nodes``
        (``shape``: the tensor's shape when it is not ``[len(nodes)]``)."""
        self.node_slots.append(NodeSlot(name, column, nodes, _span(nodes), shape))

    def parameter(self, node: torch.fx.Node, ref: ParameterRef, what: str) -> torch.Tensor:
        """The parameter ``ref`` names, claimed (a parameter has one place in the graph)."""
        self.claim(node, what, ref.name)
        try:
            return self.model.get_parameter(ref.name)
        except AttributeError:
            raise self.fail(node, what, f"'{ref.name}' is a buffer, not a parameter") from None

    # ---------------------------------------------------------------------------- the walk
    def build(self, gm: torch.fx.GraphModule) -> GraphLayout:
        env: dict[torch.fx.Node, Any] = {}
        seen_input = False
        for node in gm.graph.nodes:
            shape = _shape(node)
            if node.op == "placeholder":
                if seen_input:
                    raise self.fail(node, f"input '{node.name}'", "only networks with one input")
                seen_input = True
                if shape is None or len(shape) < 2:
                    raise self.fail(node, f"input '{node.name}'", "expected a [batch, channels, ...] tensor")
                env[node] = Channels(self.new_nodes(shape[1], 0))
            elif node.op == "get_attr":  # a parameter used directly: a rule that combines it gives it a place
                env[node] = ParameterRef(str(node.target), shape)
            elif node.op == "call_module":
                env[node] = self._call_module(node, env, shape)
            elif node.op in ("call_function", "call_method"):
                env[node] = self._call_function(node, env, shape)
            elif node.op == "output":
                out = node.args[0]
                if not isinstance(out, torch.fx.Node) or not isinstance(env.get(out), Channels):
                    raise self.fail(node, "the output", "networks must return one tensor")
        return self._finish()

    def _channels_of(self, node: torch.fx.Node, arg: Any, env: dict) -> Channels:
        if not isinstance(arg, torch.fx.Node) or not isinstance(env.get(arg), Channels):
            raise self.fail(node, f"'{node.name}'", "its input is not a traced activation tensor")
        return env[arg]

    def _call_module(self, node: torch.fx.Node, env: dict, shape: tuple[int, ...] | None) -> Any:
        name = str(node.target)
        module = self.modules[name]
        x = self._channels_of(node, node.args[0], env) if node.args else None
        in_shape = _shape(node.args[0]) if node.args else None
        rule = module_rule(module)
        if rule is None:
            raise self.fail(node, f"layer '{name}' ({type(module).__name__})",
                            "no rule maps this layer to graph nodes and edges")
        return rule.apply(self, node, name, module, x, in_shape, shape)

    def _call_function(self, node: torch.fx.Node, env: dict, shape) -> Any:
        target = node.target
        args = [a for a in node.args if isinstance(a, torch.fx.Node) and isinstance(env.get(a), Channels)]
        params = [a for a in node.args if isinstance(a, torch.fx.Node) and isinstance(env.get(a), ParameterRef)]
        if params and not args:  # a parameter being prepared (expand, view): it stays the parameter
            if target in ("expand", "view", "reshape", "contiguous") and len(params) == 1:
                return env[params[0]]
            raise self.fail(node, f"parameter '{env[params[0]].name}'",
                            f"forward uses it directly in '{_name(target)}', outside a layer")
        if shape is None:  # sizes, shapes, tuples: not activations (or a split into several)
            rule = _function_rule(target)
            if args and getattr(rule, "splits", False):
                return rule.apply(self, node, env, args, env[args[0]], _shape(args[0]), None)
            if args and target not in (getattr, "size", "dim", operator.getitem):
                raise self.fail(node, f"operation '{node.name}' ({_name(target)})",
                                "it turns an activation into something that is not a tensor")
            return None
        x = env[args[0]] if args else None
        in_shape = _shape(args[0]) if args else None
        rule = _function_rule(target)
        if rule is None:
            raise self.fail(node, f"operation '{node.name}' ({_name(target)})",
                            "no rule maps this operation to graph nodes and edges")
        return rule.apply(self, node, env, args, x, in_shape, shape)

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
            state_names=tuple(state),
            buffer_names=frozenset(n for n, _ in self.model.named_buffers()))
        layout.fingerprint = fingerprint(layout)
        return layout


def _function_rule(target: Any):
    torchvision_rules(target)
    try:
        return FUNCTION_RULES.get(target)
    except TypeError:  # an unhashable target
        return None


def _span(nodes: torch.Tensor) -> tuple[int, int] | None:
    if nodes.numel() and bool((nodes == torch.arange(int(nodes[0]), int(nodes[0]) + nodes.numel())).all()):
        return int(nodes[0]), int(nodes[0]) + nodes.numel()
    return None


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with every module that has a rule (a user's type, or a subclass of a
    torch layer) kept whole: its rule, not its forward, says what it is in the graph."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or module_rule(m) is not None


def trace_layout(model: nn.Module, input_shape: tuple[int, ...]) -> GraphLayout:
    """The layout of ``model`` for inputs of ``input_shape``: torch.fx trace, shape propagation
    (eval mode, no gradients), then the walk. Refused layers are reported before anything runs."""
    try:
        graph = _Tracer().trace(model)
        gm = torch.fx.GraphModule(model, graph)
    except Exception as err:  # tracing errors come from deep inside torch.fx: say what failed
        raise UnsupportedNetworkError(
            f"unsupported network {type(model).__name__}: torch.fx cannot trace its forward "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "data-dependent control flow is not supported") from None
    for node in gm.graph.nodes:  # a clear error for refused layers before running anything
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            rule = module_rule(module)
            if isinstance(rule, Refuse):
                raise LayoutBuilder(model, input_shape).fail(
                    node, f"layer '{node.target}' ({type(module).__name__})", rule.reason)
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
    return LayoutBuilder(model, input_shape).build(gm)
