"""The settings of a meta-training run (``pipelines/meta_train.py``): their defaults (held by the
library's dataclasses), their help, and the checks that refuse a bad combination before Ray starts."""

from __future__ import annotations

import os

from metanet.heads import HEADS
from metanet.levels import Level
from metanet.meta_training import MetaTrainConfig
from metanet.metanetwork import EDITS, MetaNetConfig
from metanet.objectives import DEFAULT_OBJECTIVE, OBJECTIVES, TYPES, edit_refusal, fill, objective_defaults
from metanet.selection import SELECTIONS, SELECT_STEPS, default_selection
from metanet.sparsity import SPARSITY_FORMS
from zoo.integrity import DAMAGED_MEMBERS

_NET, _TRAIN = MetaNetConfig(edge_widths={}), MetaTrainConfig()
TRAIN_KEYS = ("epochs", "lr", "weight_decay", "milestones", "batches_per_step", "members_per_step", "batch_size",
              "reg", "alpha", "seed", "bn_mode", "sparsity_norm", "distill_epochs", "gate_reg", "objective",
              "score_targets", "l1_reg", "weight_temperature")
# the objectives that train a metanetwork for weight-level pruning (prune_batch --sparsity/--nm), and
# the edit each trains
WEIGHT_OBJECTIVES = {name: o.head for name, o in OBJECTIVES.items() if o.level is Level.WEIGHTS}
NET_KEYS = ("hidden", "layers", "residual", "backend", "edit", "evidence", "calibration", "gradient")
DEFAULTS = {
    "zoo": "runs/zoo-digits", "out": "runs/meta-train", "name": "metanet", "workers": 2,
    **{k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(_TRAIN, k)) for k in TRAIN_KEYS)},
    **{k: getattr(_NET, k) for k in NET_KEYS},
    "gpu": False, "max_failures": 2, "keep": 5, "selection": None, "select_target": 2.0,
    "select_finetune_steps": SELECT_STEPS,
    "select_members": 4, "diagnose_every": 1, "data_root": None, "mlflow": True, "min_member_acc": 0.0,
    "damaged_members": "refuse", "register": None,
    # the objective's settings (metanet.objectives): None until the objective fills them
    "objective": DEFAULT_OBJECTIVE, **{k: None for k in objective_defaults(DEFAULT_OBJECTIVE)},
}
HELP = {
    "zoo": "zoo directory or URI to meta-train on (its 'train' members; 'val' members select checkpoints)",
    "out": "Ray Train storage path: checkpoints, MLflow store, <name>/metanetwork.pt",
    "name": "run name under --out: <out>/<name>/metanetwork.pt is the latest choice",
    "workers": "Ray Train workers (data-parallel, each takes its share of the members)",
    "epochs": "meta-training epochs (one pass over the training members each)",
    "lr": "AdamW learning rate of the metanetwork",
    "weight_decay": "AdamW weight decay",
    "milestones": "epochs after which the learning rate drops x0.1",
    "batches_per_step": "task batches per member per optimiser step",
    "members_per_step": "members per optimiser step, edited in one metanetwork pass (1: the paper's)",
    "batch_size": "task batch size",
    "reg": "group-sparsity strength of the meta-objective",
    "alpha": "GroupNormPruner's alpha (layer-depth scaling of the group weights)",
    "hidden": "metanetwork width (node and edge state size)",
    "layers": "message-passing layers of the metanetwork",
    "residual": "r in: new weights = weights + r * learned edit",
    "backend": "message-passing backend: dgl, torch (plain PyTorch, also on CUDA) or pyg",
    "seed": "seed of the member order, batches and initialisation",
    "gpu": "one GPU per worker (nccl)",
    "max_failures": "restarts from the last checkpoint after a worker dies",
    "keep": "checkpoints kept, spread evenly over the run; selection chooses among them",
    "selection": "checkpoint choice: recipe (short finetune-prune-finetune on val members) or auc (their "
                 "recalibrated pruning curve's area); none: auc for --objective curve, recipe otherwise (measured, "
                 "docs/method.md)",
    "select_target": "speed-up the selection recipe prunes to",
    "select_finetune_steps": "finetuning steps before and after pruning in the selection recipe",
    "select_members": "validation members used for selection and diagnostics",
    "diagnose_every": "epochs between validation diagnostics (0: never)",
    "bn_mode": "BatchNorm mode of members in the meta-objective: eval (the paper) or train",
    "data_root": "dataset folder, overriding the zoo spec's",
    "mlflow": "log params, metrics and artifacts to MLflow",
    "register": "also register the chosen metanetwork in the MLflow Model Registry under this name (a new version "
                "each time; read it back as --metanet models:/NAME/VERSION) (default: logged as a model, not registered)",
    "edit": "metanetwork edit: scores (a learned criterion), additive (the paper's), gate or gate+additive",
    "evidence": "give the metanetwork per-channel evidence features",
    "calibration": "a learned criterion also reads per-channel statistics of calibration batches (activations, "
                   "Taylor scores)",
    "gradient": "a learned criterion also reads the curve objective's gradient at magnitude's ranking over the "
                "calibration batches (implies --calibration)",
    "sparsity_norm": "sparsity term: none (the paper), group or relative",
    "distill_epochs": "epochs of regression on per-member gates before the meta-objective (gate edits)",
    "gate_reg": "sparsity strength of the per-member gates that distillation targets",
    "min_member_acc": "skip training members below this validation accuracy",
    "damaged_members": "training or validation members whose files are not what the zoo's manifest records "
                       "(zoo.integrity): refuse (name them and stop), skip (train without them) or use (as they are)",
    "objective": "curve (a learned criterion, edit 'scores': the task loss of the network masked at a drawn pruning "
                 "amount; the measured best, docs/benchmarks.md) or paper (the paper's: task loss of the edited "
                 "network + group sparsity); weight_curve and paper_l1 train weight-level metanetworks",
    "score_targets": "curve objective: weight of the regression on each member's own optimised scores (0: none)",
    "l1_reg": "paper_l1 objective: strength of the L1 term on the edited weights (the paper's sign(w) gradient, 0.1)",
    "weight_temperature": "weight_curve objective: temperature of the soft mask, in units of log-magnitude",
}
for _key in TYPES:  # the settings the objective fills: their help says what each objective gives
    HELP[_key] += (f" (default: by --objective: curve {OBJECTIVES['curve'].defaults[_key]}, "
                   f"paper {OBJECTIVES['paper'].defaults[_key]})")
