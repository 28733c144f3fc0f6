"""Zoo specs: what a zoo contains, from a YAML (or TOML) file plus ``--set key=value`` overrides.

A spec names the dataset, the architecture families with the ranges to draw from (depths, widths
per stage, shortcuts, VGG width multipliers), how many members, the seed, the training, initial
pruning and finetuning budgets, and the output URI. ``ZooSpec`` is its schema (pydantic, unknown
keys forbidden): ``load_spec`` validates the file with its overrides before anything is built or
written, and a bad spec is one line naming the key, the value and what is allowed.

``members(spec)`` expands a spec into member descriptions, deterministically: member i's
architecture and seed depend only on the spec's seed and i, and its id is a hash of everything
that decides its result, so a re-run recognises the members already built. A member's role
(train / val / test) is a pure function of its id (``role_of``: a hash bucket), so growing or
shrinking a zoo never moves a held-out member into training; only changing ``val_members`` or
``test_members`` does, and ``make_zoo`` then says which members move.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import Annotated, Literal, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from distributed.schema import Strict, describe, read_mapping, register_union_tags
from zoo.arch import VGG_CONFIGS, resnet_spec, vgg_spec

SPEC_DIR = os.path.join(os.path.dirname(__file__), "specs")
DEFAULT_SPEC = os.path.join(SPEC_DIR, "digits.yaml")
DATASETS = ("digits", "cifar10", "cifar100", "svhn", "imagefolder")


class SpecError(ValueError):
    """A zoo spec that is missing a key or has a bad value."""


# ----------------------------------------------------------------------------------- the schema
PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class DatasetSection(Strict):
    name: Literal[DATASETS]  # type: ignore[valid-type]
    root: str | None = None  # required for every dataset but digits (checked when it is loaded)
    seed: int = 0
    val_fraction: Annotated[float, Field(gt=0, lt=1)] | None = None
    train_subset: PositiveInt | None = None
    test_subset: PositiveInt | None = None
    size: PositiveInt | None = None


class TrainSection(Strict):
    """``metanet.train.TrainConfig`` without its seed (each member draws its own)."""

    epochs: PositiveInt = 10
    lr: Annotated[float, Field(gt=0)] = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 5e-4
    batch_size: PositiveInt = 128
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[Annotated[float, Field(gt=0, lt=1)]] = [0.5, 0.75]
    augment: bool = True
    max_batches: PositiveInt | None = None
    steps: PositiveInt | None = None


class FinetuneSection(TrainSection):
    epochs: Annotated[int, Field(ge=0)] = 2  # 0: no finetuning after the initial pruning


class ResNetFamily(Strict):
    family: Literal["resnet"]
    weight: Annotated[float, Field(gt=0)] = 1.0
    depths: list[int] = Field(min_length=1)
    stage_widths: list[list[PositiveInt]] = Field(min_length=1)
    shortcut: list[Literal["identity", "projection"]] = Field(default=["identity"], min_length=1)

    @model_validator(mode="after")
    def _depths(self):
        bad = [d for d in self.depths if d < 8 or (d - 2) % 6]
        if bad:
            raise ValueError(f"resnet depths must be 6n+2 (8, 14, 20, ...), got {bad}")
        if any(not choices for choices in self.stage_widths):
            raise ValueError("every stage of stage_widths needs at least one width")
        return self


class VGGFamily(Strict):
    family: Literal["vgg"]
    weight: Annotated[float, Field(gt=0)] = 1.0
    depths: list[Literal[tuple(sorted(VGG_CONFIGS))]] = Field(min_length=1)  # type: ignore[valid-type]
    width_mult: list[Annotated[float, Field(gt=0)]] = Field(default=[1.0], min_length=1)
    classifier: list[list[PositiveInt]] = Field(default=[[]], min_length=1)


class ImportFamily(Strict):
    """Networks from torchvision's (or timm's) constructors: ``target`` ``MODULE:NAME``, fixed
    ``kwargs`` and per-member ``choices`` (each key drawn from its list); ``num_classes`` is the
    dataset's unless given. Their first layer must fit the dataset's channels (torchvision's
    take 3)."""

    family: Literal["import"]
    weight: Annotated[float, Field(gt=0)] = 1.0
    target: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")]
    kwargs: dict[str, object] = {}
    choices: dict[str, Annotated[list[object], Field(min_length=1)]] = {}


Family = Annotated[Union[ResNetFamily, VGGFamily, ImportFamily], Field(discriminator="family")]
register_union_tags("resnet", "vgg", "import")


class ZooSpec(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    dataset: DatasetSection
    members: PositiveInt
    seed: int = 0
    val_members: Fraction = 0.0   # expected share of members with role 'val' (hash buckets)
    test_members: Fraction = 0.0  # expected share held out ('test')
    held_out: bool = False        # every member 'test': a zoo kept only for judging pruning
    families: list[Family] = Field(min_length=1)
    train: TrainSection
    initial_speedup: Annotated[float, Field(ge=1)]
    finetune: FinetuneSection
    output: Annotated[str, Field(min_length=1)]

    @model_validator(mode="after")
    def _split(self):
        if not self.held_out and self.val_members + self.test_members >= 1:
            raise ValueError("val_members + test_members must leave some members for training")
        if self.initial_speedup > 1 and any(f.family == "import" for f in self.families):
            # a member is stored as its spec, and an imported architecture's spec is its unpruned shape
            raise ValueError("initial_speedup must be 1 for 'import' families: a pruned imported network has "
                             "no architecture spec to rebuild it from")
        return self


@dataclass(frozen=True)
class MemberSpec:
    index: int
    id: str
    arch: dict
    seed: int
    role: str  # "train", "val" or "test": learn from / select checkpoints with / held out for pruning


def load_spec(path: str | None = None, overrides: list[str] | None = None) -> dict:
    """The spec at ``path`` (default: the embedded digits spec) with ``key.sub=value`` overrides,
    validated (``SpecError`` names the key and value). Returned as the plain mapping the file
    holds, so member ids hash what the user wrote, not defaults filled in."""
    path = path or DEFAULT_SPEC
    spec = read_mapping(path, "zoo spec", SpecError)
    for item in overrides or []:
        if "=" not in item:
            raise SpecError(f"--set {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        node = spec
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {item!r}: {p} is not a mapping")
        node[parts[-1]] = yaml.safe_load(value)
    validate(spec, path)
    return spec


def validate(spec: dict, where: str = "spec") -> ZooSpec:
    try:
        return ZooSpec.model_validate(spec)
    except ValidationError as err:
        raise SpecError(describe(err, where, ZooSpec)) from None


# ----------------------------------------------------------------------------------- the members
def role_of(member_id: str, val: float, test: float, held_out: bool = False) -> str:
    """A member's role from its id alone: a uniform hash bucket u in [0, 1) gives 'val' below
    ``val``, 'test' at or above ``1 - test``, else 'train'. Adding or removing other members never
    changes it; raising ``test`` only moves members into 'test' (and lowering it, out)."""
    if held_out:
        return "test"
    u = int(hashlib.sha256(member_id.encode()).hexdigest()[:13], 16) / 16**13
    return "val" if u < val else "test" if u >= 1 - test else "train"


def _arch(fam: dict, rng: random.Random, in_channels: int, num_classes: int, image_size: int) -> dict:
    if fam["family"] == "import":
        kwargs = dict(fam.get("kwargs") or {})
        for key in sorted(fam.get("choices") or {}):
            kwargs[key] = rng.choice(fam["choices"][key])
        kwargs.setdefault("num_classes", num_classes)
        return {"family": "import", "target": fam["target"], "kwargs": kwargs}
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
    name = arch["target"].split(":")[1] if arch["family"] == "import" else arch["family"]
    return f"{name}-{digest}"


def lineage(dataset: str, arch: dict, seed: int) -> str:
    """What makes a member the network it is, apart from where its data sits: the dataset's kind
    (``imagefolder`` of ``imagefolder:cifar10-jpeg``), its architecture and its seed. The id hashes
    the whole ``dataset`` section, root included, so one spec built from two folders gives the same
    networks under other ids and other roles; the lineage is the same, so a network a shipped
    metanetwork learned from is recognised under any id (``metanet.pretrained.seen_by``)."""
    key = {"dataset": dataset.split(":", 1)[0], "arch": arch, "seed": int(seed)}
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def members(spec: dict, in_channels: int, num_classes: int, image_size: int) -> list[MemberSpec]:
    """The members a spec describes, in order; the same spec gives the same list."""
    weights = [float(f.get("weight", 1.0)) for f in spec["families"]]
    out = []
    for i in range(spec["members"]):
        rng = random.Random(f"{spec.get('seed', 0)}:{i}")
        fam = rng.choices(spec["families"], weights=weights)[0]
        arch = _arch(copy.deepcopy(fam), rng, in_channels, num_classes, image_size)
        seed = rng.randrange(2**31)
        mid = member_id(spec, arch, seed)
        role = role_of(mid, float(spec.get("val_members", 0.0)), float(spec.get("test_members", 0.0)),
                       bool(spec.get("held_out", False)))
        out.append(MemberSpec(i, mid, arch, seed, role))
    return out
