"""The networks users bring, in small variants: grouped and depthwise convolutions (MobileNet,
ResNeXt, RegNet), Squeeze-and-Excitation gating (MobileNetV3, EfficientNet, RegNet-Y), stochastic
depth (EfficientNet), norms of already normalised channels (DenseNet), channel shuffle and splits
(ShuffleNet), GroupNorm, a ViT (attention, LayerNorm, class token, position embedding: 2 blocks,
patch 8 on 32x32) and ConvNeXt blocks (channels-last LayerNorm and Linear, layer scale): exact round trip, metanetwork forward and backward on every backend,
the sparsity gradient equal to Torch-Pruning's, pruning to 2x and reloading."""

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn
from torchvision.models import efficientnet as ef
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.vision_transformer import VisionTransformer
from torchvision.models import regnet as rn
from torchvision.models.resnet import Bottleneck, ResNet

from conftest import assert_same_state, randomize_state
from metanet import graph_to_network, network_to_graph
from metanet.dense_passing import DenseGroup, find_blocks
from metanet.metanetwork import MetaNetConfig, MetaNetwork, edge_widths_of
from metanet.prune import PruneSettings, load_pruned, prune_to_speedup, save_pruned
from metanet.sparsity import GroupSparsity, UnprunableNetworkError, classifier_of, importance, torch_pruning_options


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


FAMILIES = {
    "mobilenet_v2": lambda: torchvision.models.MobileNetV2(num_classes=10, width_mult=0.25, inverted_residual_setting=[
        [1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2]]),
    "mobilenet_v3": lambda: torchvision.models.mobilenet_v3_small(width_mult=0.25, num_classes=10),
    "densenet": lambda: torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8,
                                                    bn_size=2, num_classes=10),
    "efficientnet": lambda: ef.EfficientNet([ef.MBConvConfig(4, 3, 1, 8, 8, 1), ef.MBConvConfig(4, 3, 2, 8, 16, 2)],
                                            0.2, stochastic_depth_prob=0.2, num_classes=10),
    "efficientnet_v2": lambda: ef.EfficientNet([ef.FusedMBConvConfig(1, 3, 1, 8, 8, 1),
                                                ef.MBConvConfig(4, 3, 2, 8, 16, 1)], 0.2, num_classes=10,
                                               last_channel=32),
    "regnet_y": lambda: rn.RegNet(rn.BlockParams.from_init_params(depth=3, w_0=8, w_a=8.0, w_m=2.0, group_width=4,
                                                                  se_ratio=0.25), stem_width=8, num_classes=10),
    "resnext": lambda: ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=2, num_classes=10),
    "shufflenet": lambda: torchvision.models.ShuffleNetV2([2, 2, 2], [8, 16, 32, 64, 64], num_classes=10),
    "groupnorm": GroupNormNet,
    "vit": lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                                     num_classes=10),
    "convnext": lambda: ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.1,
                                 num_classes=10),
}
X = (2, 3, 32, 32)


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_is_exact(name):
    model = randomize_state(FAMILIES[name]())
    x = torch.randn(X)
    graph = network_to_graph(model, x)
    rebuilt = graph_to_network(graph, model)
    assert_same_state(model, rebuilt)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def test_grouped_and_depthwise_convolutions_have_only_their_groups_edges():
    conv = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2, bias=False), nn.Conv2d(8, 8, 3, groups=8, bias=False))
    graph = network_to_graph(conv.eval(), torch.zeros(1, 4, 8, 8))
    assert graph.edge_counts == {"k3x3": 8 * 2 + 8}  # 2 inputs per grouped output, 1 per depthwise output
    src, dst = graph.src.tolist(), graph.dst.tolist()
    # grouped: outputs 4..7 (group 0) read inputs 0, 1; outputs 8..11 (group 1) read inputs 2, 3
    assert list(zip(src[:16], dst[:16])) == [(i, 4 + o) for o in range(8) for i in ((0, 1) if o < 4 else (2, 3))]
    assert list(zip(src[16:], dst[16:])) == [(4 + c, 12 + c) for c in range(8)]  # depthwise: channel to channel
    # each group is a dense block of the plain-PyTorch backend: one stacked group of two [4, 2] blocks
    dense = [p for p in find_blocks(graph.src, graph.dst, list(graph.edge_offsets().values()))
             if isinstance(p, DenseGroup)]
    assert [(p.B, p.R, p.C) for p in dense] == [(2, 4, 2)]


def test_squeeze_excitation_and_dense_norms_are_structural_edges():
    se = network_to_graph(randomize_state(FAMILIES["mobilenet_v3"]()), torch.zeros(X))
    dense = network_to_graph(randomize_state(FAMILIES["densenet"]()), torch.zeros(X))
    assert "gate" in se.edge_types and "norm" in dense.edge_types
    for graph, t in ((se, "gate"), (dense, "norm")):
        assert bool((graph.edge_feat[t] == 1).all())
    # a decoder per weight edge type, none for the operations
    net = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([se, dense]), hidden=8, layers=1))
    assert not {"gate", "norm", "identity"} & set(net.edge_decoders)


