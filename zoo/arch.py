"""Architectures of the zoo, described by JSON-able specs with one width per layer.

A spec is enough to rebuild the module (``build_model(spec)``), and ``arch_spec(model)`` reads the
spec back from a module, including one whose layers Torch-Pruning has already narrowed to uneven
widths. That is how a pruned network is stored in the zoo and rebuilt later without pickles.

Families:
- ``resnet``: CIFAR-style ResNet of BasicBlocks (depth 6n+2), identity or projection shortcuts;
- ``vgg``: VGG with BatchNorm, global average pooling and a small classifier;
- ``mlp`` and ``cnn``: small networks for tests and quick experiments;
- ``import``: a constructor from torchvision's or timm's model collections with keyword arguments
  (``{"family": "import", "target": "torchvision.models:mobilenet_v2", "kwargs": {"num_classes":
  10}}``, written ``torchvision.models:mobilenet_v2,num_classes=10`` on a command line), so a
  state dict of such a network loads without pickles. Only those modules are imported: a spec is
  read from files too, and naming any callable there would run code the file chose.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

Spec = dict[str, Any]

VGG_CONFIGS: dict[int, list[Any]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}


# ----------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (identity, or 1x1 conv + BN), then ReLU."""

    def __init__(self, in_width: int, mid_width: int, out_width: int, stride: int, projection: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_width, mid_width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_width)
        self.conv2 = nn.Conv2d(mid_width, out_width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_width)
        self.relu = nn.ReLU()
        if projection or stride != 1 or in_width != out_width:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_width, out_width, 1, stride, bias=False), nn.BatchNorm2d(out_width)
            )
        else:
            self.shortcut = nn.Identity()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: a 3x3 stem, three stages of BasicBlocks, global pooling, Linear."""

    def __init__(self, stem_width: int, blocks: list[list[int]], shortcut: str,
                 in_channels: int, num_classes: int):
        super().__init__()
        if shortcut not in ("identity", "projection"):
            raise ValueError(f"resnet shortcut must be 'identity' or 'projection', not {shortcut!r}")
        self.shortcut_kind = shortcut
        self.conv1 = nn.Conv2d(in_channels, stem_width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU()
        layers, width = [], stem_width
        for mid, out, stride in blocks:
            layers.append(BasicBlock(width, mid, out, stride, projection=shortcut == "projection"))
            width = out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_spec(depth: int, widths: tuple[int, int, int] = (16, 32, 64), *, in_channels: int = 3,
                num_classes: int = 10, shortcut: str = "identity") -> Spec:
    """Spec of a CIFAR ResNet of ``depth`` = 6n+2 layers with stage widths ``widths``."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    blocks = [[w, w, 1 if (s == 0 or b > 0) else 2] for s, w in enumerate(widths) for b in range(n)]
    return {"family": "resnet", "stem_width": widths[0], "blocks": blocks, "shortcut": shortcut,
            "in_channels": in_channels, "num_classes": num_classes}


# -------------------------------------------------------------------------------------- VGG
class VGGBN(nn.Module):
    """VGG: [conv3x3-BN-ReLU | maxpool]*, global average pooling, Linear-ReLU*, Linear."""

    def __init__(self, layers: list[Any], classifier: list[int], in_channels: int, num_classes: int):
        super().__init__()
        feats: list[nn.Module] = []
        width = in_channels
        for item in layers:
            if item == "M":
                feats.append(nn.MaxPool2d(2))
            else:
                feats += [nn.Conv2d(width, int(item), 3, padding=1, bias=False),
                          nn.BatchNorm2d(int(item)), nn.ReLU()]
                width = int(item)
        self.features = nn.Sequential(*feats)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = []
        for hidden in classifier:
            head += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        head.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def vgg_spec(depth: int, *, width_mult: float = 1.0, input_size: int = 32, in_channels: int = 3,
             num_classes: int = 10, classifier: tuple[int, ...] = ()) -> Spec:
    """Spec of VGG-``depth`` with BN; pools that would shrink ``input_size`` below 1 are dropped."""
    if depth not in VGG_CONFIGS:
        raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth}")
    layers: list[Any] = []
    size = input_size
    for item in VGG_CONFIGS[depth]:
        if item == "M":
            if size >= 2:
                layers.append("M")
                size //= 2
        else:
            layers.append(max(1, round(item * width_mult)))
    return {"family": "vgg", "layers": layers, "classifier": list(classifier),
            "in_channels": in_channels, "num_classes": num_classes}


