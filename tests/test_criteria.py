"""Torch-Pruning's criteria as methods, the curve objective's mask, and the per-network scores."""

import copy

import pytest
import torch

from metanet.criteria import GivenScores, criterion, names
from metanet.levels import Level
from metanet.curve import batch_stat_copy, fit_scores, masked_accuracy
from metanet.masks import ChannelMask
from metanet.diagnostics import pruning_curve
from metanet.paired import best_method, with_best
from metanet.prune import amounts_for, count, prune_to_speedup
from metanet.recipe import RecipeConfig, calibration
from metanet.train import TrainConfig, train
from zoo.arch import build_model, resnet_spec, vgg_spec


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = build_model(resnet_spec(8, (6, 8, 12), in_channels=1))
    train(model, digits, TrainConfig(epochs=3, lr=0.1, augment=False))
    return model.eval()


@pytest.mark.parametrize("name", sorted(names(Level.CHANNELS)))
def test_every_criterion_prunes_to_the_target_with_its_own_ranking(name, trained, digits):
    x = torch.zeros(digits.input_shape)
    model = copy.deepcopy(trained)
    torch.manual_seed(0)
    result = prune_to_speedup(model, x, 2.0, criterion=criterion(name), batches=calibration(digits, RecipeConfig()))
    assert result.speedup >= 2.0 and count(model, x)[0] == result.macs_after
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # data-driven criteria leave no gradients behind


def test_criteria_rank_channels_differently(trained, digits):
    """A criterion that silently fell back to magnitude would keep the same channels."""
    x = torch.zeros(digits.input_shape)
    kept = {}
    for name in ("magnitude", "taylor", "bn_scale", "fpgm", "random"):
        model = copy.deepcopy(trained)
        torch.manual_seed(0)
        prune_to_speedup(model, x, 2.0, criterion=criterion(name), batches=calibration(digits, RecipeConfig()))
        kept[name] = torch.cat([m.weight.flatten()[:50] for m in model.modules() if isinstance(m, torch.nn.Conv2d)])
    names = list(kept)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.equal(kept[a], kept[b]), (a, b)


def test_an_unknown_criterion_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown channel pruning criterion 'l1'.*magnitude"):
        criterion("l1")
    # one registry for both levels: a criterion is refused at the level it does not rank
    with pytest.raises(ValueError, match="unknown channel pruning criterion 'wanda'; known: magnitude.*random$"):
        criterion("wanda")
    with pytest.raises(ValueError, match="unknown weight pruning criterion 'fpgm'; known: magnitude, random, wanda$"):
        criterion("fpgm", Level.WEIGHTS)
    assert criterion("magnitude", Level.WEIGHTS) is criterion("magnitude")
    with pytest.raises(ValueError, match="'l1'"):
        RecipeConfig(criterion="l1")


@pytest.mark.parametrize("arch", [resnet_spec(8, (6, 8, 12), in_channels=1), vgg_spec(11, width_mult=0.125, input_size=8, in_channels=1, classifier=(16,))])
def test_the_hard_mask_removes_exactly_what_the_pruner_removes(arch, digits):
    """Scores -> mask at an amount must equal scores -> Torch-Pruning at the speed-up of that
    amount: the same channels go, and the masked network computes what the pruned one does."""
    torch.manual_seed(1)
    model = build_model(arch).eval()
    x = torch.zeros(digits.input_shape)
    masker = ChannelMask(model, x)
    scores = torch.randn(masker.num_channels)
    amount = amounts_for(model, x, [2.0])[2.0]
    pruned = copy.deepcopy(model)
    prune_to_speedup(pruned, x, 2.0, criterion=GivenScores(masker.module_scores(scores)))
    batch = next(iter(digits.batches("train", 64)))[0]
    work = batch_stat_copy(model)
    masked = masker.apply(dict(work.named_parameters()), masker.mask(scores, amount, mode="hard"))
    expected = torch.func.functional_call(work, masked, (batch,))
    got = batch_stat_copy(pruned)(batch)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    keep = masker.keep_counts(amount)
    assert int(masker.mask(scores, amount).sum()) == int(keep.sum())


def test_soft_and_hard_masks_keep_the_top_scored_channels_of_each_group(digits):
    model = build_model(resnet_spec(8, (6, 8, 12), in_channels=1)).eval()
    masker = ChannelMask(model, torch.zeros(digits.input_shape))
    scores = torch.randn(masker.num_channels, requires_grad=True)
    for mode in ("soft", "hard"):
        m = masker.mask(scores, 0.5, temperature=0.1, mode=mode)
        for g in range(masker.groups.num_groups):
            ids = (masker.group_of == g).nonzero().flatten()
            top = ids[scores.detach()[ids].argsort(descending=True)[: int(masker.keep_counts(0.5)[g])]]
            assert (m.detach()[top] > 0.5).all() and int((m.detach()[ids] > 0.5).sum()) == len(top)
        m.sum().backward()  # the straight-through mask still passes gradient to the scores
        assert scores.grad is not None and scores.grad.abs().sum() > 0
        scores.grad = None


