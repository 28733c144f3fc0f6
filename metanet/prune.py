"""Structured pruning with Torch-Pruning to a target MAC speed-up, and saving pruned networks.

Channels ranked by a criterion (``metanet.criteria``: the method's group L2 magnitude by default,
or any of Torch-Pruning's other importances, or given per-channel scores), in small iterative
steps, stopping at the first step whose MACs speed-up reaches the target; the classifier's outputs
are never pruned. ``amounts_for`` says what fraction of every layer a speed-up removes.
``prune_adaptive`` instead prunes while a score (validation accuracy, say) stays at or above
a floor. ``recalibrate_bn`` recomputes BatchNorm statistics after pruning.

How channels are chosen is a ``PruneSettings``. The default prunes the same fraction of every
layer (``global_pruning=False``), chosen by ``bench/pruner_settings.py`` on held-out digits
networks (docs/method.md, "The pruning recipe's defaults"): the paper's global ranking with
max-normalised importance collapsed whole layers (one ResNet's last stage went from 20 channels
to 1), because importances inside a group are nearly flat, so one outlier channel pushes the rest
below every other group. ``prune_adaptive`` judges accuracy as its caller's ``score`` does (the
recipe recalibrates BatchNorm first).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from metanet.criteria import Batches, Criterion, Magnitude, WithFallback
from metanet.files import atomic_write
from metanet.sparsity import UnprunableNetworkError, classifier_of, torch_pruning_options

PRUNED_FORMAT = "metaprune.pruned/1"


class UnreachableSpeedupError(ValueError):
    """The target speed-up cannot be reached within the pruning schedule."""


# per pruned Conv/Linear (by module name): the unpruned layer's indices of the output and input
# channels it kept, in order (``metanet.reconstruct`` maps the unpruned network's activations with it)
ChannelMap = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]


@dataclass
class PruneResult:
    model: nn.Module
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    steps: int
    channels: ChannelMap = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    def summary(self) -> dict:
        return {"speedup": self.speedup, "macs_before": self.macs_before, "macs_after": self.macs_after,
                "params_before": self.params_before, "params_after": self.params_after, "steps": self.steps}


_SCALARS = (bool, int, float, str, type(None))
_COUNTS: dict[tuple, tuple[int, int]] = {}  # structure -> Torch-Pruning's (MACs, parameters)
_COUNTS_MAX = 8192


def structure(model: nn.Module, example_inputs: torch.Tensor) -> tuple:
    """Everything Torch-Pruning's count of MACs and parameters depends on: the input's shape, and
    per module its name, class, ``extra_repr`` (kernel, stride, groups, ...), plain attributes and
    parameter and buffer shapes. Weights' values are not part of it."""
    def plain(v) -> bool:
        return isinstance(v, _SCALARS) or (isinstance(v, tuple) and all(isinstance(e, _SCALARS) for e in v))

    parts: list = [tuple(example_inputs.shape)]
    for name, m in model.named_modules():
        attrs = tuple(sorted((k, v) for k, v in vars(m).items() if not k.startswith("_") and k != "training"
                             and plain(v)))
        parts.append((name, type(m).__module__, type(m).__qualname__, m.extra_repr(), attrs,
                      tuple((n, tuple(t.shape)) for n, t in m.named_parameters(recurse=False)),
                      tuple((n, tuple(t.shape)) for n, t in m.named_buffers(recurse=False))))
    return tuple(parts)


