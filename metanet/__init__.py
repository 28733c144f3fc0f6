"""Meta pruning with graph metanetworks: networks as graphs, the metanetwork, and pruning."""

from metanet.graph import (
    NODE_FEATURES,
    GraphMismatchError,
    NetworkGraph,
    UnsupportedNetworkError,
    graph_layout,
    graph_to_network,
    graph_to_params,
    network_to_graph,
)

__all__ = [
    "NODE_FEATURES",
    "GraphMismatchError",
    "NetworkGraph",
    "UnsupportedNetworkError",
    "graph_layout",
    "graph_to_network",
    "graph_to_params",
    "network_to_graph",
]