def test_optimised_scores_beat_random_scores_and_magnitude_start(trained, digits):
    """The per-network curve scores (``curve``) must keep better channels than random scores; a
    mask or scores wired wrong (e.g. keeping the lowest-scored channels) fails this."""
    x = torch.zeros(digits.input_shape)
    amounts = list(amounts_for(trained, x, [1.5, 3.0]).values())
    scores, masker = fit_scores(trained, digits, amounts, steps=30, batch_size=128, seed=0)
    amount = amounts_for(trained, x, [2.0])[2.0]
    fitted = masked_accuracy(trained, masker, scores, amount, digits)
    torch.manual_seed(0)
    random = [masked_accuracy(trained, masker, torch.randn(masker.num_channels), amount, digits) for _ in range(3)]
    assert fitted > max(random) + 0.1, (fitted, random)
    # as the pruner's importance: the recalibrated curve at 2x is above random pruning's
    cfg = RecipeConfig()
    curve = pruning_curve(trained, digits, cfg, (2.0,), criterion=GivenScores(masker.module_scores(scores)))[2.0]
    torch.manual_seed(0)
    rand = pruning_curve(trained, digits, cfg, (2.0,), criterion=criterion("random"))[2.0]
    assert curve > rand + 0.1, (curve, rand)
    assert curve == pytest.approx(fitted, abs=0.05)  # mask and pruner agree on what is left


def test_the_best_criterion_is_chosen_on_validation_not_test():
    rows = [{"method": "a", "network": n, "target": 2.0, "val_acc": 0.9, "test_acc": 0.5} for n in range(3)] + \
           [{"method": "b", "network": n, "target": 2.0, "val_acc": 0.8, "test_acc": 0.7} for n in range(3)]
    assert best_method(rows, ["a", "b"], "val_acc", 2.0) == "a"
    both, chosen = with_best(rows, ["a", "b"], "val_acc", [2.0])
    assert chosen == {2.0: "a"}
    assert sorted(r["test_acc"] for r in both if r["method"] == "best") == [0.5] * 3


def test_no_finetuning_after_pruning_reports_the_recalibrated_network(trained, digits):
    from metanet.recipe import prune_with_method

    cfg = RecipeConfig(target=2.0, before=TrainConfig(steps=3, lr=0.01, augment=False),
                       after=TrainConfig(steps=0, lr=0.01, augment=False))
    _, rec = prune_with_method(trained, digits, "fpgm", cfg)
    assert rec["criterion"] == "fpgm" and rec["speedup"] >= 2.0
    assert rec["test_acc"] == rec["test_acc_pruned"] and rec["val_acc"] == rec["val_acc_pruned"]


@pytest.mark.parametrize("flags, message", [
    (["--methods", "taylor", "l1"], "unknown method(s) ['l1']"),
    (["--methods", "none", "--criterion", "l1"], "--criterion must be one of magnitude"),
    (["--methods", "none", "--after-steps", "-5"], "--after-steps -5: must be greater than or equal to 0"),
    (["--methods", "none", "--before-steps", "-1"], "--before-steps -1: must be greater than or equal to 0"),
])
def test_prune_batch_refuses_unknown_methods_criteria_and_negative_budgets(flags, message):
    from pipelines import prune_batch

    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        prune_batch.parse_args(["--zoo", "z", *flags])


def test_a_criterion_that_cannot_score_a_group_leaves_it_to_magnitude(digits):
    """BNScale has nothing to read in a layer without BatchNorm; Torch-Pruning would skip that
    group (and cut the others harder): magnitude ranks it instead, so it is pruned as by magnitude."""
    model = build_model(vgg_spec(11, width_mult=0.125, input_size=8, in_channels=1, classifier=(16,))).eval()
    hidden = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][0]
    assert hidden.out_features == 16
    x = torch.zeros(digits.input_shape)
    pruned = {}
    for name in ("magnitude", "bn_scale"):
        work = copy.deepcopy(model)
        prune_to_speedup(work, x, 2.0, criterion=criterion(name))
        pruned[name] = [m for m in work.modules() if isinstance(m, torch.nn.Linear)][0]
    assert pruned["bn_scale"].out_features == pruned["magnitude"].out_features < 16


def test_the_prune_batch_summary_names_the_best_criterion_and_pairs_meta_and_curve_with_it():
    import pandas as pd

    from zoo.batch import COLUMNS, paired_summary

    rows = []
    for model in ("a", "b", "c"):
        for method, val, test in (("meta", 0.80, 0.81), ("none", 0.70, 0.72), ("taylor", 0.75, 0.70),
                                  ("curve", 0.90, 0.88)):
            rows.append(dict({k: None for k in COLUMNS}, model=model, method=method, target=2.0, floor=float("nan"),
                             status="ok", val_acc=val, test_acc=test, val_acc_pruned=val - 0.2,
                             test_acc_pruned=test - 0.2, auc=float("nan")))
    text = paired_summary(pd.DataFrame(rows, columns=COLUMNS))
    assert "best hand-crafted criterion by validation accuracy: 2x taylor" in text  # on val, though none wins test
    assert "| meta - best | +11.0 [+11.0, +11.0] |" in text and "| curve - best | +18.0 [+18.0, +18.0] |" in text
    assert "| meta - none |" in text and "| meta - curve |" in text and "right after pruning" in text
