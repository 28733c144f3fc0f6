"""Which pruner settings and finetuning budget return usable networks? (the recipe's defaults)

On the held-out digits networks (``zoo/specs/digits-heldout.yaml``: deeper and wider than any
zoo member, not pre-pruned), for each pruner setting: the recalibrated pruning curve (accuracy
right after pruning, BatchNorm statistics recomputed, no finetuning) and the ``none`` recipe at
2x (finetune, prune, recalibrate, finetune) with each step budget, against the unpruned accuracy.

    python pipelines/make_zoo.py --spec zoo/specs/digits-heldout.yaml --no-mlflow
    python bench/pruner_settings.py --zoo runs/zoo-digits-heldout        # about 6 minutes
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import parser, set_up  # noqa: E402
from metanet.diagnostics import CURVE_SPEEDUPS, pruning_curve  # noqa: E402
from metanet.prune import PruneSettings  # noqa: E402
from metanet.recipe import RecipeConfig, prune_with_method  # noqa: E402
from zoo.integrity import checked  # noqa: E402
from metanet.train import TrainConfig  # noqa: E402

SETTINGS = {
    "global, max, cap 0.95 (old default)": PruneSettings(global_pruning=True, max_ratio=0.95, normalizer="max"),
    "global, max, cap 0.7": PruneSettings(global_pruning=True, max_ratio=0.7, normalizer="max"),
    "global, no normaliser, cap 0.9": PruneSettings(global_pruning=True, max_ratio=0.9, normalizer=None),
    "per-layer, cap 0.9 (new default)": PruneSettings(global_pruning=False, max_ratio=0.9, normalizer="max"),
}
BUDGETS = [(20, 40), (40, 80), (80, 160)]


def main() -> None:
    p = parser(__doc__, zoo_help="held-out networks (a make_zoo output)", zoo_default="runs/zoo-digits-heldout",
               threads=2)
    p.add_argument("--target", type=float, default=2.0, help="speed-up of the finetuned comparison")
    p.add_argument("--batch-size", type=int, default=64, help="finetuning batch size (the digits zoo's)")
    args = p.parse_args()
    setup = set_up(args)
    zoo, data = setup.zoo, setup.data
    nets = [(r.id, r.network(), r.metrics["test_acc"]) for r in zoo if r.status == "ok"]
    print(f"{len(nets)} held-out networks from {args.zoo}; unpruned test accuracy "
          f"{100 * statistics.mean(a for *_, a in nets):.1f}% mean\n")
    rows = []
    for label, settings in SETTINGS.items():
        t0 = time.perf_counter()
        base = RecipeConfig(target=args.target, pruning=settings)
        curves = [pruning_curve(m, data, base, CURVE_SPEEDUPS, split="test") for _, m, _ in nets]
        budgets = BUDGETS if "new default" in label else [(40, 80)]
        for before, after in budgets:
            cfg = replace(base, before=TrainConfig(steps=before, lr=0.01, schedule="constant", augment=False,
                                                   batch_size=args.batch_size),
                          after=TrainConfig(steps=after, lr=0.01, schedule="cosine", augment=False,
                                            batch_size=args.batch_size))
            drops = []
            for _, model, acc in nets:
                torch.manual_seed(0)
                _, record = prune_with_method(model, data, "none", cfg)
                drops.append(100 * (acc - record["test_acc"]))
            rows.append((label, before, after, [statistics.mean(c[s] for c in curves) for s in CURVE_SPEEDUPS],
                         statistics.mean(drops), max(drops), time.perf_counter() - t0))
    head = (f"{'pruner setting':<38}{'steps':>9}  " + "".join(f"{f'{s:g}x':>7}" for s in CURVE_SPEEDUPS)
            + f"{'drop@' + format(args.target, 'g') + 'x mean':>16}{'max':>7}{'s':>6}")
    print("recalibrated curve: test accuracy (%) right after pruning, BN recomputed, no finetuning, mean over "
          "networks;\ndrop: unpruned minus final test accuracy (points) of 'none' (finetune, prune, recalibrate, "
          "finetune)")
    print(head)
    print("-" * len(head))
    for label, before, after, curve, mean_drop, max_drop, secs in rows:
        print(f"{label:<38}{f'{before}+{after}':>9}  " + "".join(f"{100 * c:>7.1f}" for c in curve)
              + f"{mean_drop:>16.1f}{max_drop:>7.1f}{secs:>6.0f}")


if __name__ == "__main__":
    main()
