"""The meta-training objective, pruning, saving pruned networks, and the recipe with baselines."""

import pytest
import torch
import torch_pruning as tp

from metanet import network_to_graph
from metanet.meta_training import MetaTrainConfig, make_member, member_step
from metanet.metanetwork import MetaNetConfig, MetaNetwork, edge_widths_of
from metanet.prune import (PruneSettings, UnreachableSpeedupError, count, load_pruned, prune_adaptive, prune_to_speedup,
                           save_pruned, structure)
from metanet.levels import Level
from metanet.methods import names
from metanet.recipe import RecipeConfig, prune_with_method
from metanet.sparsity import GroupSparsity, classifier_of, importance
from zoo.arch import build_model, resnet_spec, vgg_spec
from metanet.train import TrainConfig, evaluate, train


SPECS = {
    "resnet-identity": resnet_spec(20, (6, 10, 14), shortcut="identity"),
    "resnet-projection": resnet_spec(20, (6, 10, 14), shortcut="projection"),
    "vgg": vgg_spec(11, width_mult=0.125, input_size=16, classifier=(16,)),
    "cnn": {"family": "cnn", "widths": [4, 6], "hidden": [8], "in_channels": 3, "num_classes": 5, "input_size": 8},
}


@pytest.mark.parametrize("name", SPECS)
def test_sparsity_gradient_equals_group_norm_pruner_regularize(name):
    torch.manual_seed(0)
    model = build_model(SPECS[name])
    x = torch.randn(1, 3, 8, 8) if name == "cnn" else torch.randn(1, 3, 16, 16)
    loss = GroupSparsity(model, x, reg=0.7, alpha=16)(dict(model.named_parameters()))
    loss.backward()
    ours = {k: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for k, p in model.named_parameters()}
    pruner = tp.pruner.GroupNormPruner(model, x, importance=importance(), reg=0.7, ignored_layers=[classifier_of(model)])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    pruner.regularize(model, alpha=16)
    touched = 0
    for k, p in model.named_parameters():
        torch.testing.assert_close(ours[k], p.grad, rtol=1e-4, atol=1e-5, msg=k)
        touched += int(p.grad.abs().sum() > 0)
    assert touched >= 4


def test_member_step_trains_the_metanetwork(digits):
    torch.manual_seed(0)
    model = build_model(resnet_spec(20, (4, 8, 8), in_channels=1)).eval()
    graph = network_to_graph(model, torch.zeros(digits.input_shape))
    cfg = MetaTrainConfig(reg=0.01)
    member = make_member("m", build_model(resnet_spec(20, (4, 8, 8), in_channels=1)), graph, cfg)
    net = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([graph]), hidden=8, layers=2, residual=0.1))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    batches = list(digits.batches("train", 128, limit=2))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        terms = member_step(net, member, batches)
        # every parameter learns (identity edges have no decoder: they are not weights)
        assert all(p.grad is not None for p in net.parameters())
        assert sum(float(p.grad.abs().sum()) for p in net.parameters() if p.grad is not None) > 0
        opt.step()
        losses.append(terms["task_loss"] + terms["sparsity_loss"])
    assert losses[-1] < losses[0]


def test_prune_to_speedup_reaches_the_target_and_keeps_the_classifier():
    torch.manual_seed(0)
    model = build_model(resnet_spec(20, (8, 16, 32)))
    x = torch.zeros(1, 3, 16, 16)
    macs, params = count(model, x)
    result = prune_to_speedup(model, x, 3.0)
    assert result.speedup >= 3.0 and result.speedup < 3.3
    assert result.macs_before == macs and result.macs_after == count(model, x)[0] < macs / 3
    assert result.params_after < params
    assert model.fc.out_features == 10
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="must be a finite number > 1"):
        prune_to_speedup(model, x, 1.0)
    with pytest.raises(UnreachableSpeedupError, match="1000.0x cannot be reached"):
        prune_to_speedup(build_model(resnet_spec(20, (8, 16, 32))), x, 1000.0, PruneSettings(steps=20))


@pytest.mark.parametrize("global_pruning", [False, True])
def test_remembered_counts_are_torch_prunings_counts_at_every_step(global_pruning):
    torch.manual_seed(0)
    x = torch.zeros(1, 3, 16, 16)
    model = build_model(resnet_spec(20, (8, 16, 32), shortcut="projection"))
    pruner = tp.pruner.BasePruner(model, x, importance=importance(), global_pruning=global_pruning, pruning_ratio=0.8,
                                  iterative_steps=12, ignored_layers=[classifier_of(model)])
    for _ in range(12):
        pruner.step()
        direct = tp.utils.count_ops_and_params(model.eval(), x)
        assert count(model, x) == (int(direct[0]), int(direct[1]))
    # what the count depends on is part of the key: the input size, a stride, a plain attribute
    wide = build_model(resnet_spec(20, (8, 16, 32)))
    big = torch.zeros(1, 3, 32, 32)
    assert count(wide, x)[0] < count(wide, big)[0] == int(tp.utils.count_ops_and_params(wide, big)[0])
    before = structure(wide, x)
    wide.conv1.stride = (2, 2)
    assert structure(wide, x) != before
    assert count(wide, x)[0] == int(tp.utils.count_ops_and_params(wide, x)[0])
    wide.conv1.stride, wide.flag = (1, 1), True
    assert structure(wide, x) != before


