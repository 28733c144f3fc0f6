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

The package, one job per module: ``network_graph`` (``NetworkGraph`` and its DGL/PyG forms),
``layout`` (slots and the layout), ``rules`` (one rule per layer type and operation, and the
registry a user adds rules to), ``tracer`` (the torch.fx walk that applies the rules), ``convert``
(the conversions and the layout cache).
"""

from metanet.graph.convert import clear_layout_cache, graph_layout, graph_to_network, graph_to_params, network_to_graph
from metanet.graph.layout import Channels, EdgeSlot, GraphLayout, NodeSlot
from metanet.graph.network_graph import (GATE, IDENTITY, NEUTRAL_NODE_FEATURES, NODE_FEATURES, NORM, STRUCTURAL_EDGE_TYPES,
                                         GraphMismatchError, NetworkGraph, UnsupportedNetworkError)
from metanet.graph.rules import (FunctionRule, ModuleRule, flatten, keep_channels, refuse, register_function_rule,
                                 register_module_rule)

__all__ = [
    "GATE", "IDENTITY", "NEUTRAL_NODE_FEATURES", "NODE_FEATURES", "NORM", "STRUCTURAL_EDGE_TYPES", "Channels", "EdgeSlot", "FunctionRule", "GraphLayout",
    "GraphMismatchError", "ModuleRule", "NetworkGraph", "NodeSlot", "UnsupportedNetworkError", "clear_layout_cache",
    "flatten", "graph_layout", "graph_to_network", "graph_to_params", "keep_channels", "network_to_graph", "refuse",
    "register_function_rule", "register_module_rule",
]
