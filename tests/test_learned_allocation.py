"""The learned allocation: a metanetwork with the ``allocation`` head, meta-trained with the
``allocation`` objective, says how many channels each group keeps (a test that fails if its logits
reach the wrong groups or its gradient does not reach the metanetwork)."""

import copy

import pytest
import torch

from metanet.allocation import TOLERANCE, AllocationContext, allocation, speedup_of
from metanet.allocation_fit import learned_kept
from metanet.graph import network_to_graph
from metanet.meta_training import MetaTrainConfig, make_member, members_step
from metanet.metanetwork import MetaNetConfig, MetaNetwork, edge_widths_of
from metanet.prune import prune_allocated, recalibrate_bn
from metanet.train import evaluate, train


def _allocator(graph, layers=2) -> MetaNetwork:
    torch.manual_seed(0)
    return MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([graph]), edit="allocation", hidden=16, layers=layers,
                                     evidence=True))


def _score(model, digits):
    model = copy.deepcopy(model)
    recalibrate_bn(model, (x for x, _ in digits.batches("train", 128, limit=2)))
    return evaluate(model, digits, "val")[0]


def test_an_untrained_allocator_keeps_the_same_fraction_of_every_group(trained, digits):
    x = torch.zeros(digits.input_shape)
    net = _allocator(network_to_graph(trained, x))
    kept = learned_kept(net, trained, x, 3.0)
    assert max(kept.values()) - min(kept.values()) < 1e-9
    amounts = allocation("learned").amounts(trained, x, 3.0, AllocationContext(allocator=net))
    assert abs(speedup_of(trained, x, amounts) / 3.0 - 1) <= TOLERANCE


def test_the_allocation_objective_teaches_an_allocation_that_beats_the_same_fraction_everywhere(trained, digits):
    """Meta-trained on one network (training batches), judged on its validation split after the
    cut and BatchNorm recalibration: the learned allocation keeps more of what the network needs
    than the same fraction of every group (uniform) at the same MACs."""
    x = torch.zeros(digits.input_shape)
    graph = network_to_graph(trained, x)
    cfg = MetaTrainConfig(objective="allocation", allocation_speedups=(3.0, 6.0), batch_size=128)
    member = make_member("m", trained, graph, cfg)
    net = _allocator(graph)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        batches = list(digits.batches("train", 128, shuffle=True, generator=gen, limit=2))
        opt.zero_grad()
        losses.append(members_step(net, [member], batches, float(torch.rand((), generator=gen)), cfg)["task_loss"])
        opt.step()
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    kept = learned_kept(net, trained, x, 5.0)
    assert max(kept.values()) - min(kept.values()) > 0.2  # it moved channels between groups
    context = AllocationContext(allocator=net)
    learned = allocation("learned").amounts(trained, x, 5.0, context)
    uniform = allocation("uniform").amounts(trained, x, 5.0, context)
    assert abs(speedup_of(trained, x, learned) / 5.0 - 1) <= TOLERANCE
    at = {name: _score(prune_allocated(copy.deepcopy(trained), x, a).model, digits)
          for name, a in (("learned", learned), ("uniform", uniform))}
    assert at["learned"] > at["uniform"] + 0.05, at


def test_allocation_heads_are_refused_where_they_do_not_fit(trained, digits):
    x = torch.zeros(digits.input_shape)
    graph = network_to_graph(trained, x)
    with pytest.raises(ValueError, match="'learned' reads an allocation metanetwork"):
        allocation("learned").amounts(trained, x, 2.0, AllocationContext())
    scores = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([graph]), edit="scores", hidden=8, layers=0))
    with pytest.raises(ValueError, match="edit is 'scores': it decodes no allocation"):
        learned_kept(scores, trained, x, 2.0)
    with pytest.raises(ValueError, match="edit is 'allocation': it decodes no channel scores"):
        _allocator(graph).node_scores(graph)
    with pytest.raises(ValueError, match="allocation_speedups must be two speed-ups above 1"):
        MetaTrainConfig(objective="allocation", allocation_speedups=(4.0, 2.0))


def test_checkpoints_and_diagnostics_are_judged_under_the_learned_allocation(trained, digits):
    """``selection.score`` (either score) and ``mean_diagnostics`` prune an allocation metanetwork's
    validation members under its own allocation: their numbers are the learned allocation's, not
    uniform's (a metanetwork whose logits differ by group, so the two allocations differ)."""
    from dataclasses import replace

    from metanet.diagnostics import curve_auc, mean_diagnostics, pruning_curve
    from metanet.methods import MAGNITUDE
    from metanet.recipe import prune_to_targets
    from metanet.selection import score, selection_recipe

    x = torch.zeros(digits.input_shape)
    net = _allocator(network_to_graph(trained, x), layers=1)
    torch.nn.init.normal_(net.allocation_decoder[-1].weight, std=20.0, generator=torch.Generator().manual_seed(0))
    kept = learned_kept(net, trained, x, 3.0)
    assert max(kept.values()) - min(kept.values()) > 0.05
    recipe = selection_recipe({"batch_size": 128, "augment": False}, steps=0, target=3.0)
    learned = replace(recipe, allocation="learned")

    def val_acc(run, allocator=None):
        [(_, record)] = prune_to_targets(trained, digits, MAGNITUDE, run, [3.0], report_test=False, allocator=allocator)
        return record["val_acc"]

    assert score(net, [trained], digits, recipe, "recipe") == val_acc(learned, net) != val_acc(recipe)
    area = curve_auc(pruning_curve(trained, digits, learned, allocator=net))
    assert score(net, [trained], digits, recipe, "auc") == area != curve_auc(pruning_curve(trained, digits, recipe))
    assert mean_diagnostics(net, [trained], digits, recipe)["auc"] == area


def test_a_criterion_is_scored_inside_the_allocation_an_allocation_metanetwork_gives(trained, digits):
    """A Tune trial that draws ``allocation: learned`` scores its criterion with the shipped
    allocation metanetwork deciding the widths: ``score(..., allocator=)`` is ``meta`` pruned under
    that allocation, not under uniform's."""
    from dataclasses import replace

    from metanet.metanetwork import load_metanetwork
    from metanet.recipe import prune_to_targets
    from metanet.selection import score, selection_recipe
    from metanet.sources import ALLOCATION, CRITERION, resolve

    criterion_net = load_metanetwork(resolve(None, CRITERION).path)[0]
    allocator = load_metanetwork(resolve(None, ALLOCATION).path)[0]
    recipe = selection_recipe({"batch_size": 128, "augment": False}, steps=0, target=3.0)
    learned = replace(recipe, allocation="learned")

    def val_acc(run, allocator=None):
        [(_, record)] = prune_to_targets(trained, digits, "meta", run, [3.0], criterion_net, report_test=False,
                                         allocator=allocator)
        return record["val_acc"]

    inside = score(criterion_net, [trained], digits, learned, "recipe", allocator=allocator)
    assert inside == val_acc(learned, allocator) != val_acc(recipe) == score(criterion_net, [trained], digits, recipe)
