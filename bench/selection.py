"""Which validation score picks the metanetwork checkpoint that prunes best?

Meta-trains on a zoo's training members and keeps a checkpoint every ``--every`` epochs. Each is
scored on half of the validation members (A) by the two candidate selection scores:

- ``auc``: the area under the recalibrated pruning curve of the edited networks (mean validation
  accuracy right after pruning to 1.5/2/3/4x, BatchNorm recomputed, no finetuning);
- ``recipe``: the short recipe scored before this change (metanetwork -> finetune -> prune to 2x
  -> finetune, ``--short-steps`` each, validation accuracy), with two seeds to show its noise;

and on the other half (B) by the outcome the score should predict: the full recipe's final
validation accuracy at 2x, 4x and 8x (the default budget), averaged over two seeds. Prints each
checkpoint's scores, each score's Spearman correlation with the outcome, and the outcome of the
checkpoint each score picks against the best one (regret).

``--objective curve`` does the same for a learned criterion (a ``scores`` metanetwork trained on
the curve objective; ``--stats`` with calibration statistics, ``--targets W`` with the regression
on each member's ``curve`` scores, ``--layers 0`` without message passing): its ``auc`` is then the
recalibrated pruning curve of the networks pruned by its scores.

    python bench/selection.py --zoo runs/zoo-digits          # about 15 minutes on 2 cores
    python bench/selection.py --zoo runs/zoo-digits --objective curve --stats --targets 1
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import parser, set_up  # noqa: E402
from metanet.meta_training import MetaTrainConfig, make_member, meta_train, snapshot  # noqa: E402
from zoo.arch import build_model  # noqa: E402
from metanet.heads import HEADS  # noqa: E402
from metanet.metanetwork import MetaNetConfig, MetaNetwork  # noqa: E402
from metanet.objectives import trained_edit  # noqa: E402
from metanet.recipe import AFTER_STEPS, BEFORE_STEPS, recipe_from_settings  # noqa: E402
from metanet.selection import choose, score, selection_recipe  # noqa: E402
from zoo.integrity import checked  # noqa: E402


def recipe_score(net, models, data, finetune, steps: tuple[int, int], targets, seeds) -> float:
    """``metanet.selection.score`` of a recipe with ``steps`` finetuning steps, averaged over seeds."""
    settings = {"before_steps": steps[0], "before_lr": 0.01, "after_steps": steps[1], "after_lr": 0.01}
    values = []
    for seed in seeds:
        torch.manual_seed(seed)
        values.append(score(net, models, data, recipe_from_settings(settings, **finetune, seed=seed), "recipe", targets))
    return statistics.mean(values)


def main() -> None:
    p = parser(__doc__, zoo_help="a make_zoo output with train and val members", zoo_default="runs/zoo-digits",
               threads=2)
    p.add_argument("--epochs", type=int, default=12, help="meta-training epochs")
    p.add_argument("--every", type=int, default=2, help="epochs between kept checkpoints")
    p.add_argument("--members", type=int, default=4, help="validation members in each half")
    p.add_argument("--short-steps", type=int, default=18, help="the short recipe's steps before and after pruning "
                   "(18: about one epoch of digits at batch 64, as the old selection)")
    p.add_argument("--objective", choices=("paper", "curve"), default="paper",
                   help="the paper's objective and additive edit, or a learned criterion on the curve objective")
    p.add_argument("--layers", type=int, default=4, help="message-passing layers (0: a per-channel MLP)")
    p.add_argument("--stats", action="store_true", help="curve: calibration statistics as node inputs")
    p.add_argument("--targets", type=float, default=0.0, help="curve: weight of the regression on curve scores")
    p.add_argument("--lr", type=float, default=None, help="meta-training lr (default: the objective's usual one)")
    args = p.parse_args()
    t0 = time.perf_counter()
    setup = set_up(args)
    zoo, data = setup.zoo, setup.data
    finetune = zoo.finetune_settings()
    records = [r for r in zoo if r.status == "ok"]
    val = [r.network().eval() for r in records if r.role == "val"]
    if len(val) < 2 * args.members:
        raise SystemExit(f"selection: {args.zoo} has {len(val)} validation members; need {2 * args.members}")
    half_a, half_b = val[:args.members], val[args.members:2 * args.members]
    if not HEADS[trained_edit(args.objective, "additive")].edits:  # as bench/learned_criterion.py trains its variants
        cfg = MetaTrainConfig(objective=args.objective, epochs=args.epochs, lr=args.lr or 3e-3, batch_size=128,
                              milestones=(int(args.epochs * 0.75),), score_targets=args.targets,
                              curve_temperature=0.2)
        net_cfg = MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=32, layers=args.layers, edit="scores",
                                evidence=True, calibration=args.stats, backend="torch")
    else:
        cfg = MetaTrainConfig(epochs=args.epochs, milestones=(int(args.epochs * 0.75),), batch_size=256,
                              **({"lr": args.lr} if args.lr else {}))
        net_cfg = MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=32, layers=args.layers, residual=0.05)
    members = [make_member(r.id, build_model(r.arch), r.graph, cfg) for r in records if r.role == "train"]
    metanet = MetaNetwork(net_cfg)
    kept = [(-1, snapshot(metanet))]

    def on_epoch(epoch, metrics, net):
        if (epoch + 1) % args.every == 0:
            kept.append((epoch, snapshot(net)))

    meta_train(metanet, members, data, cfg, on_epoch=on_epoch, progress=False)
    print(f"meta-trained {args.epochs} epochs on {len(members)} members, {len(kept)} checkpoints "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    recipe_cfg = recipe_from_settings({"before_steps": 0, "before_lr": 0.01, "after_steps": 0, "after_lr": 0.01},
                                      **finetune)
    rows = []
    for epoch, state in kept:
        metanet.load_state_dict(state)
        auc = score(metanet, half_a, data, recipe_cfg, "auc")
        short = []
        for seed in (0, 1):  # the score meta_train.py selects with, one seed each
            torch.manual_seed(seed)
            short.append(score(metanet, half_a, data, selection_recipe(finetune, args.short_steps, seed=seed)))
        outcome = recipe_score(metanet, half_b, data, finetune, (BEFORE_STEPS, AFTER_STEPS), [2.0, 4.0, 8.0], [0, 1])
        rows.append((epoch, auc, short[0], short[1], outcome))
        print(f"  checkpoint after epoch {epoch + 1}: auc {100 * auc:.1f}, short recipe {100 * short[0]:.1f} / "
              f"{100 * short[1]:.1f} (seeds 0/1), outcome {100 * outcome:.1f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    outcomes = [r[4] for r in rows]
    best = max(outcomes)
    print(f"\n{len(rows)} checkpoints; outcome = full recipe ({BEFORE_STEPS}+{AFTER_STEPS} steps) final validation "
          f"accuracy at 2/4/8x on {args.members} other validation members, 2 seeds")
    print(f"{'score':<22}{'Spearman vs outcome':>20}{'picks epoch':>13}{'regret (points)':>17}")
    for name, col in (("auc", 1), ("short recipe, seed 0", 2), ("short recipe, seed 1", 3)):
        values = [r[col] for r in rows]
        rho = stats.spearmanr(values, outcomes).statistic
        pick_epoch, _ = choose({r[0]: v for r, v in zip(rows, values)})  # the rule meta_train.py chooses by
        pick = [r[0] for r in rows].index(pick_epoch)
        print(f"{name:<22}{rho:>20.2f}{pick_epoch + 1:>13}{100 * (best - outcomes[pick]):>17.1f}")
    rho = stats.spearmanr([r[2] for r in rows], [r[3] for r in rows]).statistic
    print(f"short recipe seed 0 vs seed 1 (its own repeatability): Spearman {rho:.2f}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
