"""The converter's rules: one per layer type (and per operation), each saying which graph nodes,
edges and node-feature columns it makes. The tracer (``metanet.graph.tracer``) walks a torch.fx
trace of the network and hands every module call to the rule registered for its type (by MRO, so
subclasses inherit their base's rule) and every function or method call to the rule for its target.

A rule for your own module type, like Torch-Pruning's customised pruners::

    from metanet.graph import ModuleRule, register_module_rule

    @register_module_rule(MyScale)           # a module that scales each channel by a fixed vector
    class MyScaleRule(ModuleRule):
        def apply(self, t, node, name, module, x, in_shape, shape):
            return keep_channels(t, node, x, in_shape, shape)

A module type whose parameters have no place in the graph is refused with its reason
(``refuse(nn.LayerNorm, "...")``); the error names the layer and says why.

Every rule gets the tracer ``t`` (``t.new_nodes``, ``t.add_edges``, ``t.edge_slot``,
``t.node_slot``, ``t.claim``, ``t.fail``, ``t.depth``, ``t.has_norm``, ``t.counter_names``), the
fx node, and the input's ``Channels`` with the traced input and output shapes.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from metanet.graph.layout import Channels, ParameterRef
from metanet.graph.network_graph import ATTENTION, GATE, IDENTITY, NODE_FEATURES, NORM

MODULE_RULES: dict[type, "ModuleRule"] = {}
FUNCTION_RULES: dict[Any, "FunctionRule"] = {}  # a function, or a method name (str)
_on_change: list[Callable[[], None]] = []  # e.g. clearing the layout cache when a rule changes


class ModuleRule:
    """How calls of one module type become graph nodes and edges."""

    def apply(self, t, node: torch.fx.Node, name: str, module: nn.Module, x: Channels | None,
              in_shape: tuple[int, ...] | None, shape: tuple[int, ...] | None) -> Channels:
        raise NotImplementedError


class FunctionRule:
    """How calls of one function or tensor method become graph nodes and edges. ``args`` are the
    call's arguments that are traced activations (in order), ``x`` the first one's channels."""

    def apply(self, t, node: torch.fx.Node, env: dict, args: list[torch.fx.Node], x: Channels | None,
              in_shape: tuple[int, ...] | None, shape: tuple[int, ...]) -> Channels:
        raise NotImplementedError


def _register(registry: dict, keys: tuple) -> Callable:
    def register(rule):
        instance = rule() if isinstance(rule, type) else rule
        for key in keys:
            registry[key] = instance
        for hook in _on_change:
            hook()
        return rule
    return register


def register_module_rule(*types: type) -> Callable:
    """Class decorator (or call with an instance): the rule for modules of ``types`` and their
    subclasses; replaces an earlier rule for the same type."""
    return _register(MODULE_RULES, types)


def register_function_rule(*targets: Any) -> Callable:
    """Class decorator: the rule for calls of ``targets`` (functions, or method names)."""
    return _register(FUNCTION_RULES, targets)


def module_rule(module: nn.Module) -> ModuleRule | None:
    """The rule for ``module``: the one registered for its class or the nearest base class."""
    torchvision_rules(type(module))
    for cls in type(module).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls]
    return None


# ------------------------------------------------------------------------ shared actions
def keep_channels(t, node, x: Channels, in_shape, shape) -> Channels:
    """The output's channels are the input's (activations, pooling, dropout, scalar arithmetic)."""
    if x.dim == 1:
        if shape is None or in_shape is None or len(shape) < 2 or shape[1] != in_shape[1]:
            raise t.fail(node, f"operation '{node.name}'", "it changes the channel dimension")
        return Channels(x.nodes, x.spatial if len(shape) == 2 else (1, 1))
    if shape is None or in_shape is None or len(shape) != len(in_shape) or shape[x.dim] != in_shape[x.dim]:
        raise t.fail(node, f"operation '{node.name}'", "it changes the channel dimension")
    return Channels(x.nodes, dim=x.dim)


def flatten(t, node, x: Channels, in_shape, shape) -> Channels:
    """[batch, C, H, W] -> [batch, C*H*W]: the same channel nodes, each now a block of H*W
    features, which the next Linear layer reads as one edge of width H*W per channel."""
    if shape is not None and in_shape is not None and shape == in_shape:
        return Channels(x.nodes, x.spatial)
    if (shape is None or in_shape is None or len(shape) != 2 or len(in_shape) < 3
            or shape[0] != in_shape[0] or shape[1] != x.nodes.numel() * _prod(in_shape[2:])):
        raise t.fail(node, f"reshape '{node.name}'",
                     "only flattening [batch, channels, ...] into [batch, features] is supported")
    spatial = tuple(in_shape[2:]) if len(in_shape) == 4 else (1, _prod(in_shape[2:]))
    return Channels(x.nodes, spatial)


def parameter_edges(t, node, x: Channels, ref: ParameterRef, etype_prefix: str, what: str) -> Channels:
    """A parameter the forward combines with an activation, one vector per channel (a position
    embedding ``[1, T, C]`` added to tokens, a class token ``[1, 1, C]`` put before them): new
    nodes, one per channel, each with one edge into its channel whose feature is the channel's
    vector (edge type ``{etype_prefix}{length}``, a weight the metanetwork edits)."""
    if not ref.shape or ref.shape[0] != 1 or len(ref.shape) < 2 or ref.shape[x.dim] != x.nodes.numel():
        raise t.fail(node, f"{what} '{ref.name}'", f"its shape {ref.shape} does not give one vector per channel")
    param = t.parameter(node, ref, f"{what} '{ref.name}'")
    channels = int(x.nodes.numel())
    width = param.numel() // channels
    transposed = x.dim == len(ref.shape) - 1
    if not transposed and x.dim != 1:
        raise t.fail(node, f"{what} '{ref.name}'", "its channels are neither its first nor its last axis")
    source = t.new_nodes(channels, 0)
    etype = f"{etype_prefix}{width}"
    start = t.add_edges(etype, source, x.nodes.reshape(-1), width)
    t.edge_slot(ref.name, etype, start, channels, tuple(param.shape), transposed)
    return x


def norm_nodes(t, x: Channels) -> Channels:
    """New nodes for a norm layer's output, one per channel, each reached from its input channel by
    a ``norm`` edge (width 1, feature 1.0): the norm's parameters get node features of their own."""
    out = t.new_nodes(int(x.nodes.numel()), 0)
    t.depth[out] = t.depth[x.nodes]  # the same depth: the new node (a larger index) counts as deeper
    t.add_edges(NORM, x.nodes, out, 1)
    return Channels(out, x.spatial, x.dim)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _weight_edges(t, node, name: str, module: nn.Module, x: Channels, out_count: int, in_count: int,
                  etype: str, width: int) -> Channels:
    """One new node per output channel; one edge per (output, input) channel pair, in row-major
    order of the weight (output-major), carrying that pair's kernel; the bias in column 'bias'."""
    if x.nodes.numel() != in_count:
        raise t.fail(node, f"layer '{name}'", f"expects {in_count} input channels, "
                     f"the traced input has {x.nodes.numel()}")
    depth = int(t.depth[x.nodes].max()) + 1 if x.nodes.numel() else 1
    out = t.new_nodes(out_count, depth)
    start = t.add_edges(etype, x.nodes.repeat(out_count), out.repeat_interleave(in_count), width)
    t.edge_slot(f"{name}.weight", etype, start, out_count * in_count, tuple(module.weight.shape))
    if module.bias is not None:
        t.node_slot(f"{name}.bias", NODE_FEATURES.index("bias"), out)
    return Channels(out)


