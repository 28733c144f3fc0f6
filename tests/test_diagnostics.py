"""The ground the method is judged on: the eval-mode objective, BatchNorm recalibration, budgets in
steps, pruner defaults that keep every layer, the diagnostics and the paired statistics."""

import math

import pytest
import torch
from torch import nn

from metanet import network_to_graph
from metanet.diagnostics import pruning_curve, selectivity
from metanet.graph import graph_to_params
from metanet.meta_training import MetaTrainConfig, make_member
from metanet.objectives import task_objective
from metanet.paired import mean_ci, paired_difference
from metanet.prune import PruneSettings, prune_in_steps, prune_to_speedup, recalibrate_bn
from metanet.recipe import RecipeConfig
from zoo.arch import arch_spec, build_model, resnet_spec
from metanet.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = build_model(resnet_spec(8, (8, 12, 16), in_channels=1))
    train(model, digits, TrainConfig(epochs=6, lr=0.05, batch_size=64, augment=False))
    return model.eval()


def test_eval_mode_objective_sees_a_shrunk_conv_and_train_mode_does_not(trained, digits):
    graph = network_to_graph(trained, torch.zeros(digits.input_shape))
    batches = list(digits.batches("train", 256, limit=3))
    name = "layers.0.conv1.weight"
    change = {}
    for mode in ("eval", "train"):
        member = make_member("m", build_model(arch_spec(trained)), graph, MetaTrainConfig(bn_mode=mode))
        params = graph_to_params(graph, member.model)
        base, _ = task_objective(member, params, batches)
        shrunk = dict(params, **{name: 0.5 * params[name]})
        loss, _ = task_objective(member, shrunk, batches)
        change[mode] = loss - base
    assert change["eval"] > 0.01, change  # the objective resists the shrink
    assert abs(change["train"]) < 1e-3, change  # batch statistics divide it out
    assert MetaTrainConfig().bn_mode == "eval"
    with pytest.raises(ValueError, match="bn_mode"):
        MetaTrainConfig(bn_mode="batch")


def test_recalibrate_bn_sets_the_exact_average_of_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    model[1].momentum = 0.1
    batches = [torch.randn(16, 4) * (i + 1) + i for i in range(5)]
    recalibrate_bn(model, batches)
    with torch.no_grad():
        feats = [model[0](x) for x in batches]
    expect_mean = torch.stack([f.mean(0) for f in feats]).mean(0)
    expect_var = torch.stack([f.var(0, unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(model[1].running_mean, expect_mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, expect_var, atol=1e-4)
    assert model[1].momentum == 0.1 and not model.training


def test_a_budget_in_steps_takes_exactly_that_many_steps(digits):
    model = build_model(resnet_spec(8, (4, 4, 4), in_channels=1))
    calls = []
    steps_per_epoch = math.ceil(len(digits.train[1]) / 64)
    train(model, digits, TrainConfig(steps=steps_per_epoch + 3, batch_size=64, augment=False),
          extra_loss=lambda m: calls.append(1) or torch.zeros(()))
    assert len(calls) == steps_per_epoch + 3
    calls.clear()
    train(model, digits, TrainConfig(steps=0), extra_loss=lambda m: calls.append(1) or torch.zeros(()))
    assert calls == []


def _kept(model, original):
    convs = {n: m.out_channels for n, m in original.named_modules() if isinstance(m, nn.Conv2d)}
    return {n: m.out_channels / convs[n] for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_default_pruning_keeps_part_of_every_layer_where_global_ranking_may_not(trained, digits):
    x = torch.zeros(digits.input_shape)
    model = build_model(arch_spec(trained))
    model.load_state_dict(trained.state_dict())
    result = prune_to_speedup(model, x, 2.0)
    assert result.speedup >= 2.0
    kept = _kept(result.model, trained)
    assert min(kept.values()) > 0.5 and max(kept.values()) - min(kept.values()) < 0.15, kept


def test_one_pruning_run_yields_every_target_in_order(trained, digits):
    model = build_model(arch_spec(trained))
    model.load_state_dict(trained.state_dict())
    seen = [(t, r.speedup, r.steps) for t, r in prune_in_steps(model, torch.zeros(digits.input_shape), [3, 1.5, 2])]
    assert [t for t, *_ in seen] == [1.5, 2.0, 3.0]
    assert all(s >= t for t, s, _ in seen) and seen[0][2] < seen[1][2] < seen[2][2]
    with pytest.raises(ValueError, match="finite number > 1"):
        next(prune_in_steps(model, torch.zeros(digits.input_shape), [float("nan")]))


def test_pruning_curve_falls_with_speedup_and_leaves_the_model_alone(trained, digits):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    curve = pruning_curve(trained, digits, RecipeConfig(), [1.5, 4.0, 16.0])
    assert list(curve) == [1.5, 4.0, 16.0]
    assert curve[1.5] > 0.8 and curve[1.5] > curve[4.0] > 0.1, curve
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    assert math.isnan(pruning_curve(trained, digits, RecipeConfig(pruning=PruneSettings(steps=5)), [50.0])[50.0])


def test_selectivity_tells_a_uniform_shrink_from_a_selective_edit(trained, digits):
    uniform, selective = (build_model(arch_spec(trained)) for _ in range(2))
    uniform.load_state_dict(trained.state_dict())
    selective.load_state_dict(trained.state_dict())
    with torch.no_grad():
        for m in uniform.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                m.weight.mul_(0.5)
        conv, bn = selective.layers[0].conv1, selective.layers[0].bn1
        conv.weight[:4].mul_(0.01)  # four channels removed in all but name: every slice of their group
        bn.weight[:4].mul_(0.01)
        selective.layers[0].conv2.weight[:, :4].mul_(0.01)
    same = selectivity(trained, trained, digits)
    flat = selectivity(trained, uniform, digits)
    sharp = selectivity(trained, selective, digits)
    assert same["ratio_spread"] < 1e-6 and same["mean_ratio"] == pytest.approx(1.0)
    # the classifier's input columns are not scaled: the last group's ratios vary a little
    assert flat["ratio_spread"] < 0.02 and flat["mean_ratio"] == pytest.approx(0.5, abs=0.05)
    # one group of several changed (spreads are averaged over groups)
    assert sharp["ratio_spread"] > 5 * flat["ratio_spread"] and sharp["share_below_0.1"] > same["share_below_0.1"]


def test_mean_ci_and_paired_differences():
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.high - 2.0 == pytest.approx(4.3027 / math.sqrt(3), rel=1e-3)
    assert math.isnan(mean_ci([5.0]).low) and not mean_ci([5.0]).excludes_zero
    rows = [{"method": m, "network": n, "seed": s, "target": 2.0, "acc": base + (0.1 if m == "a" else 0) + 0.01 * s}
            for n, base in enumerate([0.5, 0.7, 0.9]) for s in range(2) for m in ("a", "b")]
    d = paired_difference(rows, "a", "b", "acc", 2.0)
    assert d.n == 3 and d.mean == pytest.approx(10.0) and d.high - d.low == pytest.approx(0.0, abs=1e-9)
    rows[0]["acc"] += 0.3  # one network's first seed: the unit is the network (seed mean)
    d = paired_difference(rows, "a", "b", "acc", 2.0)
    assert d.n == 3 and d.mean == pytest.approx(15.0) and d.low < 15.0 < d.high
