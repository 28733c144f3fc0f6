"""Weight-level pruning: which criterion keeps the most accuracy at each sparsity and at 2:4?

Every held-out network (the zoo's ``test`` members and every member of ``--heldout``) is pruned by
each method at each fraction of zeros (``--sparsities``) and at 2:4 (``metanet.weight_pruning``:
first layer and classifier dense), BatchNorm recomputed, then finetuned ``--finetune`` steps with
the masks kept (the recipe's after-pruning schedule, the same seed for every method). Tables: test
accuracy per budget, and paired differences (same network) against global magnitude and against
the best hand-crafted criterion (chosen by mean validation accuracy), with 95% intervals; the
saved file's size compressed (zlib) per sparsity.

Methods: ``magnitude`` (global ranking), ``magnitude-layer`` (each layer to the fraction),
``wanda`` and ``wanda-layer`` (|w| x input norm over calibration batches), ``random``,
``curve`` (per-weight scores optimised on the network, ``--curve-steps`` steps of the weight-level
curve objective: the reference a learned criterion should approach), and each ``--variants``
metanetwork meta-trained on the zoo's ``train`` members, its epoch chosen on the ``val`` members'
validation accuracy right after pruning (mean over ``CURVE_SPARSITIES``):

- ``objective=weight_curve`` (default): a ``weight_scores`` metanetwork, the weight-level curve
  objective; its per-weight scores rank the weights (global);
- ``objective=paper_l1``: the paper's unstructured objective (additive edit; task loss +
  ``l1`` x sum |w|, reg 0.1 in the paper's code), then global magnitude on the edited network.

    python bench/sparsity.py --zoo runs/zoo-digits --heldout runs/zoo-digits-heldout
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed.progress import progress  # noqa: E402
from metanet.diagnostics import CURVE_SPARSITIES, criterion_of, pruning_curve, weight_points  # noqa: E402
from metanet.files import atomic_write_text  # noqa: E402
from metanet.meta_training import MetaTrainConfig, make_member  # noqa: E402
from metanet.selection import score, train_and_select  # noqa: E402
from metanet.heads import HEADS  # noqa: E402
from metanet.levels import Level  # noqa: E402
from metanet.objectives import OBJECTIVES, trained_edit  # noqa: E402
from metanet.metanetwork import MetaNetConfig, MetaNetwork  # noqa: E402
from metanet.paired import best_by, mean_ci  # noqa: E402
from metanet.reconstruct import ReconstructSettings, reconstruct_masked  # noqa: E402
from metanet.metanetwork import apply_metanetwork  # noqa: E402
from metanet.recipe import RecipeConfig, calibration, recalibrate, reconstruction_batches  # noqa: E402
from metanet.train import evaluate, train  # noqa: E402
from bench.common import parser, set_up  # noqa: E402
from metanet.criteria import criterion  # noqa: E402
from metanet.curve import fit_scores  # noqa: E402
from metanet.masks import WeightMask  # noqa: E402
from metanet.weight_pruning import WeightPruning, make_permanent, sparsify  # noqa: E402
from zoo.arch import build_model  # noqa: E402
from zoo.model_files import save_model  # noqa: E402
from zoo.integrity import checked  # noqa: E402
from zoo.store import Zoo, benchmark_networks  # noqa: E402

BASELINES = {"magnitude": ("magnitude", "global"), "magnitude-layer": ("magnitude", "layer"),
             "wanda": ("wanda", "global"), "wanda-layer": ("wanda", "layer"), "random": ("random", "global")}
WEIGHT_OBJECTIVES = tuple(n for n, o in OBJECTIVES.items() if o.level is Level.WEIGHTS)
PER_NETWORK = "curve"  # per-weight scores fitted to each network (metanet.curve.fit_scores with a WeightMask)
HAND_CRAFTED = ("magnitude", "magnitude-layer", "wanda", "wanda-layer")  # the candidates for "best" (not random)
VARIANT_DEFAULTS = {"objective": "weight_curve", "layers": 4, "hidden": 32, "lr": 3e-3, "epochs": 20, "l1": 0.1,
                    "residual": 0.05}


def parse_variant(text: str) -> dict:
    """``key=value,...`` over ``VARIANT_DEFAULTS``."""
    v = dict(VARIANT_DEFAULTS)
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in v or not value:
            raise SystemExit(f"sparsity: --variants {text!r}: {item!r} is not key=value with a key of "
                             f"{', '.join(VARIANT_DEFAULTS)}")
        if key == "objective":
            if value not in WEIGHT_OBJECTIVES:
                raise SystemExit(f"sparsity: --variants {text!r}: objective must be {' or '.join(WEIGHT_OBJECTIVES)}")
            v[key] = value
            continue
        try:
            v[key] = type(VARIANT_DEFAULTS[key])(float(value))
        except ValueError:
            raise SystemExit(f"sparsity: --variants {text!r}: {key}={value!r} is not a number") from None
    return v


def name_of(v: dict) -> str:
    kind = ("weight scores" if not HEADS[trained_edit(v["objective"], "additive")].edits
            else f"paper L1 {v['l1']:g}, r {v['residual']:g}")
    return f"meta ({kind}, GNN {v['layers']}x{v['hidden']}, {v['epochs']} ep)"


def train_variant(v: dict, zoo: Zoo, train_records, val_models, data, cfg: RecipeConfig, batch_size: int, log):
    """Meta-trains one variant; keeps the epoch whose mean validation curve (accuracy right after
    pruning at ``CURVE_SPARSITIES``, BatchNorm recalibrated) over ``val_models`` is highest."""
    torch.manual_seed(0)
    meta_cfg = MetaTrainConfig(objective=v["objective"], epochs=v["epochs"], lr=v["lr"], batch_size=batch_size,
                               milestones=(int(v["epochs"] * 0.75),), l1_reg=v["l1"])
    members = [make_member(r.id, build_model(r.arch), r.graph, meta_cfg) for r in train_records]
    edit = trained_edit(v["objective"], "additive")
    net = MetaNetwork(MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=v["hidden"], layers=v["layers"], edit=edit,
                                    residual=v["residual"], backend="torch"))

    def val_area(m: MetaNetwork) -> float:  # the mean validation curve area at CURVE_SPARSITIES
        return score(m, val_models, data, cfg, sparsities=CURVE_SPARSITIES)

    seconds = []

    def report(epoch, metrics, m, row):
        if epoch < 0:
            return
        seconds.append(metrics["seconds"])
        log(f"    epoch {epoch}: task loss {metrics['task_loss']:.3f}, sparsity term {metrics['sparsity_loss']:.3f}, "
            f"val area {100 * row['score']:.1f} ({metrics['seconds']:.1f} s)")

    chosen = train_and_select(net, members, data, meta_cfg, val_area, report=report)
    log(f"  chosen epoch {chosen.epoch} (val area {100 * chosen.score:.1f}; untrained "
        f"{100 * chosen.history[0]['score']:.1f})")
    return net, {"epoch": chosen.epoch, "epoch_seconds": statistics.mean(seconds) if seconds else 0.0}


RECONSTRUCTED = " + LS"  # a method's row with the masked least-squares reconstruction


def prune_and_tune(model, crit, pruning: WeightPruning, data, cfg: RecipeConfig, budgets) -> dict:
    """{budget: (val, test accuracy)} of ``model`` masked by ``crit`` (with ``cfg.reconstruct``, each
    masked layer re-fitted to ``model``'s outputs over its unmasked weights: ``reconstruct_masked``),
    BatchNorm recalibrated, budget 0 right after pruning, the others after that many finetuning steps
    (masks kept)."""
    work = copy.deepcopy(model)
    report = sparsify(work, pruning, crit, calibration(data, cfg) if crit.data_driven else None)
    if cfg.reconstruct is not None:
        reconstruct_masked(work, model, report.layers, reconstruction_batches(data, cfg), cfg.reconstruct)
    if cfg.reconstruct is None or cfg.reconstruct.recalibrates(channels=False):
        recalibrate(work, data, cfg)
    out = {0: (evaluate(work, data, "val")[0], evaluate(work, data, "test")[0])}
    for steps in budgets:
        if steps:
            torch.manual_seed(0)
            tuned = copy.deepcopy(work)
            train(tuned, data, dataclasses.replace(cfg.after, steps=steps))
            out[steps] = (evaluate(tuned, data, "val")[0], evaluate(tuned, data, "test")[0])
    return out


def compressed_sizes(model, runs, data, cfg) -> dict:
    """{run: (raw bytes, zlib bytes)} of ``model`` saved after global magnitude pruning at each run
    (and unpruned, under "dense")."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, pruning in [("dense", None), *runs]:
            work = copy.deepcopy(model)
            if pruning is not None:
                sparsify(work, pruning, criterion("magnitude", Level.WEIGHTS))
                make_permanent(work)
            path = os.path.join(tmp, "m.pt")
            save_model(work, path)
            raw = Path(path).read_bytes()
            out[key] = (len(raw), len(zlib.compress(raw, 6)))
    return out


def main(argv=None) -> None:
    p = parser(__doc__, zoo_help="the zoo: train members meta-train, val members select", heldout=True)
    p.add_argument("--variants", nargs="*", default=["objective=weight_curve", "objective=paper_l1"],
                   help=f"key=value,... over {VARIANT_DEFAULTS}; none: baselines only")
    p.add_argument("--methods", nargs="+", default=[*BASELINES, "curve"], choices=[*BASELINES, "curve"])
    p.add_argument("--sparsities", type=float, nargs="+", default=list(CURVE_SPARSITIES))
    p.add_argument("--no-nm", action="store_true", help="skip 2:4")
    p.add_argument("--finetune", type=int, nargs="+", default=[0, 20, 80], help="finetuning budgets (steps)")
    p.add_argument("--curve-steps", type=int, default=40)
    p.add_argument("--reconstruct", action="store_true", help=f"also every method with each masked layer re-fitted "
                   f"by least squares over its unmasked weights (metanet.reconstruct), as 'METHOD{RECONSTRUCTED}' rows, "
                   "and a table of what that adds")
    p.add_argument("--limit", type=int, help="at most this many held-out networks (a smoke run)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--partial", help="after each network, write the tables so far to this file (a long run's "
                   "results survive its interruption)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()

    def log(line: str) -> None:
        print(line, flush=True)

    setup = set_up(args)
    zoo, data = setup.zoo, setup.data
    train_records, val_models, held = benchmark_networks(zoo, setup.heldout)
    held = held[:args.limit] if args.limit else held
    cfg = RecipeConfig()
    runs = [(f"{s:g}", WeightPruning(sparsity=s)) for s in args.sparsities]
    runs += [] if args.no_nm else [("2:4", WeightPruning(nm=(2, 4)))]
    log(f"{data.name}: {len(held)} held-out networks; runs {', '.join(k for k, _ in runs)}; finetuning budgets "
        f"{args.finetune} steps; variants meta-trained on {len(train_records)} train members, chosen on "
        f"{len(val_models)} val members")
    nets, info = {}, {}
    for text in args.variants:
        v = parse_variant(text)
        log(f"  {name_of(v)}:")
        nets[name_of(v)], info[name_of(v)] = train_variant(v, zoo, train_records, val_models, data, cfg,
                                                            args.batch_size, log)
    methods = [*args.methods, *nets]
    repairs = {"": cfg, **({RECONSTRUCTED: dataclasses.replace(cfg, reconstruct=ReconstructSettings())}
                          if args.reconstruct else {})}
    rows_of = [m + tag for m in methods for tag in repairs]
    results: dict[str, list[dict]] = {m: [] for m in rows_of}  # per row, per network: {run: {budget: (val, test)}}
    seconds: dict[str, list[float]] = {m: [] for m in rows_of}
    sizes = []
    for record in progress(held, desc="held-out networks", unit="network"):
        model = record.network().eval()
        sizes.append(compressed_sizes(model, runs, data, cfg))
        for m in methods:
            start = time.perf_counter()
            if m in BASELINES:
                crit, scope = criterion(BASELINES[m][0], Level.WEIGHTS), BASELINES[m][1]
                source = model
            elif m == PER_NETWORK:
                mask = WeightMask(model)
                scores, _ = fit_scores(model, data, mask.amounts, steps=args.curve_steps, batch_size=args.batch_size,
                                       seed=0, masker=mask)
                crit = mask.criterion(scores, "curve")
                scope, source = "global", model
            else:
                (source, crit), scope = criterion_of(nets[m], model, torch.zeros(data.input_shape), cfg, data,
                                                     Level.WEIGHTS), "global"
            scoring = time.perf_counter() - start
            for tag, recipe in repairs.items():
                start = time.perf_counter()
                per_run = {}
                for key, pruning in runs:
                    if pruning.sparsity is not None:
                        pruning = dataclasses.replace(pruning, scope=scope)
                    per_run[key] = prune_and_tune(source, crit, pruning, data, recipe, args.finetune)
                results[m + tag].append(per_run)
                seconds[m + tag].append(scoring + (time.perf_counter() - start if tag else 0.0))
        if args.partial:
            lines: list[str] = []
            report(results, seconds, sizes, runs, args.finetune, lines.append)
            atomic_write_text(args.partial, "\n".join(lines) + "\n")
    report(results, seconds, sizes, runs, args.finetune, log)
    if info:
        log("\nmeta-training: " + "; ".join(f"{n}: epoch {i['epoch']} chosen, {i['epoch_seconds']:.1f} s per epoch"
                                            for n, i in info.items()))
    log(f"total {(time.perf_counter() - t0) / 60:.1f} min")


def report(results, seconds, sizes, runs, budgets, log) -> None:
    keys = [k for k, _ in runs]
    head = " | ".join(keys)
    n = len(next(iter(results.values())))
    candidates = [m for m in HAND_CRAFTED if m in results]
    for budget in budgets:
        best = {k: best_by(candidates, lambda c: [r[k][budget][0] for r in results[c]]) for k in keys}
        when = "right after pruning (BatchNorm recalibrated)" if budget == 0 else f"after {budget} finetuning steps"
        log(f"\nTest accuracy (%) {when}, {n} held-out networks; best hand-crafted by validation accuracy: "
            + ", ".join(f"{k} {b}" for k, b in best.items()) + "; differences paired by network, 95% intervals:\n")
        log(f"| method | {head} | - magnitude at {head} | - best at {head} | scoring s |")
        log("|---|" + "---|" * (3 * len(keys) + 1))
        for m, rows in results.items():
            means = [statistics.mean(100 * r[k][budget][1] for r in rows) for k in keys]
            diffs = []
            for ref_of in (lambda k: "magnitude", lambda k: best[k]):
                for k in keys:
                    ref = ref_of(k)
                    diffs.append("" if m == ref or ref not in results else
                                 str(mean_ci([100 * (rows[i][k][budget][1] - results[ref][i][k][budget][1])
                                              for i in range(n)])))
            log(f"| {m} | " + " | ".join(f"{v:.1f}" for v in means) + " | " + " | ".join(diffs)
                + f" | {statistics.mean(seconds[m]):.2f} |")
    fitted = [(m[:-len(RECONSTRUCTED)], m) for m in results if m.endswith(RECONSTRUCTED)]
    for budget in budgets if fitted else []:
        when = "right after pruning" if budget == 0 else f"after {budget} finetuning steps"
        log(f"\nWhat the reconstruction adds {when}: (method{RECONSTRUCTED}) - method, points, paired by network, "
            "95% intervals:\n")
        log(f"| method | {head} |")
        log("|---|" + "---|" * len(keys))
        for plain, m in fitted:
            log(f"| {plain} | " + " | ".join(str(mean_ci([100 * (results[m][i][k][budget][1] - results[plain][i][k][budget][1])
                                                             for i in range(n)])) for k in keys) + " |")
    log(f"\nSaved file size, zlib-compressed, relative to the unpruned file's compressed size (mean over {n} "
        "networks; global magnitude masks):\n")
    log("| | dense | " + head + " |")
    log("|---|---|" + "---|" * len(keys))
    ratio = {k: statistics.mean(s[k][1] / s["dense"][1] for s in sizes) for k in ["dense", *keys]}
    raw = statistics.mean(s["dense"][0] for s in sizes)
    log(f"| compressed / dense compressed (dense file {raw / 1e3:.0f} kB raw) | "
        + " | ".join(f"{ratio[k]:.2f}" for k in ["dense", *keys]) + " |")


if __name__ == "__main__":
    main()
