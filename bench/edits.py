"""Which edit lets the metanetwork prune selectively? The variants of issue 11, side by side.

Each variant (the edit's form, evidence features, the sparsity term's normalisation, distillation
from per-network gates, size) is meta-trained on the zoo's training members, then judged:

- on the zoo's validation members (split val): where the winner is chosen (``val auc`` column,
  the mean of the recalibrated pruning curve after the edit and its finetune);
- on the held-out networks (split test): what is reported. After the edit and its finetune
  (``before_steps``): share of prunable channels below 0.1 normalised importance, accuracy after
  BatchNorm recalibration, the recalibrated pruning curve at 2x and 3x, and its paired difference
  (95% interval, unit = network) to ``none`` (the unedited network with the same finetuning);
  for gate edits, the Spearman correlation of the metanetwork's gates with gates optimised on
  each held-out network (``gate corr``).

Baselines in the same table: ``none``, ``gate`` (gates optimised on each network, the same steps:
what the metanetwork should come close to without any per-network optimisation), ``depgraph``.

    python bench/edits.py                                             # digits, about 15 minutes
    python bench/edits.py --variants gate+evidence --epochs 4         # one variant, quickly
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metanet.diagnostics import diagnose  # noqa: E402
from metanet.gates import gatable  # noqa: E402
from metanet.graph import network_to_graph  # noqa: E402
from metanet.meta_training import MetaTrainConfig, make_member, meta_train  # noqa: E402
from zoo.arch import build_model  # noqa: E402
from metanet.metanetwork import MetaNetConfig, MetaNetwork  # noqa: E402
from metanet.paired import paired_difference  # noqa: E402
from metanet.methods import gate_logits_for  # noqa: E402
from metanet.recipe import prepare, recipe_from_settings  # noqa: E402
from zoo.integrity import checked  # noqa: E402
from zoo.store import Zoo  # noqa: E402

# name -> (metanetwork settings, meta-training settings); the first is the paper's edit as the
# pipeline ran it before this study
VARIANTS: dict[str, tuple[dict, dict]] = {
    "additive": ({"edit": "additive", "residual": 0.05}, {"reg": 3e-3, "sparsity_norm": "none"}),
    "additive, relative": ({"edit": "additive", "residual": 0.05}, {"reg": 3.0, "sparsity_norm": "relative"}),
    "gate, group": ({"edit": "gate"}, {"reg": 0.1, "sparsity_norm": "group"}),
    "gate, relative": ({"edit": "gate"}, {"reg": 3.0, "sparsity_norm": "relative"}),
    "gate+evidence, relative": ({"edit": "gate", "evidence": True}, {"reg": 3.0, "sparsity_norm": "relative"}),
    "gate+evidence+distill, rel.": ({"edit": "gate", "evidence": True},
                                    {"reg": 3.0, "sparsity_norm": "relative", "distill_epochs": 10}),
    "gate+evidence, rel., wide": ({"edit": "gate", "evidence": True, "hidden": 64, "layers": 6},
                                  {"reg": 3.0, "sparsity_norm": "relative"}),
    # reg 3 (the per-network gates' strength) wins over the task term within a few epochs of
    # meta-training (400 steps, not 40): weaker ones
    "gate+evidence, rel. 0.3": ({"edit": "gate", "evidence": True}, {"reg": 0.3, "sparsity_norm": "relative"}),
    "gate+evidence, rel. 0.03": ({"edit": "gate", "evidence": True}, {"reg": 0.03, "sparsity_norm": "relative"}),
    "gate+ev.+distill, rel. 0.03": ({"edit": "gate", "evidence": True},
                                    {"reg": 0.03, "sparsity_norm": "relative", "distill_epochs": 10}),
    "gate+evidence, rel. 0.1": ({"edit": "gate", "evidence": True}, {"reg": 0.1, "sparsity_norm": "relative"}),
    "gate+ev., rel. 0.1, paper GNN": ({"edit": "gate", "evidence": True, "shared_directions": True,
                                       "edge_norm": False}, {"reg": 0.1, "sparsity_norm": "relative"}),
    "additive r=0.5, rel. 0.1": ({"edit": "additive", "residual": 0.5}, {"reg": 0.1, "sparsity_norm": "relative"}),
    "gate+ev.+distill, rel. 0.03, 60 ep": ({"edit": "gate", "evidence": True},
                                           {"reg": 0.03, "sparsity_norm": "relative", "distill_epochs": 10,
                                            "epochs": 60}),
}
UNEDITED = "none"  # the baseline every row's curve is compared with: the network as it is, magnitude
BASELINES = (UNEDITED, "gate", "depgraph")
SPEEDUPS = (2.0, 3.0)
METRICS = ("ratio_spread", "mean_ratio", "share_below_0.1", "acc_recal", "curve_2x", "curve_3x", "auc")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (torch.argsort(torch.argsort(v)).double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def judge(label: str, models, data, cfg, split: str, metanet=None, gate_targets=None) -> list[dict]:
    rows = []
    method = "meta" if metanet is not None else label
    for i, (name, model) in enumerate(models):
        torch.manual_seed(0)
        try:
            prepared = prepare(model, data, method, cfg, metanet).model
        except FloatingPointError as err:  # the edit broke this network: a result, not a crash
            print(f"    {label} on {name}: {err}", flush=True)
            rows.append({"method": label, "network": name, "diverged": True, **{k: float("nan") for k in METRICS}})
            continue
        row = {"method": label, "network": name, "diverged": False,
               **diagnose(model, prepared, data, cfg, SPEEDUPS, split)}
        if metanet is not None and metanet.head.gates and gate_targets is not None:
            graph = network_to_graph(model, torch.zeros(data.input_shape))
            with torch.no_grad():
                mine = metanet.eval().gate_logits(graph)
            mask = gatable(graph)
            row["gate_corr"] = spearman(mine[mask], gate_targets[i][mask])
        rows.append(row)
    return rows


def _key(*parts) -> str:
    """What produced a row: the settings, and the source of the code that computes it."""
    import hashlib

    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    root = Path(__file__).resolve().parents[1]
    for path in sorted([*root.glob("metanet/*.py"), *root.glob("zoo/*.py")]):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def train_variant(name: str, zoo: Zoo, data, args) -> MetaNetwork:
    net_settings, meta_settings = VARIANTS[name]
    epochs = meta_settings.get("epochs", args.epochs)
    cfg = MetaTrainConfig(milestones=(int(epochs * 0.75),), lr=1e-3, batches_per_step=4, batch_size=256,
                          **{"epochs": epochs, **meta_settings})
    members = [make_member(r.id, build_model(r.arch), r.graph, cfg) for r in zoo.built("train")]
    net = MetaNetwork(MetaNetConfig(**{"edge_widths": zoo.edge_widths(), "hidden": 32, "layers": 4,
                                       **net_settings}))
    torch.manual_seed(0)
    meta_train(net, members, data, cfg, progress=False)
    return net


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="runs/zoo-digits", help="meta-training zoo (train and val members)")
    p.add_argument("--heldout", default="runs/zoo-digits-heldout", help="held-out networks (a make_zoo output)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                   help=f"variants to run (default: all: {', '.join(VARIANTS)})")
    p.add_argument("--epochs", type=int, default=20, help="meta-training epochs per variant (default 20)")
    p.add_argument("--val-members", type=int, default=4, help="validation members used for the choice")
    p.add_argument("--out", default="runs/edits", help="where rows.json goes")
    p.add_argument("--report", action="store_true", help="print the table of every result saved in --out, run nothing")
    args = p.parse_args(argv)
    if args.report:
        saved = json.loads((Path(args.out) / "rows.json").read_text())
        rows = [r for entry in saved.values() for r in entry["rows"]]
        zoo = checked(args.zoo)
        val_names = {r.id for r in zoo.built("val")}
        print_table(rows, val_names, args)
        return rows
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    zoo, held = checked(args.zoo), checked(args.heldout)
    data = zoo.dataset()
    cfg = recipe_from_settings({"before_steps": 40, "before_lr": 0.01, "after_steps": 0, "after_lr": 0.01},
                               **zoo.finetune_settings())
    val_models = [(r.id, r.network().eval()) for r in zoo.built("val")][:args.val_members]
    test_models = [(r.id, r.network().eval()) for r in held if r.status == "ok"]
    print(f"{len(test_models)} held-out networks, {len(val_models)} validation members; gate targets ...", flush=True)
    targets = [gate_logits_for(m, data, cfg)[1] for _, m in test_models]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = json.loads((out / "rows.json").read_text()) if (out / "rows.json").exists() else {}
    done: dict[str, dict] = {}  # label -> {"key": ..., "rows": [...]}

    def run(label: str, key: str, make_rows) -> list[dict]:
        """Reuses ``label``'s rows only if what produced them (settings, code, zoos) is unchanged."""
        if saved.get(label, {}).get("key") == key:
            print(f"  {label}: reused from {out / 'rows.json'}", flush=True)
            done[label] = saved[label]
        else:
            done[label] = {"key": key, "rows": make_rows()}
            print(f"  {label} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        tmp = out / "rows.json.tmp"
        tmp.write_text(json.dumps({**saved, **done}, indent=1))
        tmp.replace(out / "rows.json")  # after every label: an interrupted study keeps what it finished
        return done[label]["rows"]

    base_key = _key(args.zoo, args.heldout, args.val_members, cfg.to_dict())
    rows: list[dict] = []
    for label in BASELINES:
        rows += run(label, base_key, lambda label=label: judge(label, val_models, data, cfg, "val")
                    + judge(label, test_models, data, cfg, "test"))
    for name in args.variants:
        def variant_rows(name=name):
            net = train_variant(name, zoo, data, args)
            return (judge(name, val_models, data, cfg, "val", net)
                    + judge(name, test_models, data, cfg, "test", net, targets))
        rows += run(name, _key(base_key, VARIANTS[name], args.epochs), variant_rows)
    print_table(rows, {n for n, _ in val_models}, args)
    print(f"\n{time.perf_counter() - t0:.0f} s; rows in {out / 'rows.json'}")
    return rows


def print_table(rows: list[dict], val_names: set[str], args) -> None:
    test = [r for r in rows if r["network"] not in val_names and not r["diverged"]]
    broken = {label: sum(1 for r in rows if r["method"] == label and r["diverged"]) for label in
              dict.fromkeys(r["method"] for r in rows)}
    print(f"\nheld-out networks (test split) after the edit and a {40}-step finetune; paired difference to "
          "none in points (95% interval); val auc: validation members (the choice)")
    head = f"{'variant':<36}{'val auc':>8}{'<0.1':>6}{'acc':>6}{'2x':>6}{'3x':>6}{'2x - none':>22}{'3x - none':>22}{'gate corr':>10}"
    print(head)
    for label in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in test if r["method"] == label]
        val = [r for r in rows if r["method"] == label and r["network"] in val_names and not r["diverged"]]
        if not mine or not val:
            print(f"{label:<36}every network diverged")
            continue
        mean = lambda k, rs=mine: statistics.mean(r[k] for r in rs)  # noqa: E731
        diffs = "".join(f"{str(paired_difference(test, label, UNEDITED, f'curve_{s:g}x')) if label != UNEDITED else '':>22}"
                        for s in SPEEDUPS)
        corr = f"{mean('gate_corr'):>10.2f}" if "gate_corr" in mine[0] else f"{'':>10}"
        print(f"{label:<36}{100 * mean('auc', val):>8.1f}{100 * mean('share_below_0.1'):>5.0f}%{100 * mean('acc_recal'):>6.1f}"
              f"{100 * mean('curve_2x'):>6.1f}{100 * mean('curve_3x'):>6.1f}{diffs}{corr}"
              + (f"  ({broken[label]} diverged, left out)" if broken[label] else ""))


if __name__ == "__main__":
    main()
