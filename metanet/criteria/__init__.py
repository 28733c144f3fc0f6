"""Pruning criteria, channels and weights, in one registry (``CRITERIA``, by name; each entry's
``levels`` says what it ranks): ``criterion("fpgm")``, ``criterion("wanda", Level.WEIGHTS)``,
``names(Level.CHANNELS)``. Analysis only: ``metanet.prune`` and ``metanet.weight_pruning`` act.

| name | channels | weights |
|---|---|---|
| magnitude | group L2 norm (the default) | abs(w) |
| taylor, bn_scale, lamp, fpgm, hessian | Torch-Pruning's importances | |
| random | random | random |
| wanda | | abs(w) times its input's norm |

Given scores (``GivenScores``: the ``curve`` method's, a metanetwork's) are criteria too, made per
network rather than registered.
"""

from metanet.criteria.base import CRITERIA, Batches, Criterion, calibration_batches, criterion, names
from metanet.criteria.both import GivenScores, Magnitude, Random
from metanet.criteria.channels import FPGM, LAMP, BNScale, Hessian, ScoreImportance, Taylor, WithFallback
from metanet.criteria.weights import Wanda

# registration order is the order the CLIs list them in (and Tune's criterion choices)
for _entry in (Magnitude(), Taylor(), BNScale(), LAMP(), FPGM(), Hessian(), Random(), Wanda()):
    CRITERIA.add(_entry)

__all__ = ["CRITERIA", "Batches", "BNScale", "Criterion", "FPGM", "GivenScores", "Hessian", "LAMP", "Magnitude",
           "Random", "ScoreImportance", "Taylor", "Wanda", "WithFallback", "calibration_batches", "criterion", "names"]
