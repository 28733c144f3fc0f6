"""Which form of the curve objective trains per-channel scores best? Variants side by side.

For every network of the given zoos' ``--roles`` (default: the validation members, so that the
defaults chosen here are not chosen on the networks the quality benchmark reports), each variant's
scores are fitted on the network (``metanet.curve.fit_scores``), then used as the pruner's
importance; the table is the accuracy on the validation split right after pruning to each speed-up
(BatchNorm recalibrated, no finetuning), paired against magnitude on the same network, with 95%
intervals over networks, and the seconds a fit takes. A variant is ``mask`` (soft / hard), ``T``
(temperature), ``lr``, ``steps`` and ``distill`` (weight of distillation to the unmasked network).

    python bench/curve_objective.py --zoo runs/zoo-digits
    python bench/curve_objective.py --zoo runs/zoo-cifar10-w12 --variants hard,0.5,0.05,40,0 soft,0.5,0.05,40,0
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metanet.criteria import criterion  # noqa: E402
from metanet.curve import fit_scores
from metanet.masks import ChannelMask  # noqa: E402
from metanet.diagnostics import CURVE_SPEEDUPS, pruning_curve  # noqa: E402
from metanet.paired import mean_ci  # noqa: E402
from metanet.prune import amounts_for  # noqa: E402
from metanet.recipe import RecipeConfig  # noqa: E402

REFERENCE = "magnitude"  # the row every other is compared with
from zoo.integrity import checked  # noqa: E402

# mask, temperature, lr, steps, distill
DEFAULT_VARIANTS = ["soft,0.2,0.2,40,0", "hard,0.5,0.2,40,0", "hard,0.5,0.05,40,0", "soft,0.5,0.2,40,0",
                    "soft,0.1,0.2,40,0", "soft,0.2,0.05,40,0", "soft,0.2,0.5,40,0", "soft,0.2,0.2,40,1",
                    "soft,0.2,0.2,120,0"]


def parse_variant(text: str) -> dict:
    try:
        mask, t, lr, steps, distill = text.split(",")
        return {"mask": mask, "temperature": float(t), "lr": float(lr), "steps": int(steps), "distill": float(distill)}
    except ValueError:
        raise SystemExit(f"curve_objective: --variants {text!r}: expected mask,T,lr,steps,distill") from None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", nargs="+", required=True, help="zoos whose members are the networks")
    p.add_argument("--roles", nargs="+", default=["val"], help="member roles to use (default: val)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="mask,T,lr,steps,distill")
    p.add_argument("--data-root", help="the dataset folder, if not where the zoo was built from")
    p.add_argument("--limit", type=int, default=8, help="networks at most (default: 8)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variants]
    networks, data = [], None
    for path in args.zoo:
        zoo = checked(path)
        data = data or zoo.dataset(args.data_root)
        networks += [r for r in zoo if r.status == "ok" and r.role in args.roles]
    networks = networks[: args.limit]
    if not networks:
        raise SystemExit(f"curve_objective: no members with roles {args.roles} in {args.zoo}")
    cfg = RecipeConfig()
    x = torch.zeros(data.input_shape)
    print(f"{len(networks)} networks ({', '.join(sorted({r.arch['family'] for r in networks}))}), {data.name}; "
          f"validation accuracy right after pruning (BN recalibrated), paired against magnitude", flush=True)
    curves: dict[str, list[dict]] = {REFERENCE: []}
    seconds: dict[str, list[float]] = {}
    for i, record in enumerate(networks):
        model = record.network().eval()
        torch.manual_seed(0)
        curves[REFERENCE].append(pruning_curve(model, data, cfg, CURVE_SPEEDUPS, "val", criterion("magnitude")))
        amounts = list(amounts_for(model, x, [min(CURVE_SPEEDUPS), max(CURVE_SPEEDUPS)]).values())
        masker = ChannelMask(model, x)
        for text, v in zip(args.variants, variants):
            start = time.perf_counter()
            scores, _ = fit_scores(model, data, amounts, steps=v["steps"], batch_size=128, seed=0, lr=v["lr"],
                                   temperature=v["temperature"], mode=v["mask"], distill=v["distill"], masker=masker)
            seconds.setdefault(text, []).append(time.perf_counter() - start)
            curves.setdefault(text, []).append(
                pruning_curve(model, data, cfg, CURVE_SPEEDUPS, "val", masker.criterion(scores)))
        print(f"  network {i + 1}/{len(networks)} ({record.id}) done", flush=True)
    head = " | ".join(f"{s:g}x" for s in CURVE_SPEEDUPS)
    print(f"\n| variant (mask,T,lr,steps,distill) | {head} | - magnitude at {head} | fit s |")
    print("|---|" + "---|" * (2 * len(CURVE_SPEEDUPS) + 1))
    for name, rows in curves.items():
        means = [f"{100 * statistics.mean(r[s] for r in rows):.1f}" for s in CURVE_SPEEDUPS]
        diffs = [str(mean_ci([100 * (r[s] - m[s]) for r, m in zip(rows, curves[REFERENCE])]))
                 if name != REFERENCE else "" for s in CURVE_SPEEDUPS]
        fit = f"{statistics.mean(seconds[name]):.1f}" if name in seconds else ""
        print(f"| {name} | " + " | ".join(means) + " | " + " | ".join(diffs) + f" | {fit} |")


if __name__ == "__main__":
    main()
