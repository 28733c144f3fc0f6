"""Choosing a metanetwork checkpoint (metanet.selection) and preparing once for several targets."""

import dataclasses
import math

import pytest
import torch

from metanet import network_to_graph
from metanet.metanetwork import MetaNetConfig, MetaNetwork, edge_widths_of
from metanet.recipe import RecipeConfig, prune_to_targets, prune_with_method
from metanet.selection import choose, score, selection_recipe
from metanet.train import TrainConfig, train
from zoo.arch import build_model, resnet_spec


@pytest.fixture(scope="module")
def setup(digits):
    torch.manual_seed(0)
    model = build_model(resnet_spec(20, (6, 12, 16), in_channels=1))
    train(model, digits, TrainConfig(epochs=2, lr=0.1, augment=False))
    graph = network_to_graph(model, torch.zeros(digits.input_shape))
    metanet = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([graph]), hidden=8, layers=1))
    cfg = RecipeConfig(before=TrainConfig(steps=4, lr=0.01, augment=False, seed=1),
                       after=TrainConfig(steps=4, lr=0.01, augment=False, seed=1))
    return model.eval(), metanet, cfg


def test_choose_takes_the_highest_score_and_the_later_epoch_on_ties():
    assert choose({0: 0.5, 3: 0.7, 5: 0.6}) == (3, 0.7)
    assert choose({1: 0.7, 4: 0.7, 2: 0.1}) == (4, 0.7)  # tie: the longer-trained metanetwork
    assert choose({0: math.nan, 2: 0.1}) == (2, 0.1)  # a NaN score never wins
    with pytest.raises(ValueError, match="no checkpoint has a score"):
        choose({0: math.nan})


def test_prune_to_targets_prepares_once_like_one_run_per_target(setup, digits):
    model, metanet, cfg = setup
    seen = []
    results = prune_to_targets(model, digits, "meta", cfg, [2.0, 3.0], metanet, inspect=seen.append)
    assert len(seen) == 1  # one preparation for both targets
    assert [r["target"] for _, r in results] == [2.0, 3.0]
    assert results[1][1]["macs_after"] < results[0][1]["macs_after"]
    # the first target's row is the row of a single run of the recipe with that target
    _, single = prune_with_method(model, digits, "meta", dataclasses.replace(cfg, target=2.0), metanet)
    for key in ("val_acc_before_prune", "macs_after", "val_acc", "test_acc"):
        assert results[0][1][key] == single[key], key


def test_score_reads_only_validation_data(setup, digits):
    model, metanet, cfg = setup
    values = {}
    for name, data in (("real", digits), ("garbled test", dataclasses.replace(
            digits, test=(torch.full_like(digits.test[0], float("nan")), torch.zeros_like(digits.test[1]))))):
        torch.manual_seed(0)
        values[name] = (score(metanet, [model], data, cfg, "recipe", [2.0]), score(metanet, [model], data, cfg, "auc"))
    assert values["real"] == values["garbled test"]
    recipe, auc = values["real"]
    assert 0.1 < recipe <= 1 and 0 < auc <= 1 and recipe != auc
    with pytest.raises(ValueError, match="objective must be one of recipe, auc"):
        score(metanet, [model], digits, cfg, "test_acc")


def test_the_selection_recipe_is_the_pruning_recipe_shortened():
    r = selection_recipe({"batch_size": 32, "augment": False}, 7, target=3.0, seed=2)
    assert (r.before.steps, r.after.steps, r.target) == (7, 7, 3.0)
    assert (r.before.schedule, r.after.schedule) == ("constant", "cosine")
    assert r.before.batch_size == 32 and r.after.seed == 2
