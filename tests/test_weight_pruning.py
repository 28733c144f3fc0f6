"""metanet.weight_pruning: unstructured and N:M masks through torch's pruning utilities, kept
through a finetune, folded into plain weights; the criteria; bad values named."""

import copy
import math

import pytest
import torch
from torch import nn

from metanet.train import TrainConfig, train
from metanet.criteria import Random, Wanda, criterion
from metanet.levels import Level
from metanet.weight_pruning import (WeightPruning, make_permanent, nm_mask, nm_violations, parse_nm, prunable_layers,
                                    sparsify, zero_fraction)
from zoo.arch import build_model, resnet_spec


def _net():
    torch.manual_seed(0)
    return build_model(resnet_spec(8, (4, 6, 8), in_channels=1, num_classes=10))


def _batches(n=2):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]
    return lambda: iter(data)


def test_global_sparsity_masks_the_middle_layers_and_the_finetune_keeps_the_zeros(digits):
    model = _net()
    layers = prunable_layers(model)
    every = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert every[0] not in layers and every[-1] not in layers and len(layers) == len(every) - 2
    report = sparsify(model, WeightPruning(sparsity=0.8), criterion("magnitude", Level.WEIGHTS))
    assert report.layers == list(layers)
    assert zero_fraction(model, report.layers) == pytest.approx(0.8, abs=1e-3)
    modules = dict(model.named_modules())
    assert torch.count_nonzero(modules[every[0]].weight) == modules[every[0]].weight.numel()  # first layer dense
    per_layer = [zero_fraction(model, [n]) for n in report.layers]
    assert max(per_layer) - min(per_layer) > 0.05  # one global ranking: layers end at different fractions
    zeros = {n: modules[n].weight == 0 for n in report.layers}
    train(model, digits, TrainConfig(steps=5, lr=0.05, batch_size=32, augment=False))
    assert all(torch.equal(modules[n].weight == 0, z) for n, z in zeros.items())  # zeros kept, nothing else zeroed
    make_permanent(model)
    state = model.state_dict()
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    assert all(torch.equal(state[f"{n}.weight"] == 0, z) for n, z in zeros.items())


def test_per_layer_scope_prunes_each_layer_to_the_fraction():
    model = _net()
    report = sparsify(model, WeightPruning(sparsity=0.5, scope="layer", dense_ends=False), criterion("magnitude", Level.WEIGHTS))
    assert len(report.layers) == len([m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    for name in report.layers:
        assert zero_fraction(model, [name]) == pytest.approx(0.5, abs=0.02), name


def test_two_four_keeps_two_of_every_four_and_matches_torch_ao_on_linear_layers():
    model = _net()
    report = sparsify(model, WeightPruning(nm=(2, 4)), criterion("magnitude", Level.WEIGHTS))
    make_permanent(model)
    assert report.layers and not nm_violations(model, report.layers, 2, 4)
    assert 0.45 < zero_fraction(model, report.layers) <= 0.5  # rows of 9 x 6 inputs end in a group of 2, both kept
    # the first layer (kept dense) breaks the pattern: the check sees it
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    assert nm_violations(model, [first], 2, 4) == [first]
    # on a Linear, the mask is the one torch.ao's WeightNormSparsifier computes for 2:4 blocks
    from torch.ao.pruning import WeightNormSparsifier

    torch.manual_seed(3)
    lin = nn.Sequential(nn.Linear(16, 8))
    ours = nm_mask(lin[0].weight.detach().abs(), 2, 4)
    ao = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    ao.prepare(lin, [{"tensor_fqn": "0.weight"}])
    ao.step()
    assert torch.equal(ours.bool(), lin[0].parametrizations.weight[0].mask.bool())


def test_a_row_that_is_not_a_multiple_of_m_ends_in_a_shorter_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(3, 3))
    report = sparsify(model, WeightPruning(nm=(2, 4), dense_ends=False), criterion("magnitude", Level.WEIGHTS))
    make_permanent(model)
    assert report.layers == ["0", "2", "4"] and not nm_violations(model, report.layers, 2, 4)
    six = (model[2].weight != 0).sum(1)  # rows of 6: a group of 4 (2 kept) and one of 2 (both kept)
    assert six.tolist() == [4, 4, 4, 4]
    three = (model[4].weight != 0).sum(1)  # rows of 3: one short group, 2 kept
    assert three.tolist() == [2, 2, 2]
    bad = nn.Sequential(nn.Linear(6, 2))
    with torch.no_grad():
        bad[0].weight.fill_(1.0)
    assert nm_violations(bad, ["0"], 2, 4) == ["0"]


def test_wanda_scores_weights_by_their_input_norm():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(32, 4)
    x[:, 1] = 0.0  # a dead input feature: its weights score 0 whatever their size
    scores = Wanda().scores(model, {"0": model[0]}, lambda: iter([(x, None)]))["0"]
    assert torch.allclose(scores, model[0].weight.abs() * x.norm(dim=0)[None, :])
    assert torch.count_nonzero(scores[:, 1]) == 0
    # a grouped convolution: each output's columns read its group's input channels
    conv = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))
    xs = torch.randn(8, 4, 5, 5)
    s = Wanda().scores(conv, {"0": conv[0]}, lambda: iter([(xs, None)]))["0"]
    norms = xs.transpose(0, 1).reshape(4, -1).norm(dim=1)
    assert torch.allclose(s[0, 1], conv[0].weight[0, 1].abs() * norms[1])  # outputs 0-2: group 0, inputs 0, 1
    assert torch.allclose(s[3, 1], conv[0].weight[3, 1].abs() * norms[3])  # outputs 3-5: group 1, inputs 2, 3
    with pytest.raises(ValueError, match="calibration batches"):
        sparsify(_net(), WeightPruning(sparsity=0.5), Wanda())