# ------------------------------------------------------------------------------ the layers
@register_module_rule(nn.Conv2d, nn.Conv1d)
class ConvRule(ModuleRule):
    """Conv1d/Conv2d: nodes: one per output channel; edges: every input channel of an output
    channel's group -> that output channel (all input channels when ``groups`` is 1; one, the
    channel's own, for a depthwise convolution: a block-diagonal pattern, no zero blocks), in the
    weight's order; edge type ``k{kh}x{kw}`` (``k1x{k}`` for Conv1d), width kh*kw (the kernel);
    node feature: the bias."""

    def apply(self, t, node, name, module, x, in_shape, shape):
        t.claim(node, f"layer '{name}'", name)
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
        else:
            kh, kw = 1, module.kernel_size[0]
        if module.groups == 1:
            return _weight_edges(t, node, name, module, x, module.out_channels, module.in_channels, f"k{kh}x{kw}",
                                 kh * kw)
        return _grouped_weight_edges(t, node, name, module, x, module.groups, f"k{kh}x{kw}", kh * kw)


def _grouped_weight_edges(t, node, name: str, module: nn.Module, x: Channels, groups: int, etype: str,
                          width: int) -> Channels:
    """``_weight_edges`` for a grouped convolution: output channel ``o`` of group ``g`` receives
    edges from the group's ``in_channels / groups`` input channels only (weight ``[out, in/groups,
    ...]``, row-major: the edges of one output channel are consecutive)."""
    out_count, per_group = module.out_channels, module.in_channels // groups
    if x.nodes.numel() != module.in_channels:
        raise t.fail(node, f"layer '{name}'", f"expects {module.in_channels} input channels, "
                     f"the traced input has {x.nodes.numel()}")
    group_of_output = torch.arange(out_count) // (out_count // groups)
    src = x.nodes.view(groups, per_group)[group_of_output].reshape(-1)
    depth = int(t.depth[x.nodes].max()) + 1 if x.nodes.numel() else 1
    out = t.new_nodes(out_count, depth)
    start = t.add_edges(etype, src, out.repeat_interleave(per_group), width)
    t.edge_slot(f"{name}.weight", etype, start, out_count * per_group, tuple(module.weight.shape))
    if module.bias is not None:
        t.node_slot(f"{name}.bias", NODE_FEATURES.index("bias"), out)
    return Channels(out)


