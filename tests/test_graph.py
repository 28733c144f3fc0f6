"""Network <-> graph: exact round trips, the graph's structure, gradients, DGL/PyG views, errors."""

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

from conftest import assert_same_state, randomize_state
from metanet import (GraphMismatchError, NetworkGraph, UnsupportedNetworkError, graph_to_network,
                     graph_to_params, network_to_graph)
from zoo.arch import arch_spec, build_model, resnet_spec, vgg_spec

CIFAR = (2, 3, 32, 32)


def cases():
    out = []
    for depth in (20, 32, 56, 110):
        for shortcut in ("identity", "projection"):
            out.append((f"resnet{depth}-{shortcut}", lambda d=depth, s=shortcut: build_model(resnet_spec(d, shortcut=s)), CIFAR))
    for depth in (11, 16, 19):
        out.append((f"vgg{depth}bn", lambda d=depth: build_model(vgg_spec(d, classifier=(64,))), CIFAR))
    out += [
        ("resnet20-gray", lambda: build_model(resnet_spec(20, (8, 12, 20), in_channels=1)), (2, 1, 8, 8)),
        ("mlp", lambda: build_model({"family": "mlp", "in_features": 64, "hidden": [32, 16], "num_classes": 10}), (2, 64)),
        ("mlp-images", lambda: build_model({"family": "mlp", "in_features": 64, "hidden": [32], "num_classes": 10}), (2, 1, 8, 8)),
        ("cnn", lambda: build_model({"family": "cnn", "widths": [8, 16], "hidden": [32], "in_channels": 1,
                                     "num_classes": 10, "input_size": 8}), (2, 1, 8, 8)),
        ("tv-resnet18", lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)),
        ("tv-resnet50", lambda: torchvision.models.resnet50(num_classes=10), (2, 3, 64, 64)),
        ("tv-vgg11_bn", lambda: torchvision.models.vgg11_bn(num_classes=10), (2, 3, 32, 32)),
    ]
    return out


@pytest.mark.parametrize("name,make,shape", cases(), ids=[c[0] for c in cases()])
def test_round_trip_is_exact(name, make, shape):
    model = randomize_state(make())
    x = torch.randn(shape)
    graph = network_to_graph(model, x)
    rebuilt = graph_to_network(graph, model)
    assert rebuilt is not model
    assert_same_state(model, rebuilt)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    # the graph owns its features: changing the model afterwards does not change the graph
    before = {t: f.clone() for t, f in graph.edge_feat.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[t], graph.edge_feat[t]) for t in before)


def test_rebuilt_network_is_independent():
    model = randomize_state(build_model(resnet_spec(20)))
    rebuilt = graph_to_network(network_to_graph(model, torch.zeros(CIFAR)), model)
    with torch.no_grad():
        rebuilt.conv1.weight.zero_()
    assert not torch.equal(model.conv1.weight, rebuilt.conv1.weight)
    assert all(p.requires_grad for p in rebuilt.parameters())


def test_attached_statistics_move_with_the_graph_and_not_to_other_weights():
    """Calibration statistics are a field of the graph: ``to`` and a batch of graphs keep them,
    ``with_features`` (other weights) drops them, and a graph without them says so."""
    from metanet.graph.batch import batch_graphs
    from metanet.scoring import attach_statistics

    model = randomize_state(build_model(resnet_spec(8, (4, 6, 8))))
    graph = network_to_graph(model, torch.zeros(CIFAR))
    assert graph.statistics is None
    stats = torch.randn(graph.num_nodes, 6)
    attach_statistics(graph, stats)
    assert torch.equal(graph.to("cpu").statistics, stats)
    assert graph.with_features(graph.node_feat, graph.edge_feat).statistics is None
    assert torch.equal(batch_graphs([graph, graph]).graph.statistics, torch.cat([stats, stats]))
    assert batch_graphs([graph, network_to_graph(model, torch.zeros(CIFAR))]).graph.statistics is None