@pytest.mark.parametrize("backend", ["torch", "dgl", "pyg"])
def test_metanetwork_runs_forward_and_backward(backend):
    graphs = [network_to_graph(randomize_state(make()), torch.zeros(X)) for make in FAMILIES.values()]
    torch.manual_seed(0)
    net = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of(graphs), hidden=8, layers=2, residual=0.1,
                                    backend=backend))
    outputs = net(graphs)
    loss = sum(o.node_feat.square().sum() + sum(f.square().sum() for f in o.edge_feat.values()) for o in outputs)
    loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())
    if backend == "torch":  # equal to the reference on every family
        ref = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of(graphs), hidden=8, layers=2, residual=0.1,
                                        backend="pyg"))
        ref.load_state_dict(net.state_dict())
        for g, out in zip(graphs, outputs):
            expected = ref(g)
            torch.testing.assert_close(out.node_feat, expected.node_feat, rtol=1e-4, atol=1e-5)
            for t in g.edge_types:
                torch.testing.assert_close(out.edge_feat[t], expected.edge_feat[t], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3", "densenet", "groupnorm", "vit", "convnext"])
def test_sparsity_gradient_equals_group_norm_pruner_regularize(name):
    torch.manual_seed(0)
    model = randomize_state(FAMILIES[name]())
    x = torch.randn(1, 3, 32, 32)
    loss = GroupSparsity(model, x, reg=0.7, alpha=16)(dict(model.named_parameters()))
    loss.backward()
    ours = {k: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for k, p in model.named_parameters()}
    pruner = tp.pruner.GroupNormPruner(model, x, importance=importance(), reg=0.7, ignored_layers=[classifier_of(model)],
                                       **torch_pruning_options(model))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    pruner.regularize(model, alpha=16)
    for k, p in model.named_parameters():
        torch.testing.assert_close(ours[k], p.grad, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3", "densenet", "regnet_y", "efficientnet", "vit",
                                  "convnext"])
def test_prunes_to_2x_and_reloads(name, tmp_path):
    torch.manual_seed(0)
    model = randomize_state(FAMILIES[name]())
    template = FAMILIES[name]().eval()
    x = torch.randn(1, 3, 32, 32)
    result = prune_to_speedup(model, x, 2.0, PruneSettings(steps=40))
    assert result.speedup >= 2.0
    save_pruned(model, str(tmp_path / "pruned.pt"))
    loaded, _ = load_pruned(str(tmp_path / "pruned.pt"), template)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
    # the pruned network is a network of the graph too
    rebuilt = graph_to_network(network_to_graph(model, x), model)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_a_grouped_convolutions_input_channel_slice_is_the_weights_that_read_it():
    # Torch-Pruning 1.6's regularize fails on grouped convolutions: check the slices directly
    model = randomize_state(FAMILIES["resnext"]())
    sparsity = GroupSparsity(model, torch.randn(1, 3, 32, 32), reg=0.7, alpha=16)
    params = dict(model.named_parameters())
    assert sparsity.col_groups, "the ResNeXt has grouped convolutions"
    for name, groups in sparsity.col_groups.items():
        w = params[name]
        per_group_out, per_group_in = w.shape[0] // groups, w.shape[1]
        idx, _ = sparsity.cols[name]
        only = GroupSparsity.__new__(GroupSparsity)  # the same maps, this one layer's columns only
        only.rows, only.vecs, only.col_groups, only.cols = {}, {}, sparsity.col_groups, {name: sparsity.cols[name]}
        norms, _ = only.slice_norms(params)
        for k, c in enumerate(idx.tolist()):
            g, j = divmod(c, per_group_in)
            expected = w[g * per_group_out:(g + 1) * per_group_out, j].square().sum()
            torch.testing.assert_close(norms[k], expected)


def test_a_network_torch_pruning_mis_maps_gets_one_clear_error():
    # ShuffleNet converts exactly (above), but Torch-Pruning 1.6 indexes past its layers' channels
    model = randomize_state(FAMILIES["shufflenet"]())
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(UnprunableNetworkError, match="ShuffleNetV2.*cannot be pruned"):
        GroupSparsity(model, x)
    with pytest.raises(UnprunableNetworkError, match="ShuffleNetV2.*not prunable"):
        prune_to_speedup(model, x, 2.0, PruneSettings(steps=10))


def test_a_vits_attention_keeps_heads_together_and_its_tokens_are_weights():
    model = randomize_state(FAMILIES["vit"]())
    graph = network_to_graph(model, torch.zeros(X))
    attn = model.encoder.layers[0].self_attention
    heads, head_dim = attn.num_heads, attn.head_dim
    # per layer, every value channel hears the 2 * head_dim query and key channels of its head
    assert graph.edge_counts["attention"] == len(model.encoder.layers) * heads * head_dim * 2 * head_dim
    a, b = graph.edge_offsets()["attention"]
    first = slice(a, a + heads * head_dim * 2 * head_dim)
    src = graph.src[first].view(heads, head_dim, 2 * head_dim)
    assert all(len(set(src[h].tolist()[0])) == 2 * head_dim for h in range(heads))
    assert len(set(src[0].reshape(-1).tolist()) & set(src[1].reshape(-1).tolist())) == 0  # heads do not mix
    # the class token and the position embedding are edges (weights the metanetwork edits), one per channel
    tokens = (32 // 8) ** 2 + 1
    assert graph.edge_counts["token1"] == graph.edge_counts[f"embed{tokens}"] == model.hidden_dim
    torch.testing.assert_close(graph.edge_feat[f"embed{tokens}"], model.encoder.pos_embedding[0].t())
    net = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([graph]), hidden=8, layers=1))
    assert {"token1", f"embed{tokens}"} <= set(net.edge_decoders) and "attention" not in net.edge_decoders
