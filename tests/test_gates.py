"""Per-channel gates: a gate scales exactly one channel's output, the layer grouping and the
evidence features are right, the gate-editing metanetwork starts as the identity and is
equivariant, and optimising gates on one network shrinks some channels more than others."""

import copy

import pytest
import torch

from conftest import permute_hidden_channels, randomize_state
from metanet import graph_to_network, network_to_graph
from metanet.gates import (EVIDENCE_FEATURES, apply_gates, channel_evidence, gatable, gate_from_logit, layer_ids,
                           optimise_gates)
from metanet.graph import graph_to_params
from metanet.metanetwork import MetaNetConfig, MetaNetwork, edge_widths_of
from metanet.sparsity import GroupSparsity
from zoo.arch import build_model, resnet_spec

X = torch.zeros(1, 3, 16, 16)


def _model(seed=0, shortcut="identity"):
    torch.manual_seed(seed)
    return randomize_state(build_model(resnet_spec(8, (4, 8, 12), shortcut=shortcut)), seed)


def _bn1_output(model, x):
    out = {}
    handle = model.layers[0].bn1.register_forward_hook(lambda m, i, o: out.setdefault("y", o))
    model(x)
    handle.remove()
    return out["y"]


def _node_of_bn1_channel(model, graph, channel):
    """The graph node holding layers.0.bn1's channel ``channel``: its bn_weight column matches."""
    w = model.layers[0].bn1.weight.detach()
    matches = (graph.node_feat[:, 0] == w[channel]).nonzero().flatten()
    assert matches.numel() == 1
    return int(matches[0])


def test_a_gate_scales_exactly_its_channel_in_eval_mode():
    model = _model()
    graph = network_to_graph(model, X)
    node = _node_of_bn1_channel(model, graph, 2)
    gate = torch.ones(graph.num_nodes)
    gate[node] = 0.3
    gated = graph_to_network(apply_gates(graph, gate), model).eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        before, after = _bn1_output(model, x), _bn1_output(gated, x)
    # exact up to BatchNorm's eps (the running variance shrinks by 0.09, eps does not)
    torch.testing.assert_close(after[:, 2], 0.3 * before[:, 2], rtol=1e-3, atol=1e-4)
    others = [c for c in range(before.shape[1]) if c != 2]
    torch.testing.assert_close(after[:, others], before[:, others])
    # the next layer's input column is gated too: the channel's whole group shrinks
    col = gated.layers[0].conv2.weight[:, 2]
    torch.testing.assert_close(col, 0.3 * model.layers[0].conv2.weight[:, 2])


def test_gates_of_inputs_and_outputs_are_ignored_and_gate_one_is_the_identity():
    model = _model(shortcut="projection")
    graph = network_to_graph(model, X)
    mask = gatable(graph)
    assert not mask[:3].any()  # the image's channels
    assert not mask[-10:].any()  # the classifier's outputs
    params = graph_to_params(apply_gates(graph, torch.where(mask, 1.0, 0.0)), model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(params.get(k, v), v, msg=k)


def test_layer_ids_group_each_layers_channels():
    model = _model()
    graph = network_to_graph(model, X)
    ids = layer_ids(graph)
    node = _node_of_bn1_channel(model, graph, 0)
    same = (ids == ids[node]).nonzero().flatten()
    assert same.numel() == model.layers[0].conv1.out_channels
    assert (graph.node_feat[same, 0] == model.layers[0].bn1.weight.detach().sort().values.reshape(-1, 1)).any(1).all()


def test_evidence_ranks_channels_within_their_layer():
    model = _model()
    graph = network_to_graph(model, X)
    ev = channel_evidence(graph)
    assert ev.shape == (graph.num_nodes, len(EVIDENCE_FEATURES))
    ids = layer_ids(graph)
    rank = ev[:, EVIDENCE_FEATURES.index("row_norm_rank")]
    ratio = ev[:, EVIDENCE_FEATURES.index("row_norm_of_max")]
    layer = ids == ids[_node_of_bn1_channel(model, graph, 0)]
    assert sorted(rank[layer].tolist()) == pytest.approx([i / (layer.sum().item() - 1) for i in range(layer.sum())])
    assert ratio[layer].max() == pytest.approx(1.0)
    # the largest ratio is the highest rank
    assert rank[layer][ratio[layer].argmax()] == pytest.approx(1.0)


def test_gate_metanetwork_starts_as_the_identity_and_is_equivariant():
    model = _model()
    graph = network_to_graph(model, X)
    net = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([graph]), hidden=16, layers=2, edit="gate",
                                    evidence=True))
    params = graph_to_params(net(graph), model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(params.get(k, v), v, msg=k)
    # with a non-zero decoder, permuting a layer's channels permutes their gates
    torch.nn.init.normal_(net.gate_decoder[-1].weight, std=1.0)
    perm = torch.tensor([2, 0, 3, 1])
    permuted = permute_hidden_channels(copy.deepcopy(model), perm)
    g0, g1 = network_to_graph(model, X), network_to_graph(permuted, X)
    with torch.no_grad():
        a, b = net.eval().gate_logits(g0), net.gate_logits(g1)
    nodes = [_node_of_bn1_channel(model, g0, c) for c in range(4)]
    nodes_p = [_node_of_bn1_channel(permuted, g1, c) for c in range(4)]
    torch.testing.assert_close(b[nodes_p], a[nodes][perm], rtol=1e-4, atol=1e-5)
    assert a[nodes].std() > 0  # the gates of one layer differ: the decoder tells its channels apart


def test_additive_metanetwork_has_no_gates():
    graph = network_to_graph(_model(), X)
    net = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([graph]), hidden=8, layers=1))
    with pytest.raises(ValueError, match="no gates"):
        net.gate_logits(graph)
    with pytest.raises(ValueError, match="edit must be one of"):
        MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([graph]), edit="multiply"))


