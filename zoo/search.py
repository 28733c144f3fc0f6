"""The search file of a Ray Tune search (``pipelines/tune.py``): what may be tuned, how each value
is sampled, the default configuration every search starts from, and the check that a search resumes
only into an output that holds the same search."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from distributed.schema import Strict, describe, read_mapping
from distributed.settings import settings_model
from metanet.allocation import ALLOCATIONS
from metanet.criteria import names as criterion_names
from metanet.files import atomic_write_text
from metanet.levels import Level
from metanet.meta_training import MetaTrainConfig
from metanet.heads import HEADS
from metanet.metanetwork import EDITS, MetaNetConfig
from metanet.objectives import DEFAULT_OBJECTIVE, OBJECTIVES, edit_refusal, objective_defaults, trained_edit
from metanet.recipe import RECIPE_DEFAULTS, RECIPE_LIMITS, RECONSTRUCT_DEFAULTS, RECONSTRUCT_LIMITS
from metanet.reconstruct import TARGETS
from metanet.selection import SELECTIONS
from metanet.sparsity import SPARSITY_FORMS
from zoo.integrity import DAMAGED_MEMBERS
from zoo.meta_settings import LIMITS, WEIGHT_OBJECTIVES

META_KEYS = ("lr", "weight_decay", "reg", "alpha", "hidden", "layers", "residual", "batches_per_step", "batch_size",
             "edit", "evidence", "sparsity_norm", "objective", "calibration", "gradient", "score_targets", "l1_reg",
             "weight_temperature")
PRUNE_KEYS = ("before_steps", "before_lr", "after_steps", "after_lr", "criterion", "reconstruct", "reconstruct_batches",
              "reconstruct_ridge", "reconstruct_targets", "allocation", "allocation_candidates")
SAMPLERS = ("uniform", "loguniform", "choice", "randint")


def default_trial() -> dict:
    """The configuration a user gets without tuning, as meta_train.py and prune_batch.py have it: the
    library's defaults (``MetaTrainConfig``, ``MetaNetConfig``, ``metanet.recipe.RECIPE_DEFAULTS``)
    with the default objective and its settings (``metanet.objectives``)."""
    train, net = MetaTrainConfig(), MetaNetConfig(edge_widths={})
    meta = {k: getattr(train, k) if hasattr(train, k) else getattr(net, k) for k in META_KEYS}
    meta.update(objective=DEFAULT_OBJECTIVE, **objective_defaults(DEFAULT_OBJECTIVE))
    recipe = {**RECIPE_DEFAULTS, **RECONSTRUCT_DEFAULTS}
    return {**meta, **{k: recipe[k] for k in PRUNE_KEYS}}


def with_objective_defaults(config: dict, search: dict) -> dict:
    """A trial's settings as it trains with them: those the search neither fixes nor samples follow
    the trial's objective (a search that fixes ``objective: paper`` gets the paper's metanetwork);
    the edit is the one the objective trains (``metanet.objectives.trained_edit``), if it has one."""
    chosen = set(search.get("fixed", {})) | set(search["space"])
    config = {**config, **{k: v for k, v in objective_defaults(config["objective"]).items() if k not in chosen}}
    # a search over objectives and edits: an objective that trains one edit gets it (a fixed
    # combination no trial could train is refused when the search file is read)
    return {**config, "edit": trained_edit(config["objective"], config["edit"])}


Tunable = Literal[META_KEYS + PRUNE_KEYS]  # type: ignore[valid-type]


class Sampler(Strict):
    """One of ``uniform: [low, high]``, ``loguniform: [low, high]``, ``randint: [low, high]``,
    ``choice: [values]``."""

    uniform: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None
    loguniform: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=2, max_length=2)] | None = None
    randint: Annotated[list[int], Field(min_length=2, max_length=2)] | None = None
    choice: Annotated[list[Any], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in SAMPLERS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(SAMPLERS)}, not {given or 'none'}")
        return self


class SearchFile(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    zoo: str
    data_root: str | None = None
    # what the trials are scored at: MAC speed-ups (channel pruning) or, for a weight-level search
    # (objective weight_curve or paper_l1), fractions of zero weights: exactly one of the two
    targets: Annotated[list[Annotated[float, Field(gt=1, allow_inf_nan=False)]], Field(min_length=1)] | None = None
    sparsities: Annotated[list[Annotated[float, Field(gt=0, lt=1)]], Field(min_length=1)] | None = None
    objective: Literal[SELECTIONS] = "recipe"  # type: ignore[valid-type]
    val_members: Annotated[int, Field(ge=1)] | None = None
    max_epochs: Annotated[int, Field(ge=1)]
    eval_every: Annotated[int, Field(ge=1)] = 1
    grace_period: Annotated[int, Field(ge=1)] = 1
    reduction_factor: Annotated[float, Field(gt=1)] = 2
    num_samples: Annotated[int, Field(ge=1)] = 8
    cpus_per_trial: Annotated[float, Field(gt=0)] = 1
    max_concurrent_trials: Annotated[int, Field(ge=1)] | None = None
    seed: int = 0
    # members whose files are not what the zoo's manifest records (zoo.integrity): refuse, skip or use
    damaged_members: Literal[DAMAGED_MEMBERS] = "refuse"  # type: ignore[valid-type]
    fixed: dict[Tunable, Any] = {}
    space: Annotated[dict[Tunable, Sampler], Field(min_length=1)]
    # the allocation metanetwork of trials that draw `allocation: learned`: a file, a models:/ or
    # runs:/ URI; none: the shipped one (zoo.tuning.settle_search_allocator)
    allocator: str | None = None

    @model_validator(mode="after")
    def _targets_or_sparsities(self):
        if (self.targets is None) == (self.sparsities is None):
            raise ValueError("give exactly one of targets (speed-ups: channel pruning) and sparsities (fractions "
                             "of zero weights: a weight-level search)")
        if "objective" in self.space:
            objectives = list(self.space["objective"].choice or [])
        else:
            objectives = [self.fixed.get("objective", default_trial()["objective"])]
        weights = [o in WEIGHT_OBJECTIVES for o in objectives]
        if self.sparsities is not None and not all(weights):
            raise ValueError("sparsities: a weight-level search needs objective weight_curve or paper_l1 (fixed or "
                             "in space) for every trial")
        if self.targets is not None and any(weights):
            raise ValueError("targets: objectives weight_curve and paper_l1 train weight-level metanetworks: "
                             "score them at sparsities")
        return self

    @model_validator(mode="after")
    def _values_in_range(self):
        """Each fixed value, each choice and each sampler's bounds as meta_train.py and
        prune_batch.py would accept them: a trial must not fail on a value no run could take."""
        for key, value in self.fixed.items():
            _check_value(f"fixed.{key}", key, value)
        for key, sampler in self.space.items():
            kind = next(k for k in SAMPLERS if getattr(sampler, k) is not None)
            for value in getattr(sampler, kind):
                _check_value(f"space.{key}.{kind}", key, value)
        return self

    @model_validator(mode="after")
    def _edit_for_objective(self):
        """Every edit a trial could be given must be one its objective trains, as ``meta_train.py``
        checks: an objective that trains one edit takes it over a *sampled* objective's trials
        (``with_objective_defaults``), but an edit given with an objective that is not sampled, and
        an edit (fixed or sampled) that the paper's objective cannot train, is refused."""
        if "edit" in self.space:
            where, edits = "space.edit.choice", list(self.space["edit"].choice or [])
        elif "edit" in self.fixed:
            where, edits = "fixed.edit", [self.fixed["edit"]]
        else:
            return self  # each trial trains its objective's own edit
        sampled = "objective" in self.space
        objectives = (list(self.space["objective"].choice or []) if sampled
                      else [self.fixed.get("objective", default_trial()["objective"])])
        for objective in objectives:
            for edit in edits:
                fixed_head = objective in OBJECTIVES and OBJECTIVES[objective].head is not None
                refusal = None if sampled and fixed_head else edit_refusal(objective, edit)
                if refusal:
                    named = ("space.objective" if sampled else
                             "fixed.objective" if "objective" in self.fixed else "the default objective")
                    raise ValueError(f"{where}: {edit!r} with {named} {objective!r}: {refusal}")
        return self