def _conv_count(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_graph_structure_of_a_resnet():
    model = randomize_state(build_model(resnet_spec(20, shortcut="identity")))
    g = network_to_graph(model, torch.zeros(CIFAR))
    layers = _conv_count(model)
    out_channels = sum(m.weight.shape[0] for m in layers)
    assert g.num_nodes == 3 + out_channels
    assert g.edge_types == ("identity", "k1x1", "k3x3")
    k3 = sum(m.weight.shape[0] * m.weight.shape[1] for m in layers if getattr(m, "kernel_size", None) == (3, 3))
    k1 = sum(m.weight.shape[0] * m.weight.shape[1] for m in layers if getattr(m, "kernel_size", (1, 1)) == (1, 1))
    assert g.edge_counts["k3x3"] == k3 and g.edge_counts["k1x1"] == k1
    # one identity edge per channel per residual addition (9 blocks, 16/32/64 wide): not a dense block
    assert g.edge_counts["identity"] == 3 * (16 + 32 + 64)
    assert g.edge_feat["k3x3"].shape[1] == 9 and g.edge_feat["identity"].shape[1] == 1
    assert torch.all(g.edge_feat["identity"] == 1)
    assert g.num_edges == sum(g.edge_counts.values()) == g.src.numel() == g.dst.numel()
    # each (out, in) pair is one edge carrying that kernel
    w = model.conv1.weight  # stem: input nodes 0..2 -> nodes 3..18
    a, b = g.edge_offsets()["k3x3"]
    src, dst, feat = g.src[a:b], g.dst[a:b], g.edge_feat["k3x3"]
    for o, i in [(0, 0), (5, 2), (15, 1)]:
        e = int(((src == i) & (dst == 3 + o)).nonzero())
        assert torch.equal(feat[e], w[o, i].reshape(-1))
    # BN parameters are node features of the channel they normalise
    assert torch.equal(g.node_feat[3:19, 0], model.bn1.weight.detach())
    assert torch.equal(g.node_feat[3:19, 3], model.bn1.running_var)
    # the classifier's nodes are the last ones, one per class, with the Linear bias as feature
    assert torch.equal(g.node_feat[-10:, 4], model.fc.bias.detach())
    assert torch.equal(g.node_feat[-10:, :4], torch.tensor([1.0, 0, 0, 1]).repeat(10, 1))
    # identity edges end at the deeper branch (a block's conv2), never at a 1x1 projection
    a, b = g.edge_offsets()["identity"]
    ends = g.dst[a:b]
    assert ends.unique().numel() == ends.numel()
    k3_ends, k1_ends = g.dst[slice(*g.edge_offsets()["k3x3"])], g.dst[slice(*g.edge_offsets()["k1x1"])]
    assert bool(torch.isin(ends, k3_ends).all()) and not bool(torch.isin(ends, k1_ends).any())


def test_linear_on_a_flattened_map_gets_spatial_kernels():
    model = randomize_state(build_model({"family": "cnn", "widths": [4, 6], "hidden": [], "in_channels": 1,
                                         "num_classes": 3, "input_size": 8}))
    g = network_to_graph(model, torch.zeros(1, 1, 8, 8))
    assert g.edge_counts["k2x2"] == 3 * 6  # Linear(6*2*2 -> 3): one edge per (class, channel)
    fc = model.net[-1]
    a, b = g.edge_offsets()["k2x2"]
    e = int(((g.src[a:b] == 1 + 4 + 5) & (g.dst[a:b] == 1 + 4 + 6 + 2)).nonzero())
    assert torch.equal(g.edge_feat["k2x2"][e], fc.weight[2, 5 * 4:6 * 4])


def test_projection_shortcut_is_ordinary_edges_with_its_own_bn():
    model = randomize_state(build_model(resnet_spec(20, shortcut="projection")))
    g = network_to_graph(model, torch.zeros(CIFAR))
    proj = [m for n, m in model.named_modules() if n.endswith("shortcut.0")]
    assert g.edge_counts["k1x1"] == sum(m.weight.shape[0] * m.weight.shape[1] for m in proj) + 64 * 10
    assert g.num_nodes == 3 + sum(m.weight.shape[0] for m in _conv_count(model))


@pytest.mark.parametrize("family", ["resnet", "vgg"])
def test_networks_pruned_to_uneven_widths(family):
    spec = resnet_spec(20) if family == "resnet" else vgg_spec(11, width_mult=0.25, classifier=(32,))
    model = build_model(spec)
    x = torch.randn(CIFAR)
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.RandomImportance(),
                                       pruning_ratio=0.4, global_pruning=True,
                                       ignored_layers=[_conv_count(model)[-1]])
    pruner.step()
    widths = {m.weight.shape[0] for m in _conv_count(model)}
    assert len(widths) > 3  # uneven
    model = randomize_state(model)
    rebuilt = graph_to_network(network_to_graph(model, x), model)
    assert_same_state(model, rebuilt)
    # the spec read back from the pruned module rebuilds the same shapes, so the zoo can store it
    fresh = build_model(arch_spec(model))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert_same_state(model, graph_to_network(network_to_graph(model, x), fresh))