def test_optimised_gates_are_selective(digits):
    from metanet.train import TrainConfig, train

    torch.manual_seed(0)
    model = build_model(resnet_spec(8, (8, 8, 8), in_channels=1, num_classes=10))
    train(model, digits, TrainConfig(steps=60, lr=0.05, batch_size=128))
    x = torch.zeros(digits.input_shape)
    graph = network_to_graph(model.eval(), x)
    gen = torch.Generator().manual_seed(0)
    batches = [list(digits.batches("train", 128, shuffle=True, generator=gen, limit=1)) for _ in range(30)]
    sparsity = GroupSparsity(copy.deepcopy(model), x, reg=0.1, alpha=16)
    gates = gate_from_logit(optimise_gates(model, graph, batches, sparsity, lr=0.2))[gatable(graph)]
    assert model.training is False  # left in the mode it came in
    assert gates.min() < 0.3 and gates.max() > 0.9  # some channels pushed out, others kept


def test_relative_sparsity_ignores_a_uniform_shrink_and_rewards_concentration():
    model = _model()
    sparsity = GroupSparsity(copy.deepcopy(model), X, reg=2.0, alpha=16)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    base = sparsity.relative(params)
    shrunk = sparsity.relative({k: 0.3 * v for k, v in params.items()})
    torch.testing.assert_close(shrunk, base, rtol=1e-5, atol=1e-6)  # scale-free
    assert float(sparsity(params)) > float(sparsity({k: 0.3 * v for k, v in params.items()}))  # the paper's is not
    # its gradient shrinks the group's least important channel and grows its most important one
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    sparsity.relative(leaves).backward()
    conv = "layers.0.conv1.weight"
    radial = (leaves[conv].grad * params[conv]).flatten(1).sum(1)  # > 0: gradient descent shrinks it
    norms, ids = sparsity.slice_norms(params)
    gamma = sparsity.gamma(norms, ids)
    rows, channel_ids = sparsity.rows[conv]
    g = gamma[channel_ids]
    assert radial[rows[g.argmax()]] > 0 > radial[rows[g.argmin()]]
    # the group weights make every group's share of the plain term start in [1, alpha] * reg / 2
    per_group = sparsity(params, sparsity.group_weights(params)) / sparsity.num_groups
    assert 1.0 * 0.5 * 2.0 <= float(per_group) <= 16 * 0.5 * 2.0


def test_distillation_moves_the_metanetworks_gates_towards_the_targets(digits):
    from metanet.meta_training import MetaTrainConfig, distill, make_member

    model = build_model(resnet_spec(8, (4, 8, 8), in_channels=1)).eval()
    graph = network_to_graph(model, torch.zeros(digits.input_shape))
    cfg = MetaTrainConfig(distill_epochs=30, lr=1e-2)
    member = make_member("m", build_model(resnet_spec(8, (4, 8, 8), in_channels=1)), graph, cfg)
    # out with the weaker half of every layer (by kernel-row norm): a target the evidence can explain
    rank = channel_evidence(graph)[:, EVIDENCE_FEATURES.index("row_norm_rank")]
    target = torch.where(rank < 0.5, -3.0, 0.5)
    net = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([graph]), hidden=16, layers=2, edit="gate",
                                    evidence=True))
    losses = distill(net, [member], [target], cfg, progress=False)
    assert losses[-1] < 0.5 * losses[0]
