"""What one forward pass shows about a network: the order its Conv/Linear layers are called, which
BatchNorm alone reads a layer's output unchanged, the tensors at chosen layers; and its residual
blocks (``RESIDUAL_BLOCKS``). Hooks only: the network is not changed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


# residual blocks, by class: (the last convolution, its BatchNorm, the shortcut: a module, or None
# or absent for the identity) whose outputs are summed before the block's activation
RESIDUAL_BLOCKS = {
    "zoo.arch.BasicBlock": ("conv2", "bn2", "shortcut"),
    "torchvision.models.resnet.BasicBlock": ("conv2", "bn2", "downsample"),
    "torchvision.models.resnet.Bottleneck": ("conv3", "bn3", "downsample"),
}


@dataclass(frozen=True)
class ResidualBlock:
    """A residual block around a last convolution: names of its BatchNorm, shortcut (None: the
    identity, read as the block's input) and the block itself."""

    bn: str
    shortcut: str | None
    block: str


def residual_blocks(model: nn.Module) -> dict[str, ResidualBlock]:
    """{last convolution's name: its block} for the ``RESIDUAL_BLOCKS`` in ``model``."""
    found = {}
    for name, m in model.named_modules():
        layout = RESIDUAL_BLOCKS.get(f"{type(m).__module__}.{type(m).__qualname__}")
        if layout is None:
            continue
        conv, bn, shortcut = layout
        prefix = f"{name}." if name else ""
        short = getattr(m, shortcut, None)
        found[prefix + conv] = ResidualBlock(prefix + bn, prefix + shortcut if isinstance(short, nn.Module)
                                      and not isinstance(short, nn.Identity) else None, name)
    return found


class _Stop(Exception):
    """Raised by a hook once the layer being fitted has been seen: the rest of the forward is not needed."""


def call_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The Conv/Linear modules of ``model`` in the order one forward pass calls them."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda m, a, n=name: order.append(n) if n not in order else None)
               for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return order


def norms_fed(model: nn.Module, x: torch.Tensor) -> dict[str, nn.Module]:
    """{name: BatchNorm} for each Conv/Linear without a bias whose output only that BatchNorm reads,
    unchanged, from one forward pass on ``x``: where an intercept can be folded
    (``ReconstructSettings.intercept``). Refused: an output read by any other module too, or
    changed in place before the BatchNorm (a ``ReLU(inplace=True)``, a residual ``+=``); a
    BatchNorm called more than once; a Linear's output over tokens (``BatchNorm1d`` would
    normalise the tokens, not its channels). Module hooks do not see a functional reader (an
    ``out + shortcut`` on the layer's own output): such a network should keep the intercept off."""
    modules = dict(model.named_modules())
    # id -> (layer name, the tensor: kept alive so its id is not reused in the pass, its version)
    made: dict[int, tuple[str, torch.Tensor, int]] = {}
    readers: dict[str, list] = {}  # layer name -> what read its output (a BatchNorm, or None: another module)
    calls: dict[nn.Module, int] = {}

    def made_by(name, layer):
        def hook(m, a, out):
            if isinstance(layer, nn.Conv2d) or out.dim() == 2:
                made[id(out)] = (name, out, out._version)
        return hook

    def read_by(module):
        def hook(m, a):  # returns None: a pre-hook's return value would replace the input
            norm = module if isinstance(module, nn.modules.batchnorm._BatchNorm) else None
            if norm is not None:
                calls[norm] = calls.get(norm, 0) + 1
            for value in a:
                if isinstance(value, torch.Tensor) and id(value) in made:
                    name, tensor, version = made[id(value)]
                    readers.setdefault(name, []).append(norm if value._version == version else None)
        return hook

    handles = [m.register_forward_hook(made_by(n, m)) for n, m in modules.items()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is None]
    handles += [m.register_forward_pre_hook(read_by(m)) for m in modules.values() if not list(m.children())]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return {name: got[0] for name, got in readers.items()
            if len(got) == 1 and got[0] is not None and got[0].track_running_stats and calls[got[0]] == 1}


def capture(model: nn.Module, wants: Sequence[tuple[str, str]], x: torch.Tensor) -> list[torch.Tensor]:
    """What ``model`` computes on ``x`` at each of ``wants`` (module name, "input" or "output"), from
    one forward pass that stops once all are seen."""
    modules = dict(model.named_modules())
    seen: dict[tuple[str, str], torch.Tensor] = {}

    def keep(key, value):
        seen.setdefault(key, value)
        if len(seen) == len(wants):
            raise _Stop

    handles = []
    for name, want in dict.fromkeys(wants):
        if want == "input":
            handles.append(modules[name].register_forward_pre_hook(lambda m, a, k=(name, want): keep(k, a[0])))
        else:
            handles.append(modules[name].register_forward_hook(lambda m, a, out, k=(name, want): keep(k, out)))
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, w in wants if (n, w) not in seen]
    if missing:
        raise RuntimeError(f"layer {missing[0]} was not called as a module in the forward pass")
    return [seen[w] for w in wants]
