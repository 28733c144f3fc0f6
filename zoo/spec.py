"""Zoo specs: what a zoo contains, from a YAML (or TOML) file plus ``--set key=value`` overrides.

A spec names the dataset, the architecture families with the ranges to draw from (depths, widths
per stage, shortcuts, VGG width multipliers), how many members, the seed, the training, initial
pruning and finetuning budgets, and the output URI. ``members(spec)`` expands it into member
descriptions, deterministically: member i's architecture and seed depend only on the spec's seed
and i, and its id is a hash of everything that decides its result, so a re-run recognises the
members already built.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from dataclasses import dataclass

import yaml

from zoo.arch import resnet_spec, vgg_spec

SPEC_DIR = os.path.join(os.path.dirname(__file__), "specs")
DEFAULT_SPEC = os.path.join(SPEC_DIR, "digits.yaml")
REQUIRED = ("name", "dataset", "members", "families", "train", "initial_speedup", "finetune", "output")


class SpecError(ValueError):
    """A zoo spec that is missing a key or has a bad value."""


@dataclass(frozen=True)
class MemberSpec:
    index: int
    id: str
    arch: dict
    seed: int
    role: str  # "train", "val" or "test": learn from / select checkpoints with / held out for pruning


def load_spec(path: str | None = None, overrides: list[str] | None = None) -> dict:
    """The spec at ``path`` (default: the embedded digits spec) with ``key.sub=value`` overrides."""
    path = path or DEFAULT_SPEC
    if not os.path.exists(path):
        raise SpecError(f"zoo spec not found: {path}")
    with open(path) as f:
        if path.endswith(".toml"):
            import tomllib

            spec = tomllib.loads(f.read())
        else:
            spec = yaml.safe_load(f)
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: a zoo spec must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise SpecError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        node = spec
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SpecError(f"override {item!r}: {p} is not a mapping")
        node[parts[-1]] = yaml.safe_load(value)
    validate(spec, path)
    return spec


def validate(spec: dict, where: str = "spec") -> None:
    missing = [k for k in REQUIRED if k not in spec]
    if missing:
        raise SpecError(f"{where}: missing key(s) {', '.join(missing)}")
    if not isinstance(spec["members"], int) or spec["members"] < 1:
        raise SpecError(f"{where}: members must be a positive integer, got {spec['members']!r}")
    if not spec["initial_speedup"] or float(spec["initial_speedup"]) < 1:
        raise SpecError(f"{where}: initial_speedup must be >= 1 (1 means no initial pruning)")
    if spec.get("held_out", False) not in (True, False):
        raise SpecError(f"{where}: held_out must be true or false, got {spec['held_out']!r}")
    for key in ("val_members", "test_members"):
        if not 0 <= float(spec.get(key, 0.0)) < 1:
            raise SpecError(f"{where}: {key} must be a fraction in [0, 1), got {spec[key]!r}")
    if not spec.get("held_out") and float(spec.get("val_members", 0.0)) + float(spec.get("test_members", 0.0)) >= 1:
        raise SpecError(f"{where}: val_members + test_members must leave some members for training")
    if not spec["families"]:
        raise SpecError(f"{where}: families is empty")
    for fam in spec["families"]:
        if fam.get("family") not in ("resnet", "vgg"):
            raise SpecError(f"{where}: family must be resnet or vgg, got {fam.get('family')!r}")
    if "name" not in spec["dataset"]:
        raise SpecError(f"{where}: dataset.name is missing")


def _arch(fam: dict, rng: random.Random, in_channels: int, num_classes: int, image_size: int) -> dict:
    if fam["family"] == "resnet":
        widths = tuple(rng.choice(choices) for choices in fam["stage_widths"])
        return resnet_spec(rng.choice(fam["depths"]), widths, in_channels=in_channels, num_classes=num_classes,
                           shortcut=rng.choice(fam.get("shortcut", ["identity"])))
    return vgg_spec(rng.choice(fam["depths"]), width_mult=rng.choice(fam.get("width_mult", [1.0])),
                    input_size=image_size, in_channels=in_channels, num_classes=num_classes,
                    classifier=tuple(rng.choice(fam.get("classifier", [[]]))))


def member_id(spec: dict, arch: dict, seed: int) -> str:
    """A stable id from everything that decides the member's result."""
    key = {k: spec[k] for k in ("dataset", "train", "initial_speedup", "finetune")}
    key.update(arch=arch, seed=seed)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{arch['family']}-{digest}"


def members(spec: dict, in_channels: int, num_classes: int, image_size: int) -> list[MemberSpec]:
    """The members a spec describes, in order; the same spec gives the same list."""
    weights = [float(f.get("weight", 1.0)) for f in spec["families"]]
    n_val = int(round(float(spec.get("val_members", 0.0)) * spec["members"]))
    n_test = int(round(float(spec.get("test_members", 0.0)) * spec["members"]))
    out = []
    for i in range(spec["members"]):
        rng = random.Random(f"{spec.get('seed', 0)}:{i}")
        fam = rng.choices(spec["families"], weights=weights)[0]
        arch = _arch(copy.deepcopy(fam), rng, in_channels, num_classes, image_size)
        seed = rng.randrange(2**31)
        role = "val" if i < n_val else "test" if i >= spec["members"] - n_test else "train"
        if spec.get("held_out"):  # a spec of networks kept only for judging pruning
            role = "test"
        out.append(MemberSpec(i, member_id(spec, arch, seed), arch, seed, role))
    return out