def test_random_differs_from_magnitude_and_follows_the_seed():
    masks = []
    for seed in (0, 0, 1):
        model = _net()
        torch.manual_seed(seed)
        sparsify(model, WeightPruning(sparsity=0.5), Random())
        masks.append(torch.cat([m.weight_mask.flatten() for m in model.modules() if hasattr(m, "weight_mask")]))
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("text, message", [("3:2", "needs 0 < N < M"), ("0:4", "needs 0 < N < M"),
                                            ("two of four", "not two whole numbers"), ("2:4:8", "not two whole"),
                                            ("1:1000000000000", "M must be at most 64")])
def test_bad_nm_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_nm(text)


@pytest.mark.parametrize("value", [0, 1, -0.5, 1.5, math.nan, "x"])
def test_bad_sparsity_is_named(value):
    with pytest.raises(ValueError, match="sparsity"):
        WeightPruning(sparsity=value)


def test_exactly_one_of_sparsity_and_nm():
    assert parse_nm(" 2:4 ") == (2, 4) and WeightPruning(nm=(2, 4)).label == "2of4"
    with pytest.raises(ValueError, match="exactly one"):
        WeightPruning()
    with pytest.raises(ValueError, match="exactly one"):
        WeightPruning(sparsity=0.5, nm=(2, 4))
    with pytest.raises(ValueError, match="scope"):
        WeightPruning(sparsity=0.5, scope="row")
    copy.deepcopy(WeightPruning(sparsity=0.5))


def test_given_scores_rank_by_value_even_when_negative():
    """torch's L1Unstructured ranks |score|: negative scores (log magnitudes) must still be ranked
    by value, so minus |w| keeps the smallest weights."""
    from metanet.criteria import GivenScores

    model = _net()
    layers = prunable_layers(model)
    flipped = GivenScores({n: -m.weight.detach().abs() - 1.0 for n, m in layers.items()}, Level.WEIGHTS)
    sparsify(model, WeightPruning(sparsity=0.5), flipped)
    kept = torch.cat([m.weight_orig[m.weight_mask.bool()].abs() for m in layers.values()])
    dropped = torch.cat([m.weight_orig[~m.weight_mask.bool()].abs() for m in layers.values()])
    assert kept.max() <= dropped.min()


def test_a_masked_network_deep_copies_and_still_trains_through_its_mask(digits):
    model = _net()
    sparsify(model, WeightPruning(sparsity=0.7), criterion("magnitude", Level.WEIGHTS))
    model(torch.zeros(2, 1, 8, 8))
    twin = copy.deepcopy(model)  # after a forward: torch's masked weight is no graph leaf
    before = [m.weight_orig.clone() for m in twin.modules() if hasattr(m, "weight_orig")]
    train(twin, digits, TrainConfig(steps=2, lr=0.05, batch_size=32, augment=False))
    after = [m.weight_orig for m in twin.modules() if hasattr(m, "weight_orig")]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # gradients reach weight_orig
    assert all(bool((m.weight[m.weight_mask == 0] == 0).all()) for m in twin.modules() if hasattr(m, "weight_mask"))
    make_permanent(twin)
    assert not any(hook is not None for m in twin.modules() for hook in m._forward_hooks.values())