def test_pruned_models_save_and_load_safely(tmp_path, digits):
    torch.manual_seed(0)
    spec = resnet_spec(20, (6, 12, 16), in_channels=1)
    model = build_model(spec)
    train(model, digits, TrainConfig(epochs=2, lr=0.1, augment=False))
    prune_to_speedup(model, torch.zeros(digits.input_shape), 2.0)
    save_pruned(model, str(tmp_path / "p.pt"), spec=spec, note="x")
    loaded, meta = load_pruned(str(tmp_path / "p.pt"), build_model(spec))
    assert meta["note"] == "x"
    assert evaluate(loaded, digits, "test") == evaluate(model, digits, "test")
    x = digits.test[0][:8]
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert count(loaded, x[:1]) == count(model, x[:1])
    torch.save({"format": "something"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a pruned-model file"):
        load_pruned(str(tmp_path / "bad.pt"), build_model(spec))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_pruned(str(tmp_path / "missing.pt"), build_model(spec))


def test_adaptive_pruning_stays_above_the_floor(digits):
    torch.manual_seed(0)
    model = build_model(resnet_spec(20, (6, 12, 16), in_channels=1))
    train(model, digits, TrainConfig(epochs=6, lr=0.1, augment=False))
    acc = evaluate(model, digits, "val")[0]
    floor = acc - 0.3
    result = prune_adaptive(model, torch.zeros(digits.input_shape), lambda m: evaluate(m, digits, "val")[0], floor,
                            PruneSettings(steps=100), check_every=2)
    assert evaluate(result.model, digits, "val")[0] >= floor
    assert result.speedup > 1.0


@pytest.mark.parametrize("method", names(Level.CHANNELS))
def test_recipe_runs_every_method_with_the_same_budget(method, digits):
    torch.manual_seed(0)
    spec = resnet_spec(20, (6, 12, 16), in_channels=1)
    model = build_model(spec)
    train(model, digits, TrainConfig(epochs=2, lr=0.1, augment=False))
    graph = network_to_graph(model, torch.zeros(digits.input_shape))
    metanet = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([graph]), hidden=8, layers=1))
    cfg = RecipeConfig(target=2.0, before=TrainConfig(steps=5, lr=0.01, augment=False),
                       after=TrainConfig(steps=5, lr=0.01, augment=False))
    pruned, rec = prune_with_method(model, digits, method, cfg, metanet)
    assert rec["speedup"] >= 2.0 and rec["method"] == method
    assert rec["test_acc"] == evaluate(pruned, digits, "test")[0]  # the row is the returned model's score
    assert ("val_acc_after_metanet" in rec) == (method == "meta")
    assert count(pruned, torch.zeros(digits.input_shape))[0] == rec["macs_after"]
    assert count(model, torch.zeros(digits.input_shape))[0] == rec["macs_before"]  # the input is untouched
    with pytest.raises(ValueError, match="needs a metanetwork"):
        prune_with_method(model, digits, "meta", cfg, None)


def test_training_is_deterministic_under_a_seed(digits):
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        model = build_model(resnet_spec(20, (4, 8, 8), in_channels=1))
        train(model, digits, TrainConfig(epochs=1, lr=0.05, seed=5, max_batches=3))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_step_over_several_members_is_the_mean_of_their_steps(digits):
    from conftest import randomize_state
    from metanet.meta_training import members_step

    torch.manual_seed(0)
    data = digits
    cfg = MetaTrainConfig(batch_size=32)
    members = []
    for i, widths in enumerate([(4, 8, 8), (4, 8, 8), (6, 6, 8)]):
        model = randomize_state(build_model(resnet_spec(8, widths, in_channels=1)), i)
        members.append(make_member(str(i), model, network_to_graph(model.eval(), torch.zeros(1, 1, 8, 8)), cfg))
    batches = list(data.batches("train", 32, limit=2))
    net = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([m.graph for m in members]), hidden=8, layers=2,
                                    residual=0.1, backend="torch"))
    expected = {k: torch.zeros_like(p) for k, p in net.named_parameters()}
    losses = []
    for m in members:
        net.zero_grad(set_to_none=True)
        losses.append(member_step(net, m, batches)["task_loss"])
        for k, p in net.named_parameters():
            expected[k] += p.grad / len(members)
    net.zero_grad(set_to_none=True)
    terms = members_step(net, members, batches)
    assert terms["task_loss"] == pytest.approx(sum(losses) / len(losses))
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expected[k], rtol=1e-4, atol=1e-6, msg=k)
