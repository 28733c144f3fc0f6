"""Shared helpers: networks with non-trivial BatchNorm state, so that round trips are meaningful."""

import os

import pytest
import torch
from torch import nn


def randomize_state(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN weights, biases, running statistics and batch counters, random Linear/Conv biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(0, 1000, (1,), generator=g)))
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


def permute_hidden_channels(model, perm):
    """Reorders the output channels of layers.0.conv1 (and its BN, and the next conv's inputs):
    the same function, a different parameterisation."""
    block = model.layers[0]
    with torch.no_grad():
        block.conv1.weight.copy_(block.conv1.weight[perm])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(block.bn1, name).copy_(getattr(block.bn1, name)[perm])
        block.conv2.weight.copy_(block.conv2.weight[:, perm])
    return model


@pytest.fixture(scope="session")
def digits():
    from zoo.data import load_digits

    return load_digits()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri():
    """``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` in ``os.environ``, which every
    pipeline a later test runs as a subprocess would inherit (and log there): no test starts with
    it or leaves it behind."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def build_digits_zoo(root, members: int = 3, val: float = 0.34, test: float = 0.34, seed: int = 1):
    """A tiny digits zoo built in-process (what make_zoo's tasks do, without Ray): ResNet-8s of
    width 4-8, trained 3 epochs; roles from the val/test fractions (hash buckets of the ids: seed 1
    gives the 3 members one role each)."""
    from pathlib import Path

    import yaml

    from zoo.build import build_member
    from zoo.data import load_digits
    from zoo.spec import members as plan
    from zoo.store import Zoo

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "zoo/specs/digits.yaml").read_text())
    spec.update(members=members, val_members=val, test_members=test, output=str(root), seed=seed)
    spec["families"] = [{"family": "resnet", "depths": [8], "stage_widths": [[4], [6], [8]], "shortcut": ["identity"]}]
    spec["train"]["epochs"], spec["finetune"]["epochs"] = 3, 1
    zoo = Zoo.create(str(root))
    zoo.write_spec(spec)
    data = load_digits()
    for m in plan(spec, 1, 10, 8):
        zoo.write(m.id, [build_member(spec, m, data)], manifest=False)
    zoo.write_manifest()
    return zoo


@pytest.fixture(scope="module")
def trained(digits):
    """A digits ResNet wide enough for 2% steps of uniform pruning (16, 24, 32 channels), trained two
    epochs with seed 0: the allocation tests' network (one per test module, the same in each)."""
    from metanet.train import TrainConfig, train
    from zoo.arch import build_model, resnet_spec

    torch.manual_seed(0)
    model = build_model(resnet_spec(8, (16, 24, 32), in_channels=1))
    train(model, digits, TrainConfig(epochs=2, lr=0.1, augment=False))
    return model.eval()