def test_graph_to_params_is_differentiable():
    model = randomize_state(build_model(resnet_spec(20, (4, 8, 8))))
    x = torch.randn(4, 3, 16, 16)
    g = network_to_graph(model, x)
    node = g.node_feat.clone().requires_grad_()
    edges = {t: f.clone().requires_grad_() for t, f in g.edge_feat.items()}
    params = graph_to_params(g.with_features(node, edges), model)
    # a linear functional of the parameters: its gradient w.r.t. the graph is known exactly
    coeffs = {k: torch.randn(v.shape) for k, v in params.items() if v.is_floating_point()}
    loss = sum((params[k] * c).sum() for k, c in coeffs.items())
    grad_node, grad_k3 = torch.autograd.grad(loss, [node, edges["k3x3"]])
    # gradient of the stem conv's weight lands on its edges, of bn1.weight on its nodes' column 0
    n = model.conv1.weight.numel() // 9
    assert torch.equal(grad_k3[:n], coeffs["conv1.weight"].reshape(n, 9))
    assert torch.equal(grad_node[3:3 + 4, 0], coeffs["bn1.weight"])
    assert torch.equal(grad_node[3:3 + 4, 1], coeffs["bn1.bias"])
    # running statistics are buffers: detached copies, no gradient, not aliasing the graph
    assert torch.equal(grad_node[:, 2:4], torch.zeros_like(grad_node[:, 2:4]))
    assert not params["bn1.running_mean"].requires_grad
    assert set(params) == set(model.state_dict())
    # and through the network itself
    model.train()  # batch statistics; the running ones are updated in the detached copies
    out = torch.func.functional_call(model, graph_to_params(g.with_features(node, edges), model), (x,))
    out.square().mean().backward()
    assert torch.equal(node[:, 2:4].detach(), g.node_feat[:, 2:4])
    assert edges["k3x3"].grad is not None and edges["k3x3"].grad.abs().sum() > 0
    assert node.grad is not None and node.grad[:, 0].abs().sum() > 0


def test_dgl_and_pyg_views_are_the_same_graph():
    model = randomize_state(build_model(resnet_spec(20, shortcut="projection")))
    g = network_to_graph(model, torch.zeros(CIFAR))
    dg = g.to_dgl()
    pg = g.to_pyg()
    assert dg.num_nodes() == pg.num_nodes == g.num_nodes
    assert dg.num_edges() == pg.edge_index.shape[1] == g.num_edges
    assert torch.equal(dg.ndata["feat"], pg.x)
    for i, t in enumerate(g.edge_types):
        s, d = dg.edges(etype=t)
        mask = pg.edge_type == i
        assert torch.equal(s, pg.edge_index[0, mask]) and torch.equal(d, pg.edge_index[1, mask])
        assert torch.equal(dg.edges[t].data["feat"], pg[f"edge_attr_{t}"])
    for back in (NetworkGraph.from_dgl(dg), NetworkGraph.from_pyg(pg)):
        assert_same_state(model, graph_to_network(back, model))
    assert_same_state(model, graph_to_network(dg, model))  # DGL graphs are accepted directly


class LearnedActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.act = nn.PReLU(8)

    def forward(self, x):
        return self.act(self.stem(x))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):  # x: [batch, 8 channels, 5 positions]
        tokens = x.permute(0, 2, 1)
        return self.attn(self.proj(tokens), tokens, tokens)[0]  # cross-attention: the query differs


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


class CustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return torch.fft.fft2(self.conv(x)).real


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return self.fc(-x)


@pytest.mark.parametrize("model,shape,needle", [
    (LearnedActivation(), (1, 3, 8, 8), ["'act'", "PReLU", "learned activation"]),
    (Attention(), (1, 8, 5), ["'attn'", "only self-attention"]),
    (Recurrent(), (1, 5, 8), ["'lstm'", "LSTM", "recurrent"]),
    (CustomOp(), (1, 3, 8, 8), ["fft2", "no rule"]),
    (DataDependent(), (1, 4), ["torch.fx cannot trace", "control flow"]),
], ids=["prelu", "attention", "lstm", "custom-op", "control-flow"])
def test_unsupported_networks_get_one_clear_error(model, shape, needle):
    with pytest.raises(UnsupportedNetworkError) as err:
        network_to_graph(model, torch.zeros(shape))
    msg = str(err.value)
    assert type(model).__name__ in msg
    for n in needle:
        assert n in msg, msg
    assert "\n" not in msg


