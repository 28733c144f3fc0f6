"""Weight-level pruning: unstructured sparsity (a fraction of zeros) and N:M (in every group of M
consecutive input weights at most N nonzero, 2:4 being what recent GPUs run faster).

Analysis apart from actions: a weight criterion (``metanet.criteria``, one class per name, in
``CRITERIA`` with ``Level.WEIGHTS`` among its levels) scores every weight of the layers
``prunable_layers`` picks;
``sparsify`` turns the scores into masks and applies them with ``torch.nn.utils.prune`` (global or
per-layer ranking through its ``L1Unstructured`` with the scores as ``importance_scores``, N:M
through ``custom_from_mask``). The masks stay on the network as torch's forward pre-hooks
(``weight = weight_orig * weight_mask``), so a finetune afterwards keeps every zero at zero
whatever the optimiser does to ``weight_orig``; ``make_permanent`` then folds them into plain
weights, and the saved file holds the zeros and loads weights-only like any other.

Torch ships no N:M pruner for convolutions (``torch.ao.pruning.WeightNormSparsifier`` takes 2-D
weights only) nor for arbitrary scores, so ``nm_mask`` is the one mask computed here: a top-N per
group of M. A convolution's input weights are its weight's rows flattened in PyTorch's order
(``in_channels * kh * kw``, the GEMM's reduction axis of an im2col convolution); a row whose length
is not a multiple of M ends in a shorter group, as if padded with zeros.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune

from metanet.criteria import Batches, Criterion
from metanet.sparsity import classifier_of

SCOPES = ("global", "layer")
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class WeightPruning:
    """What to prune: ``sparsity`` (a fraction of zeros, 0 < s < 1) or ``nm`` ((N, M): at most N
    nonzero in every M consecutive input weights); ``scope`` ranks all layers' weights together
    ("global") or each layer's to the same fraction ("layer"); ``dense_ends`` keeps the first layer
    and the classifier dense (their few weights matter most)."""

    sparsity: float | None = None
    nm: tuple[int, int] | None = None
    scope: str = "global"
    dense_ends: bool = True

    def __post_init__(self):
        if (self.sparsity is None) == (self.nm is None):
            raise ValueError("weight pruning needs exactly one of sparsity and nm")
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
        if self.nm is not None:
            check_nm(self.nm)
        if self.scope not in SCOPES:
            raise ValueError(f"sparsity scope must be one of {', '.join(SCOPES)}, not {self.scope!r}")

    @property
    def label(self) -> str:
        return f"{self.nm[0]}of{self.nm[1]}" if self.nm else f"sparsity{self.sparsity:g}"


def check_sparsity(value) -> float:
    """``value`` as a fraction of zeros in (0, 1), or ValueError naming it."""
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity {value!r} is not a number") from None
    if not (0 < s < 1):  # also refuses NaN
        raise ValueError(f"sparsity {value!r} must be a fraction of zeros between 0 and 1 (exclusive)")
    return s


def parse_nm(text) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4); ValueError naming ``text`` for anything else, 3:2 or 0:4."""
    if isinstance(text, (tuple, list)) and len(text) == 2:
        return check_nm(tuple(text))
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match:
        raise ValueError(f"N:M {text!r} is not two whole numbers N:M (e.g. 2:4)")
    return check_nm((int(match[1]), int(match[2])))


# The largest group an N:M pattern may have. The patterns in use are small: 2:4 (sparse tensor
# cores), 1:4, 4:8, 2:8, 1:16 in the literature. A group longer than a layer's input row (a 3x3
# convolution over 8 channels has 72 inputs) is no N:M pattern but a per-row count, and the mask
# pads every row to a multiple of M: 1:10**12 asked a task for terabytes. 64 keeps every useful
# pattern with room to spare and refuses the rest when the flag is read.
MAX_NM_M = 64


def check_nm(nm: tuple[int, int]) -> tuple[int, int]:
    n, m = nm
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"N:M {n}:{m} needs 0 < N < M (at most N nonzero weights in every M)")
    if m > MAX_NM_M:
        raise ValueError(f"N:M {n}:{m}: M must be at most {MAX_NM_M} (patterns in use: 2:4, 1:4, 4:8, 2:8, 1:16)")
    return n, m