@register_module_rule(nn.Linear)
class LinearRule(ModuleRule):
    """Linear on [batch, features]: nodes: one per output feature; edges: every input channel ->
    every output; edge type ``k{h}x{w}`` and width h*w when it reads a flattened h x w map per
    channel (``k1x1``, width 1, on plain features); node feature: the bias."""

    def apply(self, t, node, name, module, x, in_shape, shape):
        t.claim(node, f"layer '{name}'", name)
        if len(in_shape) > 2:  # tokens [batch, T, C] or channels-last maps: one edge per channel pair
            if x.dim != len(in_shape) - 1:
                raise t.fail(node, f"layer '{name}' (Linear on a {len(in_shape)}-d tensor)",
                             "its input's channels are not its last dimension")
            out = _weight_edges(t, node, name, module, x, module.out_features, module.in_features, "k1x1", 1)
            return Channels(out.nodes, dim=x.dim)
        in_count = int(x.nodes.numel())
        width = module.in_features // max(in_count, 1)
        if width * in_count != module.in_features or x.spatial[0] * x.spatial[1] != width:
            raise t.fail(node, f"layer '{name}'", "its input features do not map to channels")
        return _weight_edges(t, node, name, module, x, module.out_features, in_count,
                             f"k{x.spatial[0]}x{x.spatial[1]}", width)


@register_module_rule(nn.BatchNorm1d, nn.BatchNorm2d)
class BatchNormRule(ModuleRule):
    """BatchNorm: its weight, bias, running mean and running var become the node features
    ``bn_weight``, ``bn_bias``, ``bn_running_mean``, ``bn_running_var`` of the channels it
    normalises, with no nodes or edges of its own; when some of those channels already carry a
    norm's parameters (DenseNet normalises concatenated channels again in every layer), it gets
    its own nodes (``norm_nodes``). Its batch counter is kept beside the graph (``counters``)."""

    COLUMNS = {"weight": NODE_FEATURES.index("bn_weight"), "bias": NODE_FEATURES.index("bn_bias"),
               "running_mean": NODE_FEATURES.index("bn_running_mean"),
               "running_var": NODE_FEATURES.index("bn_running_var")}

    def width(self, module) -> int:
        return module.num_features

    def apply(self, t, node, name, module, x, in_shape, shape):
        t.claim(node, f"norm layer '{name}'", name)
        if x.nodes.numel() != self.width(module):
            raise t.fail(node, f"norm layer '{name}'", "its width does not match its input")
        if bool(t.has_norm[x.nodes].any()):  # DenseNet's norms of concatenated, already normalised channels
            x = norm_nodes(t, x)
        t.has_norm[x.nodes] = True
        for attr, column in self.COLUMNS.items():
            if getattr(module, attr, None) is not None:
                t.node_slot(f"{name}.{attr}", column, x.nodes)
        if getattr(module, "num_batches_tracked", None) is not None:
            t.counter_names.append(f"{name}.num_batches_tracked")
        return x