GE0, GE1, GT0 = {"ge": 0}, {"ge": 1}, {"gt": 0}
# what each setting may be (pydantic bounds, checked with the flags before Ray starts; floats finite)
LIMITS = {"workers": GE1, "epochs": GE1, "lr": GT0, "weight_decay": GE0, "milestones": GE0, "batches_per_step": GE1,
          "members_per_step": GE1, "batch_size": GE1, "reg": GE0, "alpha": GE0, "hidden": GE1, "layers": GE0,
          "distill_epochs": GE0, "gate_reg": GE0, "score_targets": GE0, "max_failures": GE0, "keep": GE1,
          "select_target": {"gt": 1}, "select_finetune_steps": GE0, "select_members": GE1, "diagnose_every": GE0,
          "min_member_acc": {"ge": 0, "le": 1}, "l1_reg": GE0, "weight_temperature": GT0}
# settings that do not change the chosen metanetwork (where Ray runs, logging, retries)
# (which members train is in the digest through their files: zoo.meta_runs.inputs_digest)
NOT_RESULT_SETTINGS = ("address", "mlflow", "max_failures", "check", "damaged_members", "excluded_members", "register")


def _one_of(config: dict, key: str, allowed) -> None:
    if config[key] not in allowed:
        raise SystemExit(f"meta_train: --{key.replace('_', '-')} must be one of {', '.join(allowed)}, "
                         f"not {config[key]!r}")


def check_settings(config: dict) -> dict:
    """Refuses a bad value or combination in one line naming the flag (``SystemExit``: exit 2
    through ``distributed.cli``); derives what follows from the others; makes local paths absolute
    (Ray Train's workers run in another directory)."""
    _one_of(config, "objective", OBJECTIVES)
    fill(config)  # what is not given comes from the objective (metanet.objectives)
    if config["selection"] is None:
        config["selection"] = default_selection(config["objective"])
    _one_of(config, "selection", SELECTIONS)
    _one_of(config, "bn_mode", ("eval", "train"))
    _one_of(config, "edit", EDITS)
    _one_of(config, "sparsity_norm", SPARSITY_FORMS)
    _one_of(config, "damaged_members", DAMAGED_MEMBERS)
    if config["register"] is not None and (not config["mlflow"] or not config["register"].strip()):
        raise SystemExit(f"meta_train: --register {config['register']!r}: "
                         + ("an empty model name" if config["mlflow"] else "registers in MLflow: drop --no-mlflow"))
    refusal = edit_refusal(config["objective"], config["edit"])
    if refusal:
        raise SystemExit(f"meta_train: --edit {config['edit']} with --objective {config['objective']}: {refusal}")
    if config["objective"] in WEIGHT_OBJECTIVES:
        return _absolute(config)
    if config["gradient"] and HEADS[config["edit"]].ranks is not Level.CHANNELS:
        raise SystemExit(f"meta_train: --gradient is an input of a learned criterion (--objective curve), not of "
                         f"--edit {config['edit']}")
    config["calibration"] = config["calibration"] or config["gradient"]  # the gradient reads the calibration batches
    if config["distill_epochs"] and not HEADS[config["edit"]].gates:
        raise SystemExit(f"meta_train: --distill-epochs needs a gate edit (--edit gate): edit {config['edit']} has no "
                         "gates")
    return _absolute(config)


def _absolute(config: dict) -> dict:
    # the Ray workers do not run in the driver's directory: every local path is made absolute here
    for key in ("zoo", "out", "data_root"):
        if config.get(key) and "://" not in config[key] and not os.path.isabs(config[key]):
            config[key] = os.path.abspath(config[key])
    return config


def train_config(config: dict) -> MetaTrainConfig:
    """The library's meta-training settings from a run's settings."""
    return MetaTrainConfig(**{k: tuple(config[k]) if k == "milestones" else config[k] for k in TRAIN_KEYS})


def metanet_settings(config: dict, edge_widths: dict) -> dict:
    """``MetaNetConfig``'s keyword arguments from a run's settings and the zoo's edge widths."""
    return {"edge_widths": edge_widths, **{k: config[k] for k in NET_KEYS}}
