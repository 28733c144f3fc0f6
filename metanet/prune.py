"""Structured pruning with Torch-Pruning to a target MAC speed-up, and saving pruned networks.

Global pruning with the method's importance (group L2, mean over the group, max-normalised),
in small iterative steps, stopping at the first step whose MACs speed-up reaches the target; the
classifier's outputs are never pruned. ``prune_adaptive`` instead prunes while validation accuracy
(without finetuning) stays at or above a floor.
"""

from __future__ import annotations

import copy
import os
import uuid
from dataclasses import dataclass
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from metanet.sparsity import classifier_of, importance

PRUNED_FORMAT = "metaprune.pruned/1"


class UnreachableSpeedupError(ValueError):
    """The target speed-up cannot be reached within the pruning schedule."""


@dataclass
class PruneResult:
    model: nn.Module
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    steps: int

    @property
    def speedup(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    def summary(self) -> dict:
        return {"speedup": self.speedup, "macs_before": self.macs_before, "macs_after": self.macs_after,
                "params_before": self.params_before, "params_after": self.params_after, "steps": self.steps}


def count(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) of ``model`` for one input shaped like ``example_inputs``."""
    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    model.train(was_training)
    return int(macs), int(params)


def _pruner(model: nn.Module, example_inputs: torch.Tensor, steps: int, max_ratio: float) -> tp.pruner.BasePruner:
    return tp.pruner.BasePruner(
        model, example_inputs, importance=importance(), global_pruning=True, pruning_ratio=max_ratio,
        max_pruning_ratio=max_ratio, iterative_steps=steps, ignored_layers=[classifier_of(model)])


def prune_to_speedup(model: nn.Module, example_inputs: torch.Tensor, target: float, *, steps: int = 200,
                     max_ratio: float = 0.95) -> PruneResult:
    """Prunes ``model`` in place until MACs(before) / MACs(now) >= ``target``."""
    if not target > 1:
        raise ValueError(f"target speed-up must be > 1, got {target}")
    model.eval()
    macs0, params0 = count(model, example_inputs)
    pruner = _pruner(model, example_inputs, steps, max_ratio)
    macs, params, done = macs0, params0, 0
    while macs0 / macs < target:
        if done >= steps:
            raise UnreachableSpeedupError(
                f"target speed-up {target}x cannot be reached: {steps} steps (pruning at most {max_ratio:.0%} of "
                f"each layer's channels) reach {macs0 / macs:.2f}x")
        pruner.step()
        done += 1
        macs, params = count(model, example_inputs)
    return PruneResult(model, macs0, macs, params0, params, done)


def prune_adaptive(model: nn.Module, example_inputs: torch.Tensor, score: Callable[[nn.Module], float],
                   floor: float, *, steps: int = 200, max_ratio: float = 0.95, check_every: int = 5) -> PruneResult:
    """Prunes ``model`` while ``score(model)`` (validation accuracy, say) stays >= ``floor``; returns
    the last network that met the floor (a copy; ``model`` itself ends pruned one check further)."""
    macs0, params0 = count(model, example_inputs)
    if score(model) < floor:
        raise ValueError(f"the unpruned network already scores below the floor {floor}")
    pruner = _pruner(model, example_inputs, steps, max_ratio)
    best, best_steps, done = copy.deepcopy(model), 0, 0
    while done < steps:
        for _ in range(min(check_every, steps - done)):
            pruner.step()
            done += 1
        if score(model) < floor:
            break
        best, best_steps = copy.deepcopy(model), done
    macs, params = count(best, example_inputs)
    return PruneResult(best, macs0, macs, params0, params, best_steps)


def _safe_attributes(module: nn.Module) -> dict:
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))}


def save_pruned(model: nn.Module, path: str, **meta) -> None:
    """Saves a (pruned) model as tensors plus each module's plain settings (channel counts, kernel
    sizes), the information ``tp.state_dict`` keeps, but without pickled modules, so loading it
    needs no code execution (``torch.load(weights_only=True)``). ``meta`` must be plain data."""
    modules = {name: {"attributes": _safe_attributes(m),
                      "parameters": {k: v.detach().cpu() for k, v in m._parameters.items() if v is not None},
                      "buffers": {k: v.detach().cpu() for k, v in m._buffers.items() if v is not None}}
               for name, m in model.named_modules()}
    payload = {"format": PRUNED_FORMAT, "modules": modules, "meta": meta}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


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
