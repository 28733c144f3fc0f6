"""How strong must the benchmark's oracle (per-network sparse learning) be to change the pruning curve?

For each ``oracle_reg``: every held-out network is sparse-trained for the recipe's steps before
pruning, then its recalibrated pruning curve (test accuracy right after pruning, BatchNorm
recomputed, no finetuning) is compared, paired by network, with ``none`` (plain finetuning, same
steps); with the selectivity of the sparse training and its accuracy before pruning.

    python bench/oracle_strength.py --zoo runs/zoo-digits-heldout        # about 4 minutes
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import parser, set_up  # noqa: E402
from metanet.diagnostics import CURVE_SPEEDUPS, diagnose  # noqa: E402
from metanet.paired import paired_difference  # noqa: E402
from metanet.recipe import RecipeConfig, prepare, recipe_from_settings  # noqa: E402
from zoo.integrity import checked  # noqa: E402


def main() -> None:
    p = parser(__doc__, zoo_help="held-out networks (a make_zoo output)", zoo_default="runs/zoo-digits-heldout",
               threads=2)
    p.add_argument("--regs", type=float, nargs="+", default=[0.05, 0.2, 0.5], help="oracle_reg values")
    p.add_argument("--steps", type=int, default=40, help="sparse-learning steps (the recipe's before_steps)")
    args = p.parse_args()
    setup = set_up(args)
    zoo, data = setup.zoo, setup.data
    settings = {"before_steps": args.steps, "before_lr": 0.01, "after_steps": 0, "after_lr": 0.01}
    rows = []
    for r in (r for r in zoo if r.status == "ok"):
        model = r.network().eval()
        for label, reg in [("none", None), *((f"reg {g:g}", g) for g in args.regs)]:
            cfg: RecipeConfig = recipe_from_settings(settings, **zoo.finetune_settings(), oracle_reg=reg or 0.0)
            torch.manual_seed(0)
            prepared = prepare(model, data, "none" if reg is None else "oracle", cfg).model
            rows.append({"network": r.id, "method": label, **diagnose(model, prepared, data, cfg, split="test")})
        print(f"  {r.id} done", flush=True)
    keys = [f"curve_{s:g}x" for s in CURVE_SPEEDUPS]
    print(f"\n{len({r['network'] for r in rows})} networks, {args.steps} steps; paired difference to none on the "
          "recalibrated curve (points, 95% interval)")
    print(f"{'oracle':<10}" + "".join(f"{k.removeprefix('curve_'):>22}" for k in keys)
          + f"{'spread':>8}{'<0.1':>7}{'acc':>7}")
    for label in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == label]
        cells = "".join(f"{str(paired_difference(rows, label, 'none', k)):>22}" for k in keys)
        print(f"{label:<10}{cells}{statistics.mean(r['ratio_spread'] for r in mine):>8.3f}"
              f"{100 * statistics.mean(r['share_below_0.1'] for r in mine):>6.0f}%"
              f"{100 * statistics.mean(r['acc_recal'] for r in mine):>7.1f}")


if __name__ == "__main__":
    main()
