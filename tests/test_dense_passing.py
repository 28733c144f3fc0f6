"""The plain-PyTorch message passing over dense blocks (backend 'torch') against the PyG reference."""

import pytest
import torch

from conftest import randomize_state
from metanet import network_to_graph
from metanet.dense_passing import DenseGroup, SparseRun, find_blocks
from metanet.metanetwork import MetaNetConfig, MetaNetwork, edge_widths_of
from metanet.prune import PruneSettings, prune_to_speedup
from zoo.arch import build_model, resnet_spec, vgg_spec


def _pruned_uneven():
    model = build_model(resnet_spec(20, (8, 12, 16), shortcut="projection")).eval()
    prune_to_speedup(model, torch.zeros(1, 3, 16, 16), 2.0, PruneSettings(global_pruning=True, steps=20))
    return model


NETWORKS = {
    "resnet-identity": lambda: build_model(resnet_spec(20, (4, 8, 12), shortcut="identity")),
    "resnet-projection": lambda: build_model(resnet_spec(20, (4, 8, 12), shortcut="projection")),
    "vgg": lambda: build_model(vgg_spec(11, width_mult=0.0625, input_size=16, classifier=(8,))),
    "cnn-flatten-linear": lambda: build_model({"family": "cnn", "widths": [4, 6], "hidden": [8], "in_channels": 3,
                                               "num_classes": 5, "input_size": 16}),
    "pruned-uneven": _pruned_uneven,
}


def _run(graph, backend, dtype):
    torch.manual_seed(1)
    net = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([graph]), hidden=16, layers=3, residual=0.1,
                                    backend=backend)).to(dtype)
    g = graph.with_features(graph.node_feat.to(dtype), {t: f.to(dtype) for t, f in graph.edge_feat.items()})
    out = net(g)
    weights = [torch.arange(f.numel(), dtype=dtype).reshape(f.shape).sin() for f in out.edge_feat.values()]
    loss = sum((f * w).sum() for f, w in zip(out.edge_feat.values(), weights)) + out.node_feat.square().sum()
    loss.backward()
    return out, {k: p.grad for k, p in net.named_parameters()}


@pytest.mark.parametrize("dense_min_edges", ["0", "default"])
@pytest.mark.parametrize("name", NETWORKS)
def test_agrees_with_pyg_in_outputs_and_gradients(name, dense_min_edges, monkeypatch):
    """Every group dense (threshold 0), and the default: these small networks' groups edge by edge."""
    import metanet.dense_passing as dp

    if dense_min_edges != "default":
        monkeypatch.setenv(dp.DENSE_MIN_EDGES_ENV, dense_min_edges)
    torch.manual_seed(0)
    model = randomize_state(NETWORKS[name](), 0)
    graph = network_to_graph(model.eval(), torch.zeros(1, 3, 16, 16))
    # float32 outputs to 1e-5; gradients in float64, where summation order does not matter: in
    # float32 the std's mean-of-squares minus squared-mean cancels and the two orders differ by ~1e-4
    for dtype, check_grads in ((torch.float32, False), (torch.float64, True)):
        ref, ref_grads = _run(graph, "pyg", dtype)
        out, grads = _run(graph, "torch", dtype)
        torch.testing.assert_close(out.node_feat, ref.node_feat, rtol=1e-5, atol=1e-5)
        for t in graph.edge_types:
            torch.testing.assert_close(out.edge_feat[t], ref.edge_feat[t], rtol=1e-5, atol=1e-5, msg=t)
        if check_grads:
            for k in ref_grads:
                torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-8, msg=k)


def test_blocks_cover_every_edge_once_and_stack_equal_shapes():
    graph = network_to_graph(build_model(resnet_spec(56)).eval(), torch.zeros(1, 3, 32, 32))
    parts = find_blocks(graph.src, graph.dst, list(graph.edge_offsets().values()))
    covered = torch.zeros(graph.num_edges, dtype=torch.int64)
    for p in parts:
        covered[p.start:p.stop] += 1
        if isinstance(p, DenseGroup):  # every edge of the group is (S[b, c] -> D[b, r]) at its position
            src = p.S[:, None, :].expand(p.B, p.R, p.C).reshape(-1)
            dst = p.D[:, :, None].expand(p.B, p.R, p.C).reshape(-1)
            assert torch.equal(graph.src[p.start:p.stop], src) and torch.equal(graph.dst[p.start:p.stop], dst)
    assert bool((covered == 1).all())
    dense = [p for p in parts if isinstance(p, DenseGroup)]
    # a stage's 3x3 convolutions are one stacked group: 18 of 16x16, 17 of 32x32 and of 64x64
    assert sorted((p.B, p.R, p.C) for p in dense if p.B > 1) == [(17, 32, 32), (17, 64, 64), (18, 16, 16)]
    assert all(isinstance(p, SparseRun) for p in parts if p not in dense)
    assert sum(p.stop - p.start for p in parts if isinstance(p, SparseRun)) == graph.edge_counts["identity"]