# ------------------------------------------------------------------------------ analysis
def prunable_layers(model: nn.Module, dense_ends: bool = True) -> dict[str, nn.Module]:
    """The Conv/Linear layers whose weights are pruned, by name: all of them but, with
    ``dense_ends``, the first in module order (it reads the input) and the classifier."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _LAYERS)}
    if dense_ends and layers:
        first = next(iter(layers))
        last = classifier_of(model)
        layers = {n: m for n, m in layers.items() if n != first and m is not last}
    return layers


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The 0/1 mask keeping the ``n`` highest of ``scores`` in every group of ``m`` consecutive
    input weights (each output row flattened). A row whose length is not a multiple of ``m`` ends in
    a shorter group, as if padded with zeros to the next multiple (the padding a 2:4 kernel needs
    anyway): it keeps at most ``n`` too."""
    rows = scores.reshape(scores.shape[0], -1)
    length = rows.shape[1]
    pad = -length % m
    if pad:  # padded scores are never kept ahead of a real weight
        rows = torch.cat([rows, torch.full((rows.shape[0], pad), -torch.inf, device=rows.device)], 1)
    groups = rows.reshape(-1, m)
    keep = torch.zeros_like(groups).scatter_(1, groups.topk(n, dim=1).indices, 1.0)
    return keep.reshape(rows.shape)[:, :length].reshape(scores.shape)


# ------------------------------------------------------------------------------- actions
@dataclass
class WeightPruningReport:
    """What ``sparsify`` did: its settings and the layers it pruned."""

    settings: WeightPruning
    layers: list[str]


def sparsify(model: nn.Module, settings: WeightPruning, criterion: Criterion,
             batches: Batches | None = None) -> WeightPruningReport:
    """Masks ``model``'s weights in place (torch's pruning hooks: a finetune keeps the zeros)."""
    layers = prunable_layers(model, settings.dense_ends)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no Conv/Linear layer to prune"
                         + (" besides the first and the classifier (kept dense)" if settings.dense_ends else ""))
    scores = criterion.scores(model, layers, batches)
    # torch's L1Unstructured ranks |importance|: shift the scores (a learned criterion's are log
    # magnitudes, negative) to be non-negative, which keeps their order within and across layers
    low = min(float(s.min()) for s in scores.values())
    scores = {n: s - low if low < 0 else s for n, s in scores.items()}
    report = WeightPruningReport(settings, list(layers))
    if settings.nm is not None:
        n, m = settings.nm
        for name, module in layers.items():
            prune.custom_from_mask(module, "weight", nm_mask(scores[name], n, m))
    elif settings.scope == "global":
        prune.global_unstructured([(m, "weight") for m in layers.values()], prune.L1Unstructured,
                                  importance_scores={(m, "weight"): scores[n] for n, m in layers.items()},
                                  amount=settings.sparsity)
    else:
        for name, module in layers.items():
            prune.l1_unstructured(module, "weight", amount=settings.sparsity, importance_scores=scores[name])
    for name in report.layers:
        module = layers[name]
        module.weight = module.weight.detach()
        module.register_forward_hook(_detach_weight)
    return report


def _detach_weight(module: nn.Module, _inputs, _output) -> None:
    """After each forward, the masked ``weight`` torch's hook computed is kept detached: the
    forward's graph already holds it (gradients still reach ``weight_orig``), and a module whose
    attribute is a non-leaf tensor cannot be deep-copied."""
    module.weight = module.weight.detach()


def make_permanent(model: nn.Module) -> nn.Module:
    """Folds torch's pruning masks into plain weights (zeros stay), so the state dict has the
    network's usual keys."""
    for module in model.modules():
        if prune.is_pruned(module) and hasattr(module, "weight_mask"):
            prune.remove(module, "weight")
        for key in [k for k, hook in module._forward_hooks.items() if hook is _detach_weight]:
            del module._forward_hooks[key]
    return model


def zero_fraction(model: nn.Module, layers: list[str]) -> float:
    """The measured fraction of zero weights over ``layers``."""
    modules = dict(model.named_modules())
    total = zeros = 0
    for name in layers:
        w = modules[name].weight
        total += w.numel()
        zeros += int((w == 0).sum())
    return zeros / total if total else math.nan


def nm_violations(model: nn.Module, layers: list[str], n: int, m: int) -> list[str]:
    """The layers (of ``layers``) with a group of ``m`` consecutive input weights holding more than
    ``n`` nonzeros."""
    modules = dict(model.named_modules())
    bad = []
    for name in layers:
        rows = (modules[name].weight.detach().reshape(modules[name].weight.shape[0], -1) != 0).float()
        rows = torch.nn.functional.pad(rows, (0, -rows.shape[1] % m))  # a shorter last group: zeros after it
        if bool((rows.reshape(-1, m).sum(1) > n).any()):
            bad.append(name)
    return bad