@register_module_rule(nn.GroupNorm)
class GroupNormRule(BatchNormRule):
    """GroupNorm: normalised with each input's own group statistics, then a per-channel affine
    transform: its weight and bias become the node features ``bn_weight`` and ``bn_bias`` (the
    running-statistics columns stay neutral), like BatchNorm's; no nodes or edges of its own."""

    COLUMNS = {"weight": NODE_FEATURES.index("bn_weight"), "bias": NODE_FEATURES.index("bn_bias")}

    def width(self, module) -> int:
        return module.num_channels


@register_module_rule(nn.LayerNorm)
class LayerNormRule(BatchNormRule):
    """LayerNorm over the channels (of tokens ``[batch, T, C]``, of a channels-last map, or
    torchvision's ``LayerNorm2d`` over dimension 1): each position normalised with its own
    statistics, then a per-channel affine transform: weight and bias become the node features
    ``bn_weight`` and ``bn_bias``, like BatchNorm's. A LayerNorm over more than the channels is refused."""

    COLUMNS = GroupNormRule.COLUMNS

    def width(self, module) -> int:
        return module.normalized_shape[0]

    def apply(self, t, node, name, module, x, in_shape, shape):
        channels_first = type(module).__name__ == "LayerNorm2d"  # torchvision's: permutes to channels-last inside
        if len(module.normalized_shape) != 1 or x.dim != (1 if channels_first else len(in_shape) - 1):
            raise t.fail(node, f"norm layer '{name}' (LayerNorm over {tuple(module.normalized_shape)})",
                         "only a LayerNorm over the channels alone is a per-channel node feature")
        return super().apply(t, node, name, module, x, in_shape, shape)


class PermuteRule(ModuleRule):
    """A permutation of the dimensions that keeps the batch first (torchvision's ``Permute``
    module, ``x.permute``): the channels move with their dimension."""

    def apply(self, t, node, name, module, x, in_shape, shape):
        return permuted(t, node, x, list(module.dims), in_shape)


def permuted(t, node, x: Channels, dims: list[int], in_shape) -> Channels:
    dims = [d % len(in_shape) for d in dims]
    if dims[0] != 0 or x.nodes.dim() != 1:
        raise t.fail(node, f"permute '{node.name}'", "it moves the batch dimension or split channels")
    return Channels(x.nodes, dim=dims.index(x.dim))


@register_module_rule(nn.MultiheadAttention)
class AttentionRule(ModuleRule):
    """Self-attention (``nn.MultiheadAttention(x, x, x)``, batch first, over tokens ``[batch, T,
    C]``). Nodes: the query, key and value channels (3C, one node each, from ``in_proj_weight``'s
    rows: edges ``k1x1`` from every input channel, biases as node features) and the C output
    channels of ``out_proj`` (edges ``k1x1`` from the value channels). The attention itself mixes
    tokens, not channels: each value channel of head h receives one ``attention`` edge (width 1,
    feature 1.0) from every query and key channel of head h, so a head's channels stay together."""

    def apply(self, t, node, name, module, x, in_shape, shape):
        t.claim(node, f"attention '{name}'", name)
        args = node.args[:3]
        if len(args) < 3 or not (args[0] is args[1] is args[2]):
            raise t.fail(node, f"attention '{name}'", "only self-attention (query, key and value the same tensor)")
        if not module.batch_first or not module._qkv_same_embed_dim or module.bias_k is not None:
            raise t.fail(node, f"attention '{name}'", "only batch-first attention with one input projection "
                         "and no extra key/value biases")
        if x.dim != len(in_shape) - 1 or x.nodes.numel() != module.embed_dim:
            raise t.fail(node, f"attention '{name}'", "its input is not tokens [batch, T, embed_dim]")
        channels, heads = module.embed_dim, module.num_heads
        depth = int(t.depth[x.nodes].max()) + 1
        qkv = t.new_nodes(3 * channels, depth)
        start = t.add_edges("k1x1", x.nodes.repeat(3 * channels), qkv.repeat_interleave(channels), 1)
        t.edge_slot(f"{name}.in_proj_weight", "k1x1", start, 3 * channels * channels, (3 * channels, channels))
        if module.in_proj_bias is not None:
            t.node_slot(f"{name}.in_proj_bias", NODE_FEATURES.index("bias"), qkv)
        q, k, v = qkv.view(3, heads, channels // heads)
        # every value channel of a head hears every query and key channel of that head
        sources = torch.cat([q, k], 1)  # [heads, 2 * head_dim]
        per_head = v.shape[1]
        t.add_edges(ATTENTION, sources.repeat_interleave(per_head, 0).reshape(-1),
                    v.reshape(-1).repeat_interleave(sources.shape[1]), 1)
        t.depth[v.reshape(-1)] = depth + 1
        out_proj = module.out_proj
        out = _weight_edges(t, node, f"{name}.out_proj", out_proj, Channels(v.reshape(-1)), channels, channels,
                            "k1x1", 1)
        return Channels(out.nodes, dim=x.dim), None  # (output, attention weights: not asked for)


CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.Dropout1d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.ZeroPad2d, nn.Upsample,
)