# ------------------------------------------------------------------------------- MLP / CNN
class MLP(nn.Module):
    """Flatten, then Linear-ReLU per hidden width, then Linear."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SimpleCNN(nn.Module):
    """conv-BN-ReLU-maxpool per width, then the spatial map flattened straight into Linear layers."""

    def __init__(self, widths: list[int], hidden: list[int], in_channels: int, num_classes: int,
                 input_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        width, size = in_channels, input_size
        for w in widths:
            layers += [nn.Conv2d(width, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            width, size = w, size // 2
        layers.append(nn.Flatten())
        width = width * size * size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ------------------------------------------------------------------------- spec <-> module
IMPORTABLE_MODULES = ("torchvision.models", "timm")
IMPORTED_SPEC = "_metaprune_arch"  # the import spec a module was built from (``arch_spec`` reads it)


def parse_import_arch(text: str) -> Spec:
    """``"package.module:name,key=value,..."`` -> an ``import`` spec; values are read as YAML
    scalars (``10``, ``0.5``, ``true``, ``resnet``)."""
    import yaml

    target, *pairs = [part.strip() for part in text.split(",")]
    if target.count(":") != 1 or not all(target.split(":")):
        raise ValueError(f"architecture {text!r}: expected MODULE:NAME[,key=value...], "
                         "e.g. torchvision.models:mobilenet_v2,num_classes=10")
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"architecture {text!r}: {pair!r} is not key=value")
        kwargs[key.strip()] = yaml.safe_load(value)
    return {"family": "import", "target": target, "kwargs": kwargs}


def _build_imported(spec: Spec) -> nn.Module:
    import importlib

    unknown = sorted(set(spec) - {"target", "kwargs"})
    if unknown:
        raise ValueError(f"bad 'import' architecture spec: unknown key(s) {unknown}")
    module_name, _, name = str(spec.get("target", "")).partition(":")
    if not any(module_name == m or module_name.startswith(m + ".") for m in IMPORTABLE_MODULES):
        raise ValueError(f"architecture target {spec.get('target')!r}: only constructors from "
                         f"{', '.join(IMPORTABLE_MODULES)} are imported")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"architecture target {spec['target']!r}: cannot import {module_name} ({err})") from None
    kwargs = dict(spec.get("kwargs") or {})
    if module_name == "timm" and not hasattr(module, name):  # timm's models are created by name
        constructor = lambda **kw: module.create_model(name, **kw)  # noqa: E731
    else:
        constructor = getattr(module, name, None)
    if not callable(constructor):
        raise ValueError(f"architecture target {spec['target']!r}: {module_name} has no constructor {name!r}")
    try:
        model = constructor(**kwargs)
    except Exception as err:  # the library's own argument checks
        raise ValueError(f"architecture {spec['target']} with {kwargs}: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"architecture target {spec['target']!r} made a {type(model).__name__}, not a module")
    setattr(model, IMPORTED_SPEC, {"family": "import", "target": spec["target"], "kwargs": kwargs})
    return model


def build_model(spec: Spec) -> nn.Module:
    """A freshly initialised module of the architecture ``spec`` describes."""
    spec = copy.deepcopy(spec)
    family = spec.pop("family", None)
    if family == "import":
        return _build_imported(spec)
    try:
        if family == "resnet":
            return CifarResNet(**spec)
        if family == "vgg":
            return VGGBN(**spec)
        if family == "mlp":
            return MLP(**spec)
        if family == "cnn":
            return SimpleCNN(**spec)
    except TypeError as err:
        raise ValueError(f"bad {family!r} architecture spec {spec}: {err}") from None
    raise ValueError(f"unknown architecture family {family!r}; known: resnet, vgg, mlp, cnn, import")


def _linear_widths(layers: nn.Sequential) -> list[int]:
    return [m.out_features for m in layers if isinstance(m, nn.Linear)]


def arch_spec(model: nn.Module) -> Spec:
    """The spec of ``model`` as it is now (after pruning too): ``build_model`` rebuilds its shape.
    For an imported architecture, the spec it was built from (its unpruned shape)."""
    if hasattr(model, IMPORTED_SPEC):
        return copy.deepcopy(getattr(model, IMPORTED_SPEC))
    if isinstance(model, CifarResNet):
        blocks = [[b.conv1.out_channels, b.conv2.out_channels, b.stride] for b in model.layers]
        return {"family": "resnet", "stem_width": model.conv1.out_channels, "blocks": blocks,
                "shortcut": model.shortcut_kind, "in_channels": model.conv1.in_channels,
                "num_classes": model.fc.out_features}
    if isinstance(model, VGGBN):
        layers = ["M" if isinstance(m, nn.MaxPool2d) else m.out_channels
                  for m in model.features if isinstance(m, (nn.MaxPool2d, nn.Conv2d))]
        in_channels = next(m for m in model.features if isinstance(m, nn.Conv2d)).in_channels
        widths = _linear_widths(model.classifier)
        return {"family": "vgg", "layers": layers, "classifier": widths[:-1],
                "in_channels": in_channels, "num_classes": widths[-1]}
    if isinstance(model, MLP):
        first = next(m for m in model.net if isinstance(m, nn.Linear))
        widths = _linear_widths(model.net)
        return {"family": "mlp", "in_features": first.in_features, "hidden": widths[:-1],
                "num_classes": widths[-1]}
    if isinstance(model, SimpleCNN):
        convs = [m for m in model.net if isinstance(m, nn.Conv2d)]
        first_linear = next(m for m in model.net if isinstance(m, nn.Linear))
        size = int(round((first_linear.in_features / convs[-1].out_channels) ** 0.5)) * 2 ** len(convs)
        widths = _linear_widths(model.net)
        return {"family": "cnn", "widths": [c.out_channels for c in convs], "hidden": widths[:-1],
                "in_channels": convs[0].in_channels, "num_classes": widths[-1], "input_size": size}
    raise ValueError(f"arch_spec: {type(model).__name__} is not a zoo architecture "
                     "(resnet, vgg, mlp, cnn); save it as a whole module instead")