def test_small_groups_join_the_sparse_runs_and_every_edge_is_covered_once():
    from metanet.dense_passing import DENSE_MIN_EDGES, merge_small_groups

    graph = network_to_graph(build_model(resnet_spec(56)).eval(), torch.zeros(1, 3, 32, 32))
    blocks = find_blocks(graph.src, graph.dst, list(graph.edge_offsets().values()))
    parts = merge_small_groups(blocks, graph.src, graph.dst, DENSE_MIN_EDGES)
    covered = torch.zeros(graph.num_edges, dtype=torch.int64)
    for p in parts:
        covered[p.start:p.stop] += 1
        if isinstance(p, SparseRun):
            assert torch.equal(p.src, graph.src[p.start:p.stop]) and torch.equal(p.dst, graph.dst[p.start:p.stop])
    assert bool((covered == 1).all())
    dense = [p for p in parts if isinstance(p, DenseGroup)]
    assert dense and all(p.stop - p.start >= DENSE_MIN_EDGES for p in dense)  # the stacked stages stay dense
    assert not any(isinstance(a, SparseRun) and isinstance(b, SparseRun) for a, b in zip(parts, parts[1:]))
    assert len(parts) < len(blocks)
    spans = [(type(p), p.start, p.stop) for p in merge_small_groups(blocks, graph.src, graph.dst, 0)]
    assert spans == [(type(p), p.start, p.stop) for p in blocks]  # threshold 0: the blocks as found


def test_the_fused_layer_and_recomputation_give_the_same_result(monkeypatch):
    import metanet.dense_passing as dp

    model = randomize_state(NETWORKS["resnet-projection"](), 0)
    graph = network_to_graph(model.eval(), torch.zeros(1, 3, 16, 16))
    monkeypatch.setenv(dp.DENSE_MIN_EDGES_ENV, "0")  # every group dense: the fused layer runs on each
    ref, ref_grads = _run(graph, "torch", torch.float64)
    monkeypatch.setenv(dp.COMPILE_ENV, "1")
    calls = []
    monkeypatch.setitem(dp._KERNEL, "fn", lambda *args: calls.append(1) or dp.block_layer(*args))  # uncompiled
    out, grads = _run(graph, "torch", torch.float64)  # _run's graph is a new object: a fresh passing cache
    groups = [p for p in find_blocks(graph.src, graph.dst, list(graph.edge_offsets().values()))
              if isinstance(p, DenseGroup)]
    assert len(calls) == 3 * len(groups) > 0  # the fused path ran: once per layer and dense group
    torch.testing.assert_close(out.node_feat, ref.node_feat, rtol=1e-10, atol=1e-12)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-9, atol=1e-12, msg=k)
    monkeypatch.delenv(dp.COMPILE_ENV)
    torch.manual_seed(1)
    net = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([graph]), hidden=16, layers=3, residual=0.1,
                                    backend="torch", recompute=True)).double()
    g = graph.with_features(graph.node_feat.double(), {t: f.double() for t, f in graph.edge_feat.items()})
    out = net(g)
    weights = [torch.arange(f.numel(), dtype=torch.float64).reshape(f.shape).sin() for f in out.edge_feat.values()]
    (sum((f * w).sum() for f, w in zip(out.edge_feat.values(), weights)) + out.node_feat.square().sum()).backward()
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-9, atol=1e-12, msg=k)


def test_without_a_compiler_the_fused_layer_runs_eagerly(monkeypatch):
    import metanet.dense_passing as dp

    monkeypatch.setattr(dp.shutil, "which", lambda name: None)
    monkeypatch.setattr(dp, "_KERNEL", {})
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert dp.kernel() is dp.block_layer


def test_block_statistics_backward_equals_autograd():
    from metanet.dense_passing import BlockStatistics

    torch.manual_seed(0)
    for axis in (1, 2):
        block = torch.randn(3, 5, 4, 6, dtype=torch.float64, requires_grad=True)
        a = torch.randn(3, 4 if axis == 2 else 5, 6, dtype=torch.float64, requires_grad=True)
        weights = [torch.randn(3, 5 if axis == 2 else 4, 6, dtype=torch.float64) for _ in range(4)]

        def loss(stats):
            return sum((s * w).sum() for s, w in zip(stats, weights))

        z = a.unsqueeze(3 - axis) * block
        ref = (z.sum(axis), z.square().sum(axis), z.max(axis).values, z.min(axis).values)
        ref_grads = torch.autograd.grad(loss(ref), (a, block))
        got = BlockStatistics.apply(a, block, axis)
        for s, r in zip(got, ref):
            torch.testing.assert_close(s, r)
        for g, r in zip(torch.autograd.grad(loss(got), (a, block)), ref_grads):
            torch.testing.assert_close(g, r)
        # a statistic the caller does not use gets no gradient (None): the others still agree
        partial = torch.autograd.grad(BlockStatistics.apply(a, block, axis)[0].sum(), (a, block))
        ref_partial = torch.autograd.grad((a.unsqueeze(3 - axis) * block).sum(axis).sum(), (a, block))
        for g, r in zip(partial, ref_partial):
            torch.testing.assert_close(g, r)


@pytest.mark.parametrize("backend", ["torch", "dgl", "pyg"])
@pytest.mark.parametrize("edit", ["additive", "gate+additive"])
def test_one_pass_over_several_graphs_equals_one_pass_each(backend, edit):
    graphs = [network_to_graph(randomize_state(NETWORKS[name](), i).eval(), torch.zeros(1, 3, 16, 16))
              for i, name in enumerate(["resnet-identity", "vgg", "resnet-identity", "cnn-flatten-linear"])]
    torch.manual_seed(1)
    net = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of(graphs), hidden=16, layers=3, residual=0.1,
                                    backend=backend, edit=edit, evidence=edit != "additive"))
    with torch.no_grad():  # gates start at exactly 1: give the gate decoder weights so that they edit
        if edit != "additive":
            net.gate_decoder[-1].weight.normal_(0, 0.5)
    together = net(graphs)
    for g, out in zip(graphs, together):
        alone = net(g)
        torch.testing.assert_close(out.node_feat, alone.node_feat, rtol=1e-5, atol=1e-6)
        assert out.edge_types == g.edge_types
        for t in g.edge_types:
            torch.testing.assert_close(out.edge_feat[t], alone.edge_feat[t], rtol=1e-5, atol=1e-6, msg=t)
