"""The Python API (metanet/api.py): the README's example inside Torch-Pruning's own pruner, every
criterion as an importance, the recipe in one call, and bad inputs named in one line."""

import re
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
import torchvision

from metanet import api
from metanet.metanetwork import MetaNetConfig, MetaNetwork, save_metanetwork
from metanet.train import TrainConfig, train
from zoo.arch import build_model, resnet_spec

ROOT = Path(__file__).resolve().parents[1]


def _demo_like(path) -> str:
    """An untrained metanetwork with the demo's learned-criterion settings (curve: a per-channel MLP
    reading calibration statistics and the curve gradient), saved at ``path``."""
    net = MetaNetwork(MetaNetConfig(edge_widths={"k3x3": 9}, edit="scores", layers=0, hidden=16, evidence=True,
                                    calibration=True, gradient=True))
    torch.nn.init.normal_(net.score_decoder[-1].weight, std=20.0)  # scores that are not magnitude's
    save_metanetwork(net, str(path))
    return str(path)


def test_the_readme_example_prunes_a_torchvision_resnet18_in_torch_prunings_own_pruner():
    """The README's Python block, run as written, with the shipped metanetwork (meta-trained on the
    CIFAR-10 zoo's 3x3 ResNets and VGGs, it reads ResNet-18's 7x7 stem: a per-channel metanetwork
    reads any architecture)."""
    readme = (ROOT / "README.md").read_text()
    [code] = re.findall(r"```python\n(.*?)```", readme, re.S)
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), scope)
    full = tp.utils.count_ops_and_params(torchvision.models.resnet18(num_classes=10), scope["example_inputs"])[0]
    assert scope["macs"] < 0.5 * full  # half the channels of every prunable layer: about a quarter of the MACs
    assert scope["model"](scope["example_inputs"]).shape == (1, 10)


def test_every_criterion_is_an_importance_and_the_learned_one_ranks_as_its_scores(tmp_path, digits):
    torch.manual_seed(0)
    model = build_model(resnet_spec(8, (8, 12, 16), in_channels=1)).eval()
    train(model, digits, TrainConfig(steps=30, lr=0.05, batch_size=64, augment=False))
    x = torch.zeros(digits.input_shape)
    batches = list(digits.batches("train", 64, limit=2))
    path = _demo_like(tmp_path / "m.pt")
    kept = {}
    for name in ("meta", "curve", "magnitude", "fpgm"):
        imp = api.importance(model, x, name, metanet=path, calibration=batches, data=digits, curve_steps=5)
        assert isinstance(imp, tp.importance.Importance)
        work = build_model(resnet_spec(8, (8, 12, 16), in_channels=1)).eval()
        work.load_state_dict(model.state_dict())
        imp = api.importance(work, x, name, metanet=path, calibration=batches, data=digits, curve_steps=5)
        pruner = tp.pruner.MetaPruner(work, x, importance=imp, pruning_ratio=0.5, ignored_layers=[work.fc])
        pruner.step()
        kept[name] = work.conv1.weight.detach().clone()
    assert all(k.shape[0] == 4 for k in kept.values())  # half of the stem's 8 channels, by every criterion
    assert not torch.equal(kept["meta"], kept["magnitude"])  # the learned scores chose other channels


def test_the_recipe_in_one_call(digits):
    torch.manual_seed(0)
    model = build_model(resnet_spec(8, (8, 12, 16), in_channels=1)).eval()
    train(model, digits, TrainConfig(steps=30, lr=0.05, batch_size=64, augment=False))
    before = [p.detach().clone() for p in model.parameters()]
    pruned, record = api.prune(model, digits, 2.0, "fpgm", before_steps=0, finetune_steps=5, reconstruct=True)
    assert record["speedup"] >= 2.0 * 0.98 and record["criterion"] == "fpgm" and 0 <= record["test_acc"] <= 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model itself is not changed


def test_the_shipped_metanetworks_choose_which_and_how_many_channels_with_nothing_given(digits):
    """``api.prune(..., "meta", allocation="learned")`` with no metanetwork: the shipped criterion
    ranks, the shipped allocator sets the widths (trained on CIFAR-10, they read a digits network)."""
    torch.manual_seed(0)
    model = build_model(resnet_spec(8, (8, 12, 16), in_channels=1)).eval()
    train(model, digits, TrainConfig(steps=30, lr=0.05, batch_size=64, augment=False))
    found = {}
    for allocation in ("uniform", "learned"):
        pruned, record = api.prune(model, digits, 2.0, "meta", allocation=allocation, before_steps=0,
                                   finetune_steps=0)
        assert record["criterion"] == "scores" and record["speedup"] >= 2.0 * 0.98
        found[allocation] = [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    assert found["learned"] != found["uniform"]  # the shipped allocator keeps other widths than uniform


def test_bad_inputs_are_named(digits, tmp_path):
    model = build_model(resnet_spec(8, (8, 12, 16), in_channels=1)).eval()
    x = torch.zeros(digits.input_shape)
    with pytest.raises(ValueError, match="reads calibration statistics: give calibration"):
        api.importance(model, x, "meta")  # the shipped metanetwork reads them
    with pytest.raises(ValueError, match="unknown criterion 'sharpest'; known: meta, curve, magnitude"):
        api.importance(model, x, "sharpest")
    with pytest.raises(ValueError, match="'curve' fits scores on the task's training split"):
        api.importance(model, x, "curve")
    with pytest.raises(ValueError, match="reads calibration statistics: give calibration"):
        api.importance(model, x, "meta", metanet=_demo_like(tmp_path / "m.pt"))
    with pytest.raises(FileNotFoundError, match="metanetwork file not found: nowhere.pt"):
        api.load_metanetwork("nowhere.pt")
    with pytest.raises(ValueError, match="method must be one of"):
        api.prune(model, digits, 2.0, "sharpest")
    with pytest.raises(ValueError, match="unknown allocation 'greedy'; known: uniform"):
        api.prune(model, digits, 2.0, "fpgm", allocation="greedy")
