"""The settings a meta-training run takes from its objective when they are not given.

The default objective is ``curve`` with the settings of the best learned criterion measured
(docs/benchmarks.md, "The curve objective's gradient as an input"): a per-channel MLP (no message
passing) over the channel's evidence, calibration statistics and the curve objective's gradient at
magnitude's ranking, regressed on each member's own ``curve`` scores (x10). On 17 held-out digits
networks it beats the best hand-crafted criterion at 2x and 3x right after pruning, on 20 CIFAR-10
networks too, and on 60 more at 2x and 4x after a 20-step finetune; a GNN with the same inputs did
no better. ``paper`` (and ``paper_l1``) keep the paper's metanetwork: four message-passing layers
and the additive edit, its learning rate and batch.

``meta_train.py``, Tune's default trial (``zoo.search.default_trial``) and ``bench/quality.py``
read this one table, so what ``meta`` means follows it everywhere.
"""

from __future__ import annotations

DEFAULT_OBJECTIVE = "curve"

_PAPER = {"edit": "additive", "layers": 4, "evidence": False, "calibration": False, "gradient": False,
          "score_targets": 0.0, "lr": 1e-3, "batch_size": 256}
OBJECTIVE_DEFAULTS: dict[str, dict] = {
    "curve": {"edit": "scores", "layers": 0, "evidence": True, "calibration": True, "gradient": True,
              "score_targets": 10.0, "lr": 3e-3, "batch_size": 128},
    "paper": _PAPER,
    "paper_l1": _PAPER,
    "weight_curve": {**_PAPER, "edit": "weight_scores"},
}
# the edit an objective trains whatever edit it is given; ``paper`` trains the one it is given, an
# additive or gate edit (not a criterion's scores)
FIXED_EDITS = {"curve": "scores", "weight_curve": "weight_scores", "paper_l1": "additive"}
# the types of these settings (their pipeline defaults are None: "the objective's")
TYPES = {"edit": str, "layers": int, "evidence": bool, "calibration": bool, "gradient": bool,
         "score_targets": float, "lr": float, "batch_size": int}


def objective_defaults(objective: str) -> dict:
    """The settings ``objective`` trains with unless they are given (a copy)."""
    if objective not in OBJECTIVE_DEFAULTS:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVE_DEFAULTS)}, not {objective!r}")
    return dict(OBJECTIVE_DEFAULTS[objective])


def fill(config: dict, objective_key: str = "objective") -> dict:
    """``config`` with every setting that is None (or absent) taken from its objective's defaults."""
    for key, value in objective_defaults(config[objective_key]).items():
        if config.get(key) is None:
            config[key] = value
    return config


def edit_refusal(objective: str, edit: str) -> str | None:
    """Why ``edit`` cannot be meta-trained with ``objective``, in words for an error line (None: it
    can). One check for ``meta_train.py``, Tune's search files and ``bench/quality.py``."""
    fixed = FIXED_EDITS.get(objective)
    if fixed is not None:
        return None if edit == fixed else f"objective {objective} trains edit {fixed}"
    owner = next((o for o, e in FIXED_EDITS.items() if e == edit and e != "additive"), None)
    return None if owner is None else f"edit {edit} is trained with objective {owner}"