@functools.lru_cache(maxsize=1)  # one pydantic model for every value a search file names
def _trial_model():
    return settings_model(default_trial(), limits={**LIMITS, **RECIPE_LIMITS, **RECONSTRUCT_LIMITS})


@functools.lru_cache(maxsize=1)
def _choices() -> dict[str, tuple]:
    # a trial meta-trains the criterion it prunes with: an allocation metanetwork (its objective,
    # its head) is trained by meta_train.py, not searched here; the allocation that reads one is
    # searched with the shipped allocation metanetwork (zoo.tuning.trial_allocator)
    allocating = {name for name, o in OBJECTIVES.items() if o.head is not None and HEADS[o.head].allocates}
    return {"edit": tuple(e for e in EDITS if not HEADS[e].allocates),
            "objective": tuple(o for o in OBJECTIVES if o not in allocating), "sparsity_norm": SPARSITY_FORMS,
            "criterion": criterion_names(Level.CHANNELS), "reconstruct_targets": TARGETS,
            "allocation": tuple(ALLOCATIONS)}


def _check_value(where: str, key: str, value) -> None:
    allowed = _choices().get(key)
    if allowed is not None and value not in allowed:
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(allowed)}")
    try:
        _trial_model().model_validate({key: value})
    except ValidationError as err:
        e = err.errors()[0]
        raise ValueError(f"{where}: {value!r}: {e['msg'].replace('Input should be', 'must be')}") from None


class SearchError(ValueError):
    """A search file that is missing or does not match ``SearchFile``."""


def load_search(path: str, overrides: list[str]) -> dict:
    """The search file at ``path`` with ``key=value`` overrides, validated (``SearchError`` names the
    key, the value and what is allowed); unset optional keys are left out."""
    search = read_mapping(path, "search file", SearchError)
    for item in overrides:
        if "=" not in item:
            raise SearchError(f"--set {item!r} must look like key=value")
        key, value = item.split("=", 1)
        search[key] = yaml.safe_load(value)
    try:
        return SearchFile.model_validate(search).model_dump(exclude_none=True)
    except ValidationError as err:
        raise SearchError(describe(err, path, SearchFile)) from None


def param_space(search: dict) -> dict:
    """Tune's parameter space: the defaults, the search file's ``fixed`` values, its samplers."""
    from ray import tune

    space = {}
    for key, spec in search["space"].items():
        kind, args = next(iter(spec.items()))
        space[key] = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
    return {**default_trial(), **search.get("fixed", {}), **space}


def check_same_search(out: Path, search: dict) -> None:
    """A search resumes only into an output that holds the same search (``search.json``): another
    search's trials would be mixed with this one's. Writes ``search.json`` for a new output."""
    path = out / "search.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(search)):
            changed = sorted(k for k in set(old) | set(search) if old.get(k) != search.get(k))
            raise SearchError(f"{out} holds another search (different {', '.join(changed)}); give another --out "
                              "or remove that directory")
        return
    atomic_write_text(path, json.dumps(search, indent=1, sort_keys=True))
