"""Allocations: how many channels each dependency group keeps, apart from which (the criterion)."""

import copy

import pytest
import torch

from metanet.allocation import ALLOCATIONS, TOLERANCE, AllocationContext, allocation, speedup_of, to_target
from metanet.criteria import criterion
from metanet.prune import count, prunable_groups, prune_allocated, prune_to_speedup, recalibrate_bn
from metanet.train import evaluate, train
from zoo.arch import build_model, vgg_spec


def _score(digits):
    """Validation accuracy after BatchNorm recalibration on 2 training batches (cheap, as the tests need)."""
    def score(model):
        model = copy.deepcopy(model)
        recalibrate_bn(model, (x for x, _ in digits.batches("train", 128, limit=2)))
        return evaluate(model, digits, "val")[0]
    return score


@pytest.mark.parametrize("name", [n for n, a in ALLOCATIONS.items() if not a.reads_allocator])  # learned: its own file
def test_every_allocation_reaches_its_target_within_the_tolerance(name, trained, digits):
    x = torch.zeros(digits.input_shape)
    context = AllocationContext(score=_score(digits), candidates=3, data=digits, fit_steps=10)
    for target in (2.0, 3.0):
        amounts = allocation(name).amounts(trained, x, target, context)
        assert set(amounts) == set(prunable_groups(trained, x))
        assert all(0.0 <= a < 1.0 for a in amounts.values())  # no group emptied
        model = copy.deepcopy(trained)
        result = prune_allocated(model, x, amounts, criterion=criterion("fpgm"))
        assert target * (1 - TOLERANCE) <= result.speedup <= target * (1 + TOLERANCE), (name, target, result.speedup)
        assert count(model, x)[0] == result.macs_after


def test_a_vgg_reaches_the_target_too(digits):
    torch.manual_seed(1)
    model = build_model(vgg_spec(11, width_mult=0.25, input_size=8, in_channels=1)).eval()
    x = torch.zeros(digits.input_shape)
    for name in ("uniform", "global", "lamp"):
        amounts = allocation(name).amounts(model, x, 3.0, AllocationContext())
        assert abs(speedup_of(model, x, amounts) / 3.0 - 1) <= TOLERANCE, name


def test_each_group_keeps_what_its_fraction_says_and_the_criterion_picks_which(trained, digits):
    x = torch.zeros(digits.input_shape)
    sizes = prunable_groups(trained, x)
    root = next(iter(sizes))
    kept = {}
    for name in ("magnitude", "fpgm"):
        result = prune_allocated(copy.deepcopy(trained), x, {root: 0.5}, criterion=criterion(name))
        assert len(result.channels[root][0]) == sizes[root] - sizes[root] // 2  # Torch-Pruning's floor of kept
        assert all(r == root for r in result.channels if len(result.channels[r][0]) < sizes.get(r, 0))
        kept[name] = result.channels[root][0]
    assert kept["magnitude"] != kept["fpgm"]


def test_uniform_is_the_default_pruner_exactly(trained, digits):
    x = torch.zeros(digits.input_shape)
    amounts = allocation("uniform").amounts(trained, x, 2.0, AllocationContext())
    default = prune_to_speedup(copy.deepcopy(trained), x, 2.0)
    allocated = prune_allocated(copy.deepcopy(trained), x, amounts)
    assert allocated.macs_after == default.macs_after
    assert {k: len(v[0]) for k, v in allocated.channels.items()} == {k: len(v[0]) for k, v in default.channels.items()}


def test_a_different_allocation_gives_the_groups_different_widths(trained, digits):
    x = torch.zeros(digits.input_shape)
    uniform = allocation("uniform").amounts(trained, x, 3.0, AllocationContext())
    found = allocation("eagleeye").amounts(trained, x, 3.0, AllocationContext(score=_score(digits), candidates=2))
    assert len(set(round(a, 6) for a in found.values())) > 1 and found != uniform


def test_bad_allocations_are_refused_in_one_line(trained, digits):
    x = torch.zeros(digits.input_shape)
    with pytest.raises(ValueError, match="allocation must be one of uniform, .*, not 'greedy'"):
        allocation("greedy")
    with pytest.raises(ValueError, match="'eagleeye' reads validation accuracy"):
        allocation("eagleeye").amounts(trained, x, 2.0, AllocationContext())
    with pytest.raises(ValueError, match="'fitted' trains on the task's data"):
        allocation("fitted").amounts(trained, x, 2.0, AllocationContext())
    with pytest.raises(ValueError, match="cannot be reached by this allocation"):
        to_target(trained, x, 500.0, {r: 1.0 for r in prunable_groups(trained, x)})
    with pytest.raises(ValueError, match="no prunable group 'nope'"):
        prune_allocated(copy.deepcopy(trained), x, {"nope": 0.5})

