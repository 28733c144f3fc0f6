"""How much of what the per-network ``curve`` scores change could a learned criterion predict?

For each network of the zoo's ``--fit-roles`` and ``--test-roles`` members, the ``curve`` scores
(``metanet.curve.fit_scores``, the ``curve`` method's settings) are fitted twice, with two seeds
(other batches and amounts), and each fit's **correction** is its standardised scores minus the
magnitude base (``metanet.scoring.ScoreMap.base``): what the per-network optimisation changed
about magnitude's ranking. The table says

- how reproducible a correction is on its own network (correlation of the two seeds' corrections,
  per network, averaged): an upper bound on what any predictor of it could reach;
- how much of it a least-squares fit on per-channel features explains on networks it was not
  fitted on (R^2 on the test members, fitted on the fit members): the features are the channel
  evidence (``metanet.gates.channel_evidence``), the calibration statistics
  (``metanet.scoring.channel_statistics``) and the magnitude base, averaged over a channel's nodes;
  ``--gradient`` adds the curve objective's gradient at magnitude's ranking
  (``metanet.scoring.gradient_statistics``, on the same calibration batches).

    python bench/score_predictability.py --zoo runs/zoo-digits
    python bench/score_predictability.py --zoo runs/zoo-cifar10-bench-20 --data-root DIR/cifar10-jpeg --gradient
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import parser, set_up  # noqa: E402
from metanet.curve import fit_scores  # noqa: E402
from metanet.gates import EVIDENCE_FEATURES, channel_evidence  # noqa: E402
from metanet.graph import network_to_graph  # noqa: E402
from metanet.prune import amounts_for  # noqa: E402
from metanet.scoring import STATISTICS, channel_statistics, gradient_statistics, score_map  # noqa: E402
from zoo.integrity import checked  # noqa: E402

FEATURES = [*(f"{k}_{s}" for k in ("z", "rank") for s in STATISTICS), *EVIDENCE_FEATURES]
GRADIENT_FEATURES = ["gradient_scaled", "gradient_rank"]


def network_rows(model, data, steps: int, batch_size: int,
                 gradient: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features [C, F], correction of seed 0 [C], correction of seed 1 [C]) of one network."""
    x = torch.zeros(data.input_shape)
    graph = network_to_graph(model, x)
    smap = score_map(model, graph)
    base = smap.base(dict(model.named_parameters()))
    amounts = list(amounts_for(model, x, [1.5, 4.0]).values())
    corrections = []
    for seed in (0, 1):
        scores, _ = fit_scores(model, data, amounts, steps=steps, batch_size=batch_size, seed=seed, masker=smap.masker)
        corrections.append(smap.masker.standardise(scores) - base)
    batches = list(data.batches("train", batch_size, limit=4))
    nodes = torch.cat([channel_statistics(model, graph, batches, smap), channel_evidence(graph),
                       *([gradient_statistics(model, graph, batches, smap)] if gradient else [])], 1)
    per_channel = torch.zeros(smap.num_channels, nodes.shape[1]).index_add(0, smap.channels, nodes[smap.nodes])
    per_channel = per_channel / smap.node_counts[:, None]
    return torch.cat([per_channel, base[:, None]], 1), corrections[0], corrections[1]


def main(argv=None) -> None:
    p = parser(__doc__, zoo_help="a make_zoo output: --fit-roles members fit the regression, --test-roles test it")
    p.add_argument("--fit-roles", nargs="+", default=["train"], help="members the regression is fitted on")
    p.add_argument("--test-roles", nargs="+", default=["val"], help="members it is tested on")
    p.add_argument("--limit", type=int, default=8, help="networks per side at most (default: 8)")
    p.add_argument("--steps", type=int, default=40, help="curve steps (default: 40, the curve method's)")
    p.add_argument("--gradient", action="store_true", help="also the curve gradient at magnitude's ranking")
    args = p.parse_args(argv)
    setup = set_up(args)
    zoo, data = setup.zoo, setup.data
    sides = {}
    for side, roles in (("fit", args.fit_roles), ("test", args.test_roles)):
        records = [r for r in zoo if r.status == "ok" and r.role in roles][: args.limit]
        if not records:
            raise SystemExit(f"score_predictability: no members with roles {roles} in {args.zoo}")
        sides[side] = [network_rows(r.network().eval(), data, args.steps, 128, args.gradient) for r in records]
        print(f"{side}: {len(records)} networks done", flush=True)
    same = [float(torch.corrcoef(torch.stack([a, b]))[0, 1]) for rows in sides.values() for _, a, b in rows]
    fit_x = torch.cat([f for f, _, _ in sides["fit"]])
    fit_y = torch.cat([a for _, a, _ in sides["fit"]])
    test_x = torch.cat([f for f, _, _ in sides["test"]])
    test_y = torch.cat([a for _, a, _ in sides["test"]])
    ones = lambda t: torch.cat([t, torch.ones(len(t), 1)], 1)  # noqa: E731
    w = torch.linalg.lstsq(ones(fit_x), fit_y[:, None]).solution
    r2 = lambda pred, y: 1 - float(((pred - y) ** 2).mean() / y.var(unbiased=False))  # noqa: E731
    # the other seed's correction as the prediction: what repeating the optimisation itself explains
    seed_r2 = statistics.mean(r2(b, a) for rows in sides.values() for _, a, b in rows)
    print(f"\n| quantity | value |\n|---|---|")
    print(f"| channels (fit / test networks) | {len(fit_y)} / {len(test_y)} |")
    print(f"| spread of a correction (std, in units of a group's spread) | {float(fit_y.std()):.2f} |")
    print(f"| correlation of the two seeds' corrections on the same network (mean over networks) | "
          f"{statistics.mean(same):.2f} |")
    print(f"| R^2 of one seed's correction predicting the other's (same network) | {seed_r2:.2f} |")
    print(f"| R^2 of the linear fit on the fit networks (in sample) | {r2(ones(fit_x) @ w, fit_y[:, None]):.2f} |")
    print(f"| R^2 of the linear fit on the test networks (held out) | {r2(ones(test_x) @ w, test_y[:, None]):.2f} |")
    names = [*FEATURES, *(GRADIENT_FEATURES if args.gradient else []), "magnitude_base"]
    corr = [(name, float(torch.corrcoef(torch.stack([test_x[:, i], test_y]))[0, 1])) for i, name in enumerate(names)]
    corr.sort(key=lambda t: -abs(t[1]))
    print("\nfeatures most correlated with the correction on the test networks: "
          + ", ".join(f"{n} {c:+.2f}" for n, c in corr[:5]))


if __name__ == "__main__":
    main()