def count(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) of ``model`` for one input shaped like ``example_inputs``, as
    Torch-Pruning counts them; remembered per ``structure``. Per-layer pruning removes the same
    channels' count from a layer whatever the weights, so pruning one architecture again (another
    method, target or seed) meets the same structures step after step: counting was 70% of
    pruning time (352 counts of 12 ms in one quality-benchmark job) before it was remembered."""
    key = structure(model, example_inputs)
    if key not in _COUNTS:
        was_training = model.training
        model.eval()
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
        model.train(was_training)
        if len(_COUNTS) >= _COUNTS_MAX:
            _COUNTS.clear()
        _COUNTS[key] = (int(macs), int(params))
    return _COUNTS[key]


@dataclass(frozen=True)
class PruneSettings:
    """How channels are chosen. ``global_pruning``: rank channels of all layers together (the
    paper) or prune the same fraction of every layer; ``max_ratio``: the most of one layer's
    channels that may go; ``normalizer``: Torch-Pruning's importance normaliser within a group
    (``'max'``, ``'mean'``, ``'sum'``, ``'standarization'``, or None); ``steps``: the iterative
    schedule (a step prunes ``max_ratio / steps`` more of each layer, or the global equivalent);
    ``refresh``: how often a data-driven criterion (Taylor, Hessian) recomputes its gradients on
    the calibration batches. Torch-Pruning prunes a gradient with its parameter, so between
    refreshes the gradients stay aligned with the channels that remain; every step (``refresh=1``,
    Torch-Pruning's benchmark) made Hessian pruning of a digits ResNet-20 to 3x take 18 s."""

    global_pruning: bool = False
    max_ratio: float = 0.9
    normalizer: str | None = "max"
    steps: int = 200
    refresh: int = 10  # data-driven criteria recompute their gradients every this many steps
    isomorphic: bool = False  # global ranking within Torch-Pruning's isomorphic groups (ECCV 2024)

    def label(self) -> str:
        scope = "global" if self.global_pruning else "per-layer"
        return f"{scope}, cap {self.max_ratio:g}, normalizer {self.normalizer}"


DEFAULT_PRUNING = PruneSettings()


MAGNITUDE = Magnitude()


class _Pruning:
    """One network's iterative pruning run: Torch-Pruning's pruner with the criterion's importance,
    stepped interactively so the criterion sees every group before it is pruned."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, settings: PruneSettings,
                 criterion: Criterion | None, batches: Batches | None, ratios: Mapping[str, float] | None = None,
                 steps: int | None = None):
        self.model, self.criterion, self.batches = model, criterion or MAGNITUDE, batches
        self.refresh, self.done, self.stale = max(1, settings.refresh), 0, True
        self.names = {m: n for n, m in model.named_modules()}
        self.kept: dict[str, dict[str, list[int]]] = {}
        self.importance = self.criterion.importance(model, settings.normalizer)
        if not isinstance(self.criterion, Magnitude):  # a group the criterion cannot score: magnitude's ranking
            self.importance = WithFallback(self.importance, MAGNITUDE.importance(model, settings.normalizer))
        # an allocation (``ratios``): each group's own fraction, reached over ``steps`` steps; the
        # rest of the network is not pruned
        per_group = {} if ratios is None else _root_modules(model, ratios)
        self.pruner = tp.pruner.BasePruner(
            model, example_inputs, importance=self.importance, global_pruning=settings.global_pruning,
            pruning_ratio=settings.max_ratio if ratios is None else 0.0, pruning_ratio_dict=per_group,
            max_pruning_ratio=settings.max_ratio, iterative_steps=steps or settings.steps,
            isomorphic=settings.isomorphic, ignored_layers=[classifier_of(model)], **torch_pruning_options(model))

    def step(self) -> None:
        if self.stale or self.done % self.refresh == 0:
            self.criterion.before_step(self.model, self.importance, self.batches)
            self.stale = False
        self.prune_groups()
        for m in self.model.modules():  # widths kept as plain attributes (torchvision's ViT reshapes with hidden_dim)
            if isinstance(getattr(m, "hidden_dim", None), int) and isinstance(getattr(m, "conv_proj", None), nn.Conv2d):
                m.hidden_dim = m.conv_proj.out_channels
        self.done += 1

    def clean(self) -> None:
        """Drops the gradients a data-driven criterion left on the model (before it is handed out)."""
        if self.criterion.data_driven:
            self.model.zero_grad(set_to_none=True)
            self.stale = True

    def channels(self) -> ChannelMap:
        """The kept channels of every Conv/Linear pruned so far (a copy: ``ChannelMap``)."""
        return {name: (tuple(kept["out"]), tuple(kept["in"])) for name, kept in self.kept.items()}

    def track(self, group) -> None:
        """Records which channels ``group`` is about to remove from each Conv/Linear, as
        Torch-Pruning applies its items: one after another, each index relative to the layer then."""
        graph = self.pruner.DG
        for dep, idxs in group:
            layer = dep.target.module
            name = self.names.get(layer) if isinstance(layer, (nn.Conv2d, nn.Linear)) else None
            if name is None:
                continue
            side = ("out" if graph.is_out_channel_pruning_fn(dep.handler) else
                    "in" if graph.is_in_channel_pruning_fn(dep.handler) else None)
            if side is None:
                continue
            conv = isinstance(layer, nn.Conv2d)
            kept = self.kept.setdefault(name, {  # first touched: the layer is still unpruned
                "out": list(range(layer.out_channels if conv else layer.out_features)),
                "in": list(range(layer.in_channels if conv else layer.in_features))})
            drop = {int(getattr(i, "idx", i)) for i in idxs}
            kept[side] = [c for k, c in enumerate(kept[side]) if k not in drop]

    def prune_groups(self) -> None:
        try:
            for group in self.pruner.step(interactive=True):
                self.criterion.observe(self.importance, group)
                self.track(group)
                group.prune()
        except IndexError as err:
            if not _raised_in_torch_pruning(err):  # our own bug (a criterion's table): not the network's fault
                raise
            raise UnprunableNetworkError(  # Torch-Pruning's channel index maps do not fit this network
                f"{type(self.model).__name__}: Torch-Pruning failed to prune it ({err}); networks with channel "
                "splits or shuffles (ShuffleNet) are not prunable with Torch-Pruning 1.6") from None


def _root_modules(model: nn.Module, ratios: Mapping[str, float]) -> dict[nn.Module, float]:
    modules = dict(model.named_modules())
    for name, ratio in ratios.items():
        if name not in modules:
            raise ValueError(f"no prunable group {name!r} in {type(model).__name__}")
        if not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"group {name!r}: fraction removed {ratio!r} must be in [0, 1)")
    return {modules[name]: float(ratio) for name, ratio in ratios.items()}


def prunable_groups(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, int]:
    """{the root Conv/Linear of each group the pruner prunes (by module name): its output channels},
    in Torch-Pruning's order: what an allocation gives a fraction to (a residual stage's coupled
    layers are one group; the classifier's outputs are never pruned). Remembered per ``structure``:
    an allocation asks for every candidate and every step of its search."""
    key = structure(model, example_inputs)
    if key not in _GROUPS:
        if len(_GROUPS) >= _COUNTS_MAX:
            _GROUPS.clear()
        _GROUPS[key] = _trace_groups(model, example_inputs)
    return dict(_GROUPS[key])


_GROUPS: dict[tuple, dict[str, int]] = {}  # structure -> prunable groups


def _trace_groups(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, int]:
    work = copy.deepcopy(model).eval()
    names = {m: n for n, m in work.named_modules()}
    with torch.enable_grad():  # Torch-Pruning traces the dependency graph with autograd
        pruner = tp.pruner.BasePruner(work, example_inputs, importance=MAGNITUDE.importance(work, None),
                                      ignored_layers=[classifier_of(work)], **torch_pruning_options(work))
    graph, out = pruner.DG, {}
    for group in graph.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        dep = group[0].dep
        if graph.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names:
            out[names[dep.target.module]] = int(graph.get_out_channels(dep.target.module))
    return out


def prune_allocated(model: nn.Module, example_inputs: torch.Tensor, ratios: Mapping[str, float],
                    settings: PruneSettings = DEFAULT_PRUNING, criterion: Criterion | None = None,
                    batches: Batches | None = None, steps: int = 20) -> PruneResult:
    """Prunes ``model`` in place to an allocation: each group in ``ratios`` (its root module's name,
    ``prunable_groups``) loses that fraction of its channels (Torch-Pruning's count: the floor of
    what it keeps), over ``steps`` iterative steps, channels ranked by ``criterion`` (default
    magnitude; a data-driven one reads ``batches()``); groups not named keep all their channels."""
    model.eval()
    macs0, params0 = count(model, example_inputs)
    pruning = _Pruning(model, example_inputs, settings, criterion, batches, ratios=ratios, steps=steps)
    for _ in range(steps):
        pruning.step()
    pruning.clean()
    macs, params = count(model, example_inputs)
    return PruneResult(model, macs0, macs, params0, params, steps, pruning.channels())


def _raised_in_torch_pruning(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}torch_pruning{os.sep}" in tb.tb_frame.f_code.co_filename


def prune_in_steps(model: nn.Module, example_inputs: torch.Tensor, targets: Sequence[float],
                   settings: PruneSettings = DEFAULT_PRUNING, criterion: Criterion | None = None,
                   batches: Batches | None = None) -> Iterator[tuple[float, PruneResult]]:
    """Prunes ``model`` in place along one iterative schedule and yields ``(target, result)`` at
    the first step that reaches each of ``targets`` (ascending), so a whole accuracy-against-speed-up
    curve costs one pruning run. ``result.model`` is ``model`` itself: copy it to keep it.
    ``criterion`` (``metanet.criteria``; default magnitude) ranks channels; a data-driven one
    reads ``batches()`` (calibration batches) before every step."""
    targets = sorted(float(t) for t in targets)
    for t in targets:
        if not (t > 1 and math.isfinite(t)):
            raise ValueError(f"target speed-up must be a finite number > 1, got {t}")
    model.eval()
    macs0, params0 = count(model, example_inputs)
    pruning = _Pruning(model, example_inputs, settings, criterion, batches)
    macs, params, done = macs0, params0, 0
    for target in targets:
        while macs0 / macs < target:
            if done >= settings.steps:
                raise UnreachableSpeedupError(
                    f"target speed-up {target}x cannot be reached: {settings.steps} steps (pruning at most "
                    f"{settings.max_ratio:.0%} of each layer's channels) reach {macs0 / macs:.2f}x")
            pruning.step()
            done += 1
            macs, params = count(model, example_inputs)
        pruning.clean()
        yield target, PruneResult(model, macs0, macs, params0, params, done, pruning.channels())


def prune_to_speedup(model: nn.Module, example_inputs: torch.Tensor, target: float,
                     settings: PruneSettings = DEFAULT_PRUNING, criterion: Criterion | None = None,
                     batches: Batches | None = None) -> PruneResult:
    """Prunes ``model`` in place until MACs(before) / MACs(now) >= ``target``."""
    for _, result in prune_in_steps(model, example_inputs, [target], settings, criterion, batches):
        return result
    raise AssertionError("unreachable")


def amounts_for(model: nn.Module, example_inputs: torch.Tensor, speedups: Sequence[float],
                settings: PruneSettings = DEFAULT_PRUNING) -> dict[float, float]:
    """{speed-up: the fraction of every layer's channels that per-layer pruning removes to reach
    it}: what a target means for one architecture (pruned on a copy; the weights do not matter).
    A speed-up the schedule cannot reach gets the schedule's last amount, ``max_ratio``."""
    if settings.global_pruning:
        raise ValueError("per-layer amounts are defined for per-layer pruning (global_pruning=False) only")
    amounts: dict[float, float] = {}
    try:
        for t, r in prune_in_steps(copy.deepcopy(model), example_inputs, speedups, settings):
            amounts[t] = r.steps * settings.max_ratio / settings.steps
    except UnreachableSpeedupError:
        pass
    return {float(t): amounts.get(float(t), settings.max_ratio) for t in speedups}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Recomputes every BatchNorm's running statistics as the exact average over ``batches``
    (inputs only; no gradient step). Pruning leaves the statistics of the removed channels'
    consumers stale: one ResNet at 2x reads 10.6% before and 81.7% after this, on 10 batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, not an exponential one
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    for x in batches:
        model(x.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return model


def prune_adaptive(model: nn.Module, example_inputs: torch.Tensor, score: Callable[[nn.Module], float],
                   floor: float, settings: PruneSettings = DEFAULT_PRUNING, *, check_every: int = 5,
                   criterion: Criterion | None = None, batches: Batches | None = None) -> PruneResult:
    """Prunes ``model`` while ``score(model)`` (validation accuracy, say) stays >= ``floor``; returns
    the last network that met the floor (a copy; ``model`` itself ends pruned one check further)."""
    model.eval()  # as prune_in_steps: data-driven criteria read running statistics, dropout off
    macs0, params0 = count(model, example_inputs)
    if score(model) < floor:
        raise ValueError(f"the unpruned network already scores below the floor {floor}")
    steps = settings.steps
    pruning = _Pruning(model, example_inputs, settings, criterion, batches)
    best, best_steps, best_channels, done = copy.deepcopy(model), 0, {}, 0
    while done < steps:
        for _ in range(min(check_every, steps - done)):
            pruning.step()
            done += 1
        pruning.clean()
        if score(model) < floor:
            break
        best, best_steps, best_channels = copy.deepcopy(model), done, pruning.channels()
    macs, params = count(best, example_inputs)
    return PruneResult(best, macs0, macs, params0, params, best_steps, best_channels)


def _safe_attributes(module: nn.Module) -> dict:
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))}


