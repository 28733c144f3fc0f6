"""The per-network allocation: the differentiable MAC count, the mask at each group's own fraction,
the budget's implicit gradient, and the fit itself (it must beat random allocations)."""

import copy

import pytest
import torch

from metanet.allocation import TOLERANCE, keeping, speedup_of, to_target
from metanet.allocation_fit import Widths, fit_allocation
from metanet.masks import ChannelMask
from metanet.prune import prunable_groups, prune_allocated, recalibrate_bn
from metanet.train import evaluate, train
from metanet.widths import MacModel
from zoo.arch import build_model, resnet_spec, vgg_spec


def _kept(model, pruned, x, roots):
    sizes = prunable_groups(model, x)
    modules = dict(pruned.named_modules())
    return torch.tensor([getattr(modules[r], "out_channels", None) or modules[r].out_features for r in roots],
                        dtype=torch.float64) / torch.tensor([sizes[r] for r in roots], dtype=torch.float64)


@pytest.mark.parametrize("spec", [resnet_spec(8, (16, 24, 32), in_channels=1),
                                  vgg_spec(11, width_mult=0.25, input_size=8, in_channels=1)], ids=["resnet", "vgg"])
def test_the_mac_model_counts_as_torch_pruning_at_random_widths(spec):
    torch.manual_seed(0)
    model = build_model(spec).eval()
    x = torch.zeros(1, 1, 8, 8)
    macs = MacModel(model, x)
    assert macs(torch.ones(len(macs.roots), dtype=torch.float64)) == pytest.approx(macs.total)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        amounts = {r: 0.8 * float(torch.rand(1, generator=gen)) for r in macs.roots}
        result = prune_allocated(copy.deepcopy(model), x, amounts, steps=1)
        predicted = float(macs(_kept(model, result.model, x, macs.roots)))
        assert predicted == pytest.approx(result.macs_after, rel=0.02)


def test_the_mask_keeps_each_groups_own_fraction_and_is_differentiable_in_it(trained, digits):
    x = torch.zeros(digits.input_shape)
    masker = ChannelMask(trained, x)
    scores = masker.initial(trained)
    sizes = masker.sizes
    keep = torch.linspace(0.2, 1.0, len(sizes)).requires_grad_(True)
    mask = masker.kept_mask(scores, keep, temperature=0.05)
    above = torch.zeros(len(sizes)).index_add(0, masker.group_of, (mask > 0.5).float())
    assert torch.equal(above, (keep.detach() * sizes).round().clamp_min(1))
    whole = masker.group_of == len(sizes) - 1  # the last group is kept whole: nothing masked
    assert bool((mask[whole] > 0.99).all())
    mask.sum().backward()
    assert bool((keep.grad[:-1] > 0).all())  # keeping more lets more through


def test_the_budget_holds_and_its_gradient_moves_channels_at_constant_macs(trained, digits):
    x = torch.zeros(digits.input_shape)
    masker = ChannelMask(trained, x)
    widths = Widths(trained, x, masker)
    sizes = prunable_groups(trained, x)
    # each MAC-model root reads the mask's group holding its own output channels
    assert masker.sizes[widths.group].tolist() == [sizes[r] for r in widths.macs.roots]
    for root, group in zip(widths.macs.roots, widths.group.tolist()):
        assert bool((masker.group_of[masker.groups.rows[f"{root}.weight"][1]] == group).all())
    budget = widths.macs.total / 3.0
    u = torch.randn(len(masker.sizes), dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                    requires_grad=True)
    kept = widths.at_budget(u, budget)
    macs = widths._macs(kept)
    assert float(macs.detach()) == pytest.approx(budget, rel=1e-6)
    (grad,) = torch.autograd.grad(macs, u)
    assert float(grad.abs().max()) < 1e-6 * budget  # the shift absorbs every change of the MACs
    (grad,) = torch.autograd.grad(widths.at_budget(u, budget)[0], u)
    assert float(grad[0]) > 0 and bool((grad[1:] <= 0).all())  # one group grows, the others give way


def test_the_fitted_allocation_is_at_the_target_and_beats_random_allocations(trained, digits):
    x = torch.zeros(digits.input_shape)
    target = 5.0

    def score(model):
        model = copy.deepcopy(model)
        recalibrate_bn(model, (xb for xb, _ in digits.batches("train", 128, limit=2)))
        return evaluate(model, digits, "val")[0]

    fit = fit_allocation(trained, digits, target, steps=60)
    sizes = prunable_groups(trained, x)
    # the fractions as fitted, before any scaling, already reach the target on Torch-Pruning's count
    # (fails if the MAC model or its groups were wired to the wrong layers)
    as_fitted = {r: keeping(round(k * sizes[r]), sizes[r]) for r, k in fit.kept.items()}
    assert speedup_of(trained, x, as_fitted) == pytest.approx(target, rel=0.1)
    amounts = to_target(trained, x, target, {r: 1.0 - k for r, k in fit.kept.items()})
    assert abs(speedup_of(trained, x, amounts) / target - 1) <= TOLERANCE
    fitted = score(prune_allocated(copy.deepcopy(trained), x, amounts).model)
    gen = torch.Generator().manual_seed(1)
    randoms = []
    for _ in range(4):
        draw = dict(zip(sizes, torch.rand(len(sizes), generator=gen).tolist()))
        randoms.append(score(prune_allocated(copy.deepcopy(trained), x, to_target(trained, x, target, draw)).model))
    assert fitted > sum(randoms) / len(randoms) + 0.03, (fitted, randoms)