def test_graph_of_another_architecture_is_refused():
    a, b = build_model(resnet_spec(20)), build_model(resnet_spec(32))
    g = network_to_graph(a, torch.zeros(CIFAR))
    with pytest.raises(GraphMismatchError, match="does not come from"):
        graph_to_network(g, b)
    narrower = build_model(resnet_spec(20, (16, 32, 48)))
    with pytest.raises(GraphMismatchError):
        graph_to_params(g, narrower)


def test_nan_weights_are_refused():
    model = build_model(resnet_spec(20))
    with torch.no_grad():
        model.layers[3].conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.3\.conv2\.weight has NaN"):
        network_to_graph(model, torch.zeros(CIFAR))
    g = network_to_graph(build_model(resnet_spec(20)), torch.zeros(CIFAR))
    g.edge_feat["k3x3"][7, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        graph_to_network(g, model)


def test_spec_round_trip_and_bad_specs():
    for spec in (resnet_spec(32, shortcut="projection"), vgg_spec(16, width_mult=0.5, input_size=8)):
        assert arch_spec(build_model(spec)) == spec
    with pytest.raises(ValueError, match="6n\\+2"):
        resnet_spec(21)
    with pytest.raises(ValueError, match="unknown architecture family 'transformer'"):
        build_model({"family": "transformer"})
    with pytest.raises(ValueError, match="bad 'resnet' architecture spec"):
        build_model({"family": "resnet", "depth": 20})


class _ChannelScale(nn.Module):
    """A user's module that torch.fx cannot trace through (its forward branches on the data): it
    scales positive-mean activations by a fixed factor, channel by channel."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor if x.mean() > 0 else x


def test_a_user_registers_a_rule_for_their_module_type():
    from metanet.graph import ModuleRule, keep_channels, refuse, register_module_rule
    from metanet.graph.rules import MODULE_RULES

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), _ChannelScale(0.5), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with pytest.raises(UnsupportedNetworkError, match="torch.fx cannot trace its forward"):
        network_to_graph(net, torch.zeros(1, 1, 8, 8))
    try:  # a module type with a rule is a leaf of the trace: the rule says what it is
        @register_module_rule(_ChannelScale)
        class ChannelScaleRule(ModuleRule):
            def apply(self, t, node, name, module, x, in_shape, shape):
                return keep_channels(t, node, x, in_shape, shape)

        graph = network_to_graph(net, torch.zeros(1, 1, 8, 8))
        assert graph.num_nodes == 1 + 4 + 3 and graph.edge_counts == {"k1x1": 12, "k3x3": 4}
        assert_same_state(graph_to_network(graph, net), net)
        refuse(_ChannelScale, "a fixed scale has no place here")  # replaces the rule; the cached layout is dropped
        with pytest.raises(UnsupportedNetworkError, match=r"layer '2' \(_ChannelScale\) in module '2': a fixed scale has no place"):
            network_to_graph(net, torch.zeros(1, 1, 8, 8))
    finally:
        MODULE_RULES.pop(_ChannelScale, None)


def test_a_subclass_inherits_its_base_layers_rule():
    class MyConv(nn.Conv2d):
        pass

    net = nn.Sequential(MyConv(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    graph = network_to_graph(net, torch.zeros(1, 1, 8, 8))
    assert graph.edge_counts == {"k1x1": 12, "k3x3": 4}
    assert_same_state(graph_to_network(graph, net), net)


def test_the_layout_cache_is_bounded_by_edges(monkeypatch):
    import metanet.graph.convert as convert

    monkeypatch.setattr(convert, "_LAYOUTS", type(convert._LAYOUTS)())
    small = build_model(resnet_spec(8, (4, 4, 4)))
    big = build_model(resnet_spec(8, (8, 8, 8)))
    edges = {m: network_to_graph(m, torch.zeros(CIFAR)).num_edges for m in (small, big)}
    convert.clear_layout_cache()
    monkeypatch.setattr(convert, "_LAYOUT_CACHE_EDGES", edges[small] + edges[big] - 1)
    network_to_graph(small, torch.zeros(CIFAR))
    network_to_graph(big, torch.zeros(CIFAR))  # both would exceed the bound: the older one goes
    assert [layout.src.numel() for layout in convert._LAYOUTS.values()] == [edges[big]]
    network_to_graph(build_model(resnet_spec(8, (16, 16, 16))), torch.zeros(CIFAR))  # alone over it: kept
    assert len(convert._LAYOUTS) == 1
