"""The metanetwork: DGL and PyG agree, it is equivariant to channel permutations, starts near
the identity, and refuses graphs it was not built for."""

import pytest
import torch

from conftest import permute_hidden_channels, randomize_state
from metanet import graph_to_network, network_to_graph
from metanet.metanetwork import MetaNetConfig, MetaNetwork, edge_widths_of, load_metanetwork, save_metanetwork
from zoo.arch import build_model, resnet_spec, vgg_spec

X = torch.zeros(1, 3, 16, 16)


def _graph(spec=None, seed=0):
    torch.manual_seed(seed)
    model = randomize_state(build_model(spec or resnet_spec(20, (4, 8, 12), shortcut="identity")), seed)
    return model, network_to_graph(model, X)


def _metanet(graph, **kw):
    torch.manual_seed(1)
    cfg = MetaNetConfig(edge_widths=edge_widths_of([graph]), hidden=16, layers=3, residual=0.1, **kw)
    return MetaNetwork(cfg)


def test_dgl_and_pyg_backends_agree_forward_and_backward():
    _, g = _graph(resnet_spec(20, (4, 8, 12), shortcut="projection"))
    net = _metanet(g)
    outs, grads = {}, {}
    for backend in ("dgl", "pyg"):
        net.backend = backend
        net.zero_grad()
        out = net(g)
        loss = sum((f * torch.arange(f.numel()).reshape(f.shape).sin()).sum() for f in out.edge_feat.values())
        (loss + out.node_feat.sum()).backward()
        outs[backend] = out
        grads[backend] = {k: p.grad.clone() for k, p in net.named_parameters()}
    for t in g.edge_types:
        torch.testing.assert_close(outs["dgl"].edge_feat[t], outs["pyg"].edge_feat[t], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs["dgl"].node_feat, outs["pyg"].node_feat, rtol=1e-5, atol=1e-6)
    for k in grads["dgl"]:
        torch.testing.assert_close(grads["dgl"][k], grads["pyg"][k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,options", [
    ("dgl", {}), ("pyg", {}), ("torch", {}),
    ("dgl", {"shared_directions": True, "edge_norm": False}),  # the paper's GNN details
])
def test_equivariant_to_permuting_hidden_channels(backend, options):
    model, g = _graph()
    net = _metanet(g, backend=backend, **options).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        edited = graph_to_network(net(g), model)
        perm = torch.tensor([2, 0, 3, 1])
        permuted = permute_hidden_channels(build_model(resnet_spec(20, (4, 8, 12), shortcut="identity")), torch.arange(4))
        permuted.load_state_dict(model.state_dict())
        permuted = permute_hidden_channels(permuted, perm).eval()
        torch.testing.assert_close(permuted(x), model(x), rtol=1e-5, atol=1e-5)  # same function
        edited_p = graph_to_network(net(network_to_graph(permuted, X)), permuted)
    unperm = torch.argsort(perm)
    restored = permute_hidden_channels(edited_p, unperm)
    for (k, a), b in zip(edited.state_dict().items(), restored.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(edited.layers[0].conv1.weight, model.layers[0].conv1.weight)


def test_starts_near_the_identity_and_keeps_running_statistics():
    model, g = _graph()
    net = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([g]), hidden=16, layers=2, residual=0.001))
    with torch.no_grad():
        out = net(g)
    rel = (out.edge_feat["k3x3"] - g.edge_feat["k3x3"]).norm() / g.edge_feat["k3x3"].norm()
    assert 0 < rel < 0.05
    assert torch.equal(out.node_feat[:, 2:4], g.node_feat[:, 2:4])  # running mean / var untouched


def test_refuses_graphs_with_unknown_edge_types():
    _, g = _graph()
    net = MetaNetwork(MetaNetConfig(edge_widths={"k3x3": 9}, hidden=8, layers=1))
    with pytest.raises(ValueError, match="edges of type 'identity'.*not built for"):
        net(g)
    with pytest.raises(ValueError, match="backend must be one of"):
        MetaNetwork(MetaNetConfig(backend="jax"))


def test_save_and_load(tmp_path):
    _, g = _graph()
    net = _metanet(g)
    save_metanetwork(net, str(tmp_path / "m.pt"), epoch=3)
    back, extra = load_metanetwork(str(tmp_path / "m.pt"), backend="pyg")
    assert extra == {"epoch": 3} and back.backend == "pyg"
    with torch.no_grad():
        torch.testing.assert_close(back(g).node_feat, net(g).node_feat, rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_metanetwork(str(tmp_path / "nope.pt"))
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a metanetwork file"):
        load_metanetwork(str(tmp_path / "other.pt"))


def test_saves_to_a_uri_as_meta_train_does_for_a_uri_output(tmp_path):
    """``meta_train --out s3://...`` writes the chosen metanetwork through pyarrow's filesystems."""
    _, g = _graph()
    net = _metanet(g)
    save_metanetwork(net, f"file://{tmp_path}/run/metanetwork.pt", epoch=2)  # a folder that does not exist yet
    back, extra = load_metanetwork(str(tmp_path / "run" / "metanetwork.pt"))
    assert extra == {"epoch": 2} and [p.name for p in (tmp_path / "run").iterdir()] == ["metanetwork.pt"]
    for a, b in zip(net.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)


def test_vgg_graph_runs_through_both_backends():
    _, g = _graph(vgg_spec(11, width_mult=0.0625, input_size=16, classifier=(8,)))
    net = _metanet(g)
    with torch.no_grad():
        a = net(g)
        net.backend = "pyg"
        b = net(g)
    torch.testing.assert_close(a.edge_feat["k3x3"], b.edge_feat["k3x3"], rtol=1e-5, atol=1e-6)


def test_shared_directions_use_one_module_per_layer():
    _, g = _graph()
    separate, shared = _metanet(g), _metanet(g, shared_directions=True)
    assert all(layer.reverse_conv is layer.forward_conv for layer in shared.layers)
    conv = sum(p.numel() for p in separate.layers[0].forward_conv.parameters())
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(separate) - count(shared) == conv * len(shared.layers)