@register_module_rule(*CHANNELWISE_MODULES)
class ChannelwiseRule(ModuleRule):
    """Activations, pooling, dropout, padding, upsampling: no nodes, edges or features; the output
    channels are the input's."""

    def apply(self, t, node, name, module, x, in_shape, shape):
        return keep_channels(t, node, x, in_shape, shape)


@register_module_rule(nn.Flatten)
class FlattenRule(ModuleRule):
    """Flatten [batch, C, ...] into [batch, features]: no nodes or edges (see ``flatten``)."""

    def apply(self, t, node, name, module, x, in_shape, shape):
        return flatten(t, node, x, in_shape, shape)


class Refuse(ModuleRule):
    """A module type the graph cannot hold, and why (the error names the layer)."""

    def __init__(self, reason: str):
        self.reason = reason

    def apply(self, t, node, name, module, x, in_shape, shape):
        raise t.fail(node, f"layer '{name}' ({type(module).__name__})", self.reason)


def refuse(module_type: type, reason: str) -> None:
    register_module_rule(module_type)(Refuse(reason))


for _recurrent in (nn.LSTM, nn.GRU, nn.RNN):
    refuse(_recurrent, "recurrent layers carry state across time steps")
refuse(nn.Embedding, "an embedding table is not a channel-to-channel weight")
refuse(nn.PReLU, "learned activation parameters have no place in the graph")


# -------------------------------------------------------------------------- the operations
def _parameters_in(node, env) -> list[ParameterRef]:
    return [env[a] for a in node.args if isinstance(a, torch.fx.Node) and isinstance(env.get(a), ParameterRef)]


def channel_scale(t, node, x: Channels, ref: ParameterRef, in_shape) -> Channels:
    """``x * scale`` with one learned value per channel: the value becomes the node feature
    ``bn_weight`` of the channel (a per-channel scale, like an affine norm's), on nodes of its own
    when the channels already carry a norm's."""
    if ref.shape is None or int(torch.tensor(ref.shape).prod()) != x.nodes.numel() \
            or (len(ref.shape) > 1 and ref.shape[x.dim - (len(in_shape) - len(ref.shape))] != x.nodes.numel()):
        raise t.fail(node, f"parameter '{ref.name}'", f"its shape {ref.shape} is not one value per channel")
    param = t.parameter(node, ref, f"parameter '{ref.name}'")
    if bool(t.has_norm[x.nodes].any()):
        x = norm_nodes(t, x)
    t.has_norm[x.nodes] = True
    t.node_slot(ref.name, NODE_FEATURES.index("bn_weight"), x.nodes, tuple(param.shape))
    return x


def _join(t, node, etype: str, a: Channels, b: Channels) -> Channels:
    """Two operands of an elementwise operation become one: per channel, an ``etype`` edge from
    the shallower operand's node into the deeper one's (ties: the later node), which then stands
    for the result."""
    if a.dim != b.dim or a.nodes.dim() != 1 or b.nodes.dim() != 1:
        raise t.fail(node, f"operation '{node.name}'", "its operands hold their channels on different dimensions")
    da, db = t.depth[a.nodes], t.depth[b.nodes]
    a_deeper = (da > db) | ((da == db) & (a.nodes > b.nodes))
    into = torch.where(a_deeper, a.nodes, b.nodes)
    t.add_edges(etype, torch.where(a_deeper, b.nodes, a.nodes), into, 1)
    return Channels(into, dim=a.dim)


