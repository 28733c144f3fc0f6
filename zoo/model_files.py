"""Model files: what ``prune_batch`` reads and writes, loaded without running code by default.

Readable, all through ``torch.load(weights_only=True)`` (tensors and plain data only):
- ``save_model``'s format: a zoo architecture spec plus its state dict (a pruned zoo network too:
  its spec records the pruned widths);
- a dict with ``arch`` and ``state_dict`` keys, written by anyone;
- a bare state dict, given its architecture spec (``arch=``);
- ``metanet.prune.save_pruned``'s format (Torch-Pruning's pruned-model state without pickled
  modules), given its unpruned architecture (in the file's metadata, or ``arch=``).

A pickled whole module (``torch.save(model)``) runs code when it is loaded, so it is read only
with ``trust_pickle=True``; without it the error says so.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch import nn

from metanet.files import atomic_write
from metanet.prune import PRUNED_FORMAT, load_pruned, save_pruned
from zoo.arch import arch_spec, build_model

MODEL_FORMAT = "metaprune.model/1"


class ModelFileError(ValueError):
    """A model file that is missing, unreadable, or not one of the accepted formats."""


class UntrustedPickleError(ModelFileError):
    """A pickled module, refused because loading it would run code from the file."""


def save_model(model: nn.Module, path: str, /, **meta: Any) -> None:
    """Writes ``model`` (a zoo architecture, pruned or not) as spec + state dict, atomically.
    ``meta`` must be plain data (numbers, strings, lists, dicts)."""
    spec = arch_spec(model)
    if spec["family"] == "import":  # its spec is the unpruned shape: store the modules' own settings too
        save_pruned(model, path, arch=spec, **meta)
        return
    payload = {"format": MODEL_FORMAT, "arch": spec,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}
    atomic_write(os.path.abspath(path), lambda tmp: torch.save(payload, tmp))


def _from_state(state: dict, arch: dict, path: str) -> nn.Module:
    try:
        model = build_model(arch)
    except ValueError as err:
        raise ModelFileError(f"{path}: {err}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ModelFileError(f"{path}: the state dict does not fit architecture {arch.get('family')!r}: "
                             f"{' '.join(first[:3])[:400]}") from None
    return model


def load_model(path: str, *, arch: dict | None = None, trust_pickle: bool = False) -> tuple[nn.Module, dict]:
    """The module in ``path`` (in eval mode) and the file's metadata (``meta``, with ``format``)."""
    if not os.path.isfile(path):
        raise ModelFileError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Unsupported global" not in text and "Unsupported class" not in text:  # not a pickled object: garbage
            reason = text.rsplit("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0][:200]
            raise ModelFileError(f"{path}: not a readable PyTorch file ({reason})") from None
        if not trust_pickle:
            raise UntrustedPickleError(
                f"{path}: holds pickled Python objects (a whole saved module?); loading it runs code from the "
                "file, so it is refused. Pass --trust-pickle (trust_pickle=True) only if you trust its source, "
                "or save a state dict with its architecture instead.") from None
        return _load_pickled(path)
    except Exception as err:  # the weights-only reader runs no code; any failure means a malformed file
        text = (str(err).splitlines() or [""])[0][:200]
        raise ModelFileError(f"{path}: not a readable PyTorch file ({type(err).__name__}: {text})") from None
    return _from_payload(payload, path, arch)


def _load_pickled(path: str) -> tuple[nn.Module, dict]:
    try:
        module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # unpickling runs arbitrary code: any error can come out of it
        raise ModelFileError(f"{path}: the pickled file could not be loaded: {type(err).__name__}: {err}") from None
    if not isinstance(module, nn.Module):
        raise ModelFileError(f"{path}: the pickle holds a {type(module).__name__}, not a torch.nn.Module")
    return module.eval(), {"format": "pickled-module"}


def _from_payload(payload: Any, path: str, arch: dict | None) -> tuple[nn.Module, dict]:
    if not isinstance(payload, dict):
        raise ModelFileError(f"{path}: holds a {type(payload).__name__}, not a model (state dict or model file)")
    fmt = payload.get("format")
    if fmt == PRUNED_FORMAT:
        meta = dict(payload.get("meta") or {})
        base = arch or meta.get("arch")
        if base is None:
            raise ModelFileError(f"{path}: a pruned-model file needs its unpruned architecture spec "
                                 "(an 'arch' entry in its metadata, or --arch)")
        model, meta = load_pruned(path, build_model(base))
        return model.eval(), {**meta, "format": PRUNED_FORMAT}
    if "state_dict" in payload and ("arch" in payload or arch is not None):
        model = _from_state(payload["state_dict"], payload.get("arch") or arch, path)
        return model.eval(), {**dict(payload.get("meta") or {}), "format": fmt or "arch+state_dict"}
    if payload and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        if arch is None:
            raise ModelFileError(f"{path}: a bare state dict without its architecture: give it with --arch FILE "
                                 "(a zoo architecture spec, JSON or YAML), or save {'arch': ..., 'state_dict': ...}")
        return _from_state(payload, arch, path).eval(), {"format": "state_dict"}
    keys = ", ".join(sorted(map(str, payload))[:6])
    raise ModelFileError(f"{path}: not a model file: a dict with keys {keys} (expected a state dict, "
                         "{'arch', 'state_dict'}, or a pruned-model file)")
