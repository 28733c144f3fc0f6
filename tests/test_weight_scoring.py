"""Weight-level scores: per-weight scores from a metanetwork's edge states (``learned_criterion``
with a ``weight_scores`` head) or optimised per network (``fit_scores`` with a ``WeightMask``), the
weight-level curve objective, and the paper's unstructured (L1) objective."""

import copy

import pytest
import torch

from metanet.graph import network_to_graph
from metanet.meta_training import MetaTrainConfig, make_member, members_step
from metanet.metanetwork import MetaNetConfig, MetaNetwork, edge_widths_of
from metanet.train import TrainConfig, train
from metanet.criteria import criterion
from metanet.curve import curve_loss, fit_scores
from metanet.levels import Level
from metanet.masks import WeightMask, magnitude_base, weight_names
from metanet.scoring import learned_criterion
from metanet.weight_pruning import WeightPruning, make_permanent, sparsify
from zoo.arch import build_model, resnet_spec

X = torch.zeros(1, 1, 8, 8)


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(2)
    model = build_model(resnet_spec(8, (6, 8, 12), in_channels=1, num_classes=10))
    train(model, digits, TrainConfig(steps=150, lr=0.05, batch_size=64, schedule="cosine"))
    return model.eval()


def _net(graph, **kw) -> MetaNetwork:
    return MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([graph]), hidden=16, layers=2, edit="weight_scores",
                                     **kw))


def _masks(model, crit, pruning):
    model = copy.deepcopy(model)
    sparsify(model, pruning, crit)
    return {n: m.weight_mask.clone() for n, m in model.named_modules() if hasattr(m, "weight_mask")}


def test_an_untrained_weight_scores_metanetwork_prunes_as_global_magnitude(trained):
    net = _net(network_to_graph(trained, X))
    learned = learned_criterion(net, trained, X)
    for pruning in (WeightPruning(sparsity=0.8), WeightPruning(nm=(2, 4))):
        ours, magnitude = _masks(trained, learned, pruning), _masks(trained, criterion("magnitude", Level.WEIGHTS), pruning)
        assert ours.keys() == magnitude.keys() and all(torch.equal(ours[k], magnitude[k]) for k in ours)
    with pytest.raises(ValueError, match="decodes no per-weight scores"):
        MetaNetwork(MetaNetConfig(edge_widths=net.config.edge_widths, edit="additive")).weight_deltas(
            network_to_graph(trained, X))


def _held_out_loss(model, scores_by_layer, digits, sparsity=0.9):
    from metanet.curve import batch_stat_copy

    work = batch_stat_copy(model)
    params = dict(work.named_parameters())
    scores = {f"{k}.weight": v for k, v in scores_by_layer.items()}
    x, y = next(iter(digits.batches("val", 256)))
    with torch.no_grad():
        return float(curve_loss(work, WeightMask(model), params, scores, sparsity, x, y, temperature=0.2, mode="soft"))


def test_meta_training_on_the_weight_curve_moves_the_scores_past_magnitude(trained, digits):
    """Gradients flow from the masked network's loss through the soft mask and the graph's edge
    layout into the metanetwork: the training loss falls, and on batches it never trained on the
    objective at its scores is below magnitude's."""
    torch.manual_seed(3)
    graph = network_to_graph(trained, X)
    cfg = MetaTrainConfig(objective="weight_curve", weight_sparsities=(0.9, 0.9), batch_size=128)
    member = make_member("m", trained, graph, cfg)
    assert member.mask.names == weight_names(trained)
    net = _net(graph)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        batches = list(digits.batches("train", 128, shuffle=True, generator=gen, limit=2))
        opt.zero_grad()
        losses.append(members_step(net, [member], batches, 0.5, cfg)["task_loss"])
        opt.step()
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8, losses
    base = {k.removesuffix(".weight"): v for k, v in magnitude_base(dict(trained.named_parameters()),
                                                                     weight_names(trained)).items()}
    learned = learned_criterion(net, trained, X).table
    assert _held_out_loss(trained, learned, digits) < 0.9 * _held_out_loss(trained, base, digits)


def test_per_network_weight_scores_beat_magnitude_on_their_objective(trained, digits):
    mask = WeightMask(trained)
    fitted, _ = fit_scores(trained, digits, (0.9, 0.9), steps=30, batch_size=128, seed=0, masker=mask)
    scores = mask.criterion(fitted).table
    base = {k.removesuffix(".weight"): v for k, v in magnitude_base(dict(trained.named_parameters()),
                                                                     weight_names(trained)).items()}
    assert scores.keys() == base.keys()
    assert _held_out_loss(trained, scores, digits) < 0.9 * _held_out_loss(trained, base, digits)


def test_the_paper_l1_objective_shrinks_the_edited_weights(trained, digits):
    """objective paper_l1: the additive edit's task loss plus l1_reg * sum |w'| over the pruned
    layers; a few steps of meta-training lower that sum on the member."""
    from metanet.graph import graph_to_params

    graph = network_to_graph(trained, X)
    cfg = MetaTrainConfig(objective="paper_l1", l1_reg=0.1)
    member = make_member("m", trained, graph, cfg)
    net = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([graph]), hidden=16, layers=2, residual=0.05))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    batches = list(digits.batches("train", 128, limit=2))

    def l1() -> float:
        with torch.no_grad():
            params = graph_to_params(net(graph), trained)
        return float(sum(params[n].abs().sum() for n in member.mask.names))

    before = l1()
    terms = []
    for _ in range(10):
        opt.zero_grad()
        terms.append(members_step(net, [member], batches, 0.5, cfg))
        opt.step()
    assert terms[0]["sparsity_loss"] == pytest.approx(0.1 * before, rel=1e-3)
    assert l1() < 0.99 * before


def test_pruned_with_learned_scores_then_made_permanent(trained):
    net = _net(network_to_graph(trained, X))
    model = copy.deepcopy(trained)
    report = sparsify(model, WeightPruning(sparsity=0.5, scope="layer"), learned_criterion(net, trained, X))
    make_permanent(model)
    assert report.layers and all(k.split(".")[-1] not in ("weight_orig", "weight_mask") for k in model.state_dict())