def _shape_of(arg: Any) -> tuple[int, ...] | None:
    meta = arg.meta.get("tensor_meta") if isinstance(arg, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


@register_function_rule(operator.add, operator.iadd, torch.add, "add", "add_")
class ResidualAddRule(FunctionRule):
    """a + b of two activations (a residual connection): one ``identity`` edge per channel, width
    1 (feature 1.0), from the shallower operand's node into the deeper one's, which then stands
    for the sum; no new nodes. Adding a constant keeps the channels; adding a parameter with one
    vector per channel (a position embedding) gives it ``embed`` edges (``parameter_edges``)."""

    def apply(self, t, node, env, args, x, in_shape, shape):
        refs = _parameters_in(node, env)
        if len(args) == 1 and refs:  # a position embedding added to tokens (or a learned per-position bias)
            return parameter_edges(t, node, x, refs[0], "embed", "position embedding")
        if len(args) == 2:
            a, b = env[args[0]], env[args[1]]
            if a.nodes.numel() != b.nodes.numel():
                raise t.fail(node, f"addition '{node.name}'", "its operands have different widths")
            if bool((a.nodes == b.nodes).any()):
                raise t.fail(node, f"addition '{node.name}'", "it adds channels to themselves")
            return _join(t, node, IDENTITY, a, b)
        if len(args) == 1:
            return keep_channels(t, node, x, in_shape, shape)
        raise t.fail(node, f"operation '{node.name}' ({_name(node.target)})",
                     "no rule maps this operation to graph nodes and edges")


@register_function_rule(operator.mul, operator.imul, torch.mul, "mul", "mul_")
class ProductRule(FunctionRule):
    """An activation times a constant keeps its channels; times a parameter with one value per
    channel (a layer scale), that value becomes the channel's ``bn_weight`` (``channel_scale``).
    A product of two activations of the same
    channels, one possibly of spatial size 1 (Squeeze-and-Excitation's ``scale * x``, gated
    branches): one ``gate`` edge per channel, width 1 (feature 1.0), from the shallower operand's
    node into the deeper one's, which then stands for the product; no new nodes."""

    def apply(self, t, node, env, args, x, in_shape, shape):
        refs = _parameters_in(node, env)
        if len(args) == 1 and refs:  # a learned per-channel scale (ConvNeXt's layer scale)
            return channel_scale(t, node, x, refs[0], in_shape)
        if len(args) == 1:
            return keep_channels(t, node, x, in_shape, shape)
        if len(args) == 2:
            a, b = env[args[0]], env[args[1]]
            shapes = [_shape_of(arg) for arg in args]
            if (a.nodes.numel() != b.nodes.numel() or None in shapes
                    or any(len(s) < 2 or s[1] != shape[1] for s in shapes)):
                raise t.fail(node, f"product '{node.name}'", "its operands are not the same channels (attention?)")
            if bool((a.nodes == b.nodes).any()):
                raise t.fail(node, f"product '{node.name}'", "it multiplies channels with themselves")
            return _join(t, node, GATE, a, b)
        raise t.fail(node, f"operation '{node.name}' ({_name(node.target)})",
                     "no rule maps this operation to graph nodes and edges")


@register_function_rule(operator.truediv, operator.itruediv, operator.sub, operator.isub, torch.sub, torch.div,
                        "div", "sub")
class ScalarArithmeticRule(FunctionRule):
    """An activation divided by or minus a constant: the channels are kept. The same with two
    activations is refused."""

    def apply(self, t, node, env, args, x, in_shape, shape):
        if len(args) == 1:
            return keep_channels(t, node, x, in_shape, shape)
        raise t.fail(node, f"operation '{node.name}' ({_name(node.target)})",
                     "a difference or quotient of two activations is not supported")


CHANNELWISE_FUNCTIONS = (
    F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.mish, F.softplus, F.dropout, F.dropout2d, F.max_pool1d, F.max_pool2d, F.avg_pool1d,
    F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.interpolate, torch.relu, torch.sigmoid, torch.tanh, F.sigmoid,
    F.tanh, torch.nn.functional.relu_, torch.relu_, operator.neg,
)
CHANNELWISE_METHODS = ("relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "float", "mean",
                       "amax", "sum", "clamp", "clamp_min", "clamp_")


@register_function_rule(*CHANNELWISE_FUNCTIONS, *CHANNELWISE_METHODS)
class ChannelwiseFunctionRule(FunctionRule):
    """Functional activations and pooling, and reductions over spatial dimensions only: the
    channels are kept. A reduction over the channel (or batch) dimension is refused."""

    def apply(self, t, node, env, args, x, in_shape, shape):
        if x is None:
            raise t.fail(node, f"operation '{node.name}'", "it has no activation input")
        if node.op == "call_method" and node.target in ("mean", "amax", "sum"):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            dims = sorted(d % len(in_shape) for d in dims)
            if not dims or any(d in (0, x.dim) for d in dims):
                raise t.fail(node, f"reduction '{node.name}'", "it reduces over channels")
            keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            if x.dim != 1 and not keepdim:  # tokens averaged away: the channels move up
                return Channels(x.nodes, dim=x.dim - sum(d < x.dim for d in dims))
        return keep_channels(t, node, x, in_shape, shape)


@register_function_rule(torch.flatten, torch.reshape, "view", "reshape", "flatten")
class ReshapeRule(FunctionRule):
    """flatten / view / reshape: [batch, C, ...] -> [batch, features] (see ``flatten``); and the
    views of a channel shuffle, whose channel mapping is static: [batch, C, ...] -> [batch, g,
    C/g, ...] splits the channel nodes into a [g, C/g] grid, and the reverse view joins them."""

    def apply(self, t, node, env, args, x, in_shape, shape):
        if shape is not None and in_shape is not None and len(in_shape) >= 2:
            rest = tuple(in_shape[1 + x.nodes.dim():])
            if x.nodes.dim() == 1 and len(shape) == len(in_shape) + 1 and tuple(shape[3:]) == rest \
                    and shape[1] * shape[2] == in_shape[1] and shape[0] == in_shape[0]:
                return Channels(x.nodes.reshape(shape[1], shape[2]))
            if x.nodes.dim() == 2 and len(shape) == len(in_shape) - 1 and tuple(shape[2:]) == rest \
                    and shape[1] == x.nodes.numel() and shape[0] == in_shape[0]:
                return Channels(x.nodes.reshape(-1))
            if x.nodes.dim() == 1 and x.dim == 1 and len(shape) > 2 and len(shape) < len(in_shape) \
                    and tuple(shape[:2]) == tuple(in_shape[:2]) and _prod(shape[2:]) == _prod(in_shape[2:]):
                return Channels(x.nodes)  # [batch, C, H, W] -> [batch, C, H*W]: positions merged
        if x is not None and (x.nodes.dim() != 1 or x.dim != 1):
            raise t.fail(node, f"reshape '{node.name}'", "it reshapes split or non-leading channels")
        return flatten(t, node, x, in_shape, shape)


@register_function_rule(torch.transpose, "transpose")
class TransposeRule(FunctionRule):
    """Swapping the two dimensions of channels split by a view (a channel shuffle's transpose):
    the channel grid is transposed; swapping two other dimensions (tokens and channels) moves the
    channels with their dimension; moving the batch dimension is refused."""

    def apply(self, t, node, env, args, x, in_shape, shape):
        dims = [d % len(in_shape) for d in node.args[1:3]]
        if x.nodes.dim() == 2 and sorted(dims) == [1, 2]:
            return Channels(x.nodes.t())
        if x.nodes.dim() == 1 and 0 not in dims:  # tokens <-> channels: the channels move with their dimension
            order = list(range(len(in_shape)))
            order[dims[0]], order[dims[1]] = order[dims[1]], order[dims[0]]
            return permuted(t, node, x, order, in_shape)
        raise t.fail(node, f"transpose '{node.name}'", "it moves the batch dimension")


@register_function_rule(torch.permute, "permute")
class PermuteFunctionRule(FunctionRule):
    """``x.permute(...)`` keeping the batch first: the channels move with their dimension."""

    def apply(self, t, node, env, args, x, in_shape, shape):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return permuted(t, node, x, list(dims), in_shape)


@register_function_rule(torch.chunk, torch.split, "chunk", "split")
class ChannelSplitRule(FunctionRule):
    """Splitting along channels (``x.chunk(2, dim=1)``): a tuple of the parts' channel nodes; no
    new nodes or edges. Splitting along another dimension is refused."""

    splits = True  # its result is a tuple, picked apart by ``operator.getitem``

    def apply(self, t, node, env, args, x, in_shape, shape):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections"))
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if in_shape is None or x.nodes.dim() != 1 or dim % len(in_shape) != 1:
            raise t.fail(node, f"split '{node.name}'", "only splitting along channels is supported")
        chunked = node.target in (torch.chunk, "chunk")
        parts = x.nodes.chunk(size) if chunked else x.nodes.split(size)
        return tuple(Channels(p) for p in parts)


@register_function_rule(operator.getitem)
class IndexRule(FunctionRule):
    """x[:, :, ...]: keeps every channel; picking tokens before the channel dimension (the class
    token ``x[:, 0]``) keeps them too; selecting or reordering channels is refused."""

    def apply(self, t, node, env, args, x, in_shape, shape):
        parts = env.get(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
        if isinstance(parts, tuple) and isinstance(node.args[1], int):  # one part of a channel split
            return parts[node.args[1]]
        if x is None:
            raise t.fail(node, f"operation '{node.name}' ({_name(node.target)})",
                         "no rule maps this operation to graph nodes and edges")
        index = node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        if x.dim == 1 and len(index) >= 2 and index[1] == slice(None) and index[0] == slice(None):
            return keep_channels(t, node, x, in_shape, shape)
        if (x.dim > 1 and index and index[0] == slice(None) and len(index) <= x.dim
                and all(isinstance(i, (int, slice)) for i in index)):  # picks tokens, e.g. the class token x[:, 0]
            return Channels(x.nodes, dim=x.dim - sum(isinstance(i, int) for i in index))
        raise t.fail(node, f"indexing '{node.name}'", "it selects or reorders channels")


@register_function_rule(torch.cat)
class ConcatRule(FunctionRule):
    """torch.cat along channels: the output's channels are the operands' nodes, in order; no new
    nodes or edges. Learned tokens (a class token ``[1, 1, C]``) put before a sequence of tokens
    get ``token`` edges (``parameter_edges``). Other concatenations are refused."""

    def apply(self, t, node, env, args, x, in_shape, shape):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        dim %= len(shape)
        parts = [env.get(p) for p in node.args[0]]
        channels = [p for p in parts if isinstance(p, Channels)]
        if channels and all(isinstance(p, Channels) for p in parts) and all(p.dim == dim for p in parts):
            return Channels(torch.cat([p.nodes for p in parts]), dim=dim)
        if (len(channels) == 1 and channels[0].dim != dim and dim != 0
                and all(isinstance(p, ParameterRef) for p in parts if p is not channels[0])):
            for ref in (p for p in parts if isinstance(p, ParameterRef)):  # a class token before the tokens
                parameter_edges(t, node, channels[0], ref, "token", "token")
            return channels[0]
        raise t.fail(node, f"concatenation '{node.name}'", "only concatenation along channels, or of "
                     "learned tokens before a sequence")


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


_TORCHVISION_RULES = []  # [True] once registered


def torchvision_rules(thing: Any) -> None:
    """Registers the rules for torchvision's own layers when ``thing`` (a module class or a traced
    function) comes from torchvision: importing torchvision costs a second in every process that
    converts a network (each Ray worker), and most networks here never use it. Stochastic depth
    is the identity at inference and a channel-wise random drop in training; ``Permute`` a
    permutation of the dimensions."""
    if _TORCHVISION_RULES:
        return
    origins = [c.__module__ for c in thing.__mro__] if isinstance(thing, type) else [getattr(thing, "__module__", "")]
    if not any(str(o).startswith("torchvision") for o in origins):
        return
    _TORCHVISION_RULES.append(True)
    from torchvision.ops import StochasticDepth, stochastic_depth
    from torchvision.ops.misc import Permute

    register_module_rule(StochasticDepth)(ChannelwiseRule)
    register_module_rule(Permute)(PermuteRule)
    register_function_rule(stochastic_depth)(ChannelwiseFunctionRule)