def save_pruned(model: nn.Module, path: str, /, **meta) -> None:
    """Saves a (pruned) model as tensors plus each module's plain settings (channel counts, kernel
    sizes), the information ``tp.state_dict`` keeps, but without pickled modules, so loading it
    needs no code execution (``torch.load(weights_only=True)``). ``meta`` must be plain data."""
    modules = {name: {"attributes": _safe_attributes(m),
                      "parameters": {k: v.detach().cpu() for k, v in m._parameters.items() if v is not None},
                      "buffers": {k: v.detach().cpu() for k, v in m._buffers.items() if v is not None}}
               for name, m in model.named_modules()}
    payload = {"format": PRUNED_FORMAT, "modules": modules, "meta": meta}
    atomic_write(os.path.abspath(path), lambda tmp: torch.save(payload, tmp))


def load_pruned(path: str, template: nn.Module) -> tuple[nn.Module, dict]:
    """Loads a file of ``save_pruned`` into a copy of ``template`` (an unpruned module of the same
    architecture) with ``torch.load(weights_only=True)``, as ``tp.load_state_dict`` would."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"pruned model file not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != PRUNED_FORMAT:
        raise ValueError(f"{path}: not a pruned-model file (no '{PRUNED_FORMAT}' format tag)")
    model = copy.deepcopy(template)
    found = dict(model.named_modules())
    missing = sorted(set(payload["modules"]) ^ set(found))
    if missing:
        raise ValueError(f"{path}: the saved model and the template differ in modules: {missing[:5]}")
    for name, saved in payload["modules"].items():
        module = found[name]
        for k, v in saved["attributes"].items():
            setattr(module, k, v)
        for k, v in saved["parameters"].items():
            module._parameters[k] = nn.Parameter(v, requires_grad=True)
        for k, v in saved["buffers"].items():
            module._buffers[k] = v
    return model, payload.get("meta", {})
