"""What a metanetwork decodes from its final node and edge states: one class per head, in ``HEADS``.

A head decides which decoders the metanetwork has (their names are the keys of its saved files) and
what its output means: an edit of the network's weights (``additive``, the paper's; ``gate``;
``gate+additive``) or a learned criterion that edits nothing and ranks the network's channels
(``scores``) or weights (``weight_scores``), or an allocation that edits and ranks nothing and says
how much of each dependency group a pruning keeps (``allocation``). The config key that names it
is ``edit``, as in every metanetwork file and flag written so far (``--edit scores``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from metanet.gates import apply_gates, gate_from_logit
from metanet.graph import NetworkGraph
from metanet.levels import Level
from metanet.registry import Registry

if TYPE_CHECKING:
    from metanet.metanetwork import MetaNetwork


class Head:
    """One kind of metanetwork output. Class attributes say what it builds and what it is:

    - ``node_decoder`` / ``edge_decoders``: decoders back to node / weight features;
    - ``channel_decoder``: the name of a per-channel decoder (``gate_decoder``, ``score_decoder``) or None;
    - ``ranks``: for a learned criterion, the level its scores rank (None: an edit);
    - ``zero_edge_decoders``: its weight corrections start at 0 (it starts as magnitude);
    - ``allocates``: it decodes one logit per dependency group (``MetaNetwork.group_logits``), how
      much of the group a pruning keeps, and neither edits nor ranks.
    """

    name: ClassVar[str]
    node_decoder: ClassVar[bool] = True
    edge_decoders: ClassVar[bool] = True
    channel_decoder: ClassVar[str | None] = None
    ranks: ClassVar[Level | None] = None
    zero_edge_decoders: ClassVar[bool] = False
    allocates: ClassVar[bool] = False

    @property
    def edits(self) -> bool:
        """Does it change the network's weights (rather than rank them or allocate)?"""
        return self.ranks is None and not self.allocates

    @property
    def gates(self) -> bool:
        return self.channel_decoder == "gate_decoder"

    def edit(self, net: "MetaNetwork", graph: NetworkGraph, x: torch.Tensor, e: torch.Tensor) -> NetworkGraph:
        """``graph`` edited from the final node states ``x`` [N, hidden] and edge states ``e`` [E, hidden]."""
        return graph  # a criterion: the network is pruned as it is

    def scores(self, net: "MetaNetwork", graph: NetworkGraph, **inputs):
        raise ValueError(f"this metanetwork's edit is {self.name!r}: it decodes no scores "
                         "(a learned criterion has edit 'scores' or 'weight_scores')")


HEADS: Registry[Head] = Registry("edit")  # the config key that names a head is ``edit``
register = HEADS.register
head = HEADS  # head(name): the head called ``name``; ValueError naming the known ones


@register
class Additive(Head):
    """The paper's edit: every editable feature + r * decoded."""

    name = "additive"

    def edit(self, net, graph, x, e):
        return net._additive(graph, x, e)


@register
class Gate(Head):
    """A per-channel gate decoded from the node states (``metanet.gates``); the additive decoders are
    built (files made so far hold them) but not used."""

    name = "gate"
    channel_decoder = "gate_decoder"

    def edit(self, net, graph, x, e):
        return apply_gates(graph, gate_from_logit(net._gate_logits(graph, x)))


@register
class GatedAdditive(Head):
    """The additive edit, then the gates."""

    name = "gate+additive"
    channel_decoder = "gate_decoder"

    def edit(self, net, graph, x, e):
        return apply_gates(net._additive(graph, x, e), gate_from_logit(net._gate_logits(graph, x)))


@register
class ChannelScores(Head):
    """A learned channel criterion: one score correction per channel (``MetaNetwork.node_scores``,
    ``metanet.scoring``), trained on the curve objective."""

    name = "scores"
    node_decoder = False
    edge_decoders = False
    channel_decoder = "score_decoder"
    ranks = Level.CHANNELS

    def scores(self, net, graph, **inputs):
        return net.node_scores(graph)


@register
class WeightScores(Head):
    """A learned weight criterion: per-weight score corrections decoded from the edge states
    (``MetaNetwork.weight_deltas``, ``metanet.scoring.metanet_weight_scores``)."""

    name = "weight_scores"
    node_decoder = False
    zero_edge_decoders = True
    ranks = Level.WEIGHTS

    def scores(self, net, graph, **inputs):
        return net.weight_deltas(graph)


@register
class GroupAllocation(Head):
    """A learned allocation: one logit per dependency group from its channels' pooled states, the
    whole network's and the target speed-up (``MetaNetwork.group_logits``); the fractions kept are
    the logits shifted onto the target's MACs (``metanet.allocation_fit``). Trained with the
    ``allocation`` objective."""

    name = "allocation"
    node_decoder = False
    edge_decoders = False
    allocates = True

    def scores(self, net, graph, **inputs):
        return net.group_logits(graph, **inputs)


def ranks(metanet, level: Level) -> bool:
    """Is ``metanet`` (or None) a learned criterion ranking at ``level``?"""
    return metanet is not None and metanet.head.ranks is level
