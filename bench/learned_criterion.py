"""Which learned criterion? Metanetworks trained on the curve objective, side by side, against
magnitude, the other hand-crafted criteria and the per-network ``curve`` scores.

Each variant (``key=value,...`` over ``VARIANT_DEFAULTS``; ``layers=0`` is the ablation without
message passing: a per-channel MLP over the node features and, with ``evidence=1``, each channel's
evidence of ``metanet.gates.channel_evidence``; ``stats=1`` adds calibration statistics, ``grad=1``
also the curve objective's gradient at magnitude's ranking) is a ``scores`` metanetwork meta-trained with the curve
objective on the zoo's ``train`` members (``--train-family`` keeps one architecture family: the
transfer experiment); after every epoch its recalibrated pruning curve (accuracy right after
pruning, BatchNorm recomputed, no finetuning) on the ``val`` members' validation split is computed,
and the epoch with the largest area is kept. The held-out networks (the zoo's ``test`` members and
every member of ``--heldout``) are then pruned with each method to every speed-up, and the table is
their test accuracy right after pruning, paired by network, with 95% intervals, against magnitude
and against the best hand-crafted criterion (chosen per speed-up by its validation accuracy right
after pruning); ``gap closed`` is (variant - magnitude) / (curve - magnitude) of the means. ``--refine K`` adds each variant's scores
as the start of K steps of the per-network curve optimisation, beside K steps from magnitude's
ranking (what the metanetwork adds as a starting point). ``--metanets NAME=FILE`` adds metanetworks
trained elsewhere (the shipped one, ``meta_train.py``'s) as rows, untouched; with ``--variants`` given
no value nothing is meta-trained, and the zoo needs no train or val members (``--test-from`` given no
value: the zoo's own test members are left out, so ``--heldout`` alone says what is pruned).

    python bench/learned_criterion.py --zoo runs/zoo-digits --heldout runs/zoo-digits-heldout
    python bench/learned_criterion.py --zoo runs/zoo-digits --heldout runs/zoo-digits-heldout --train-family resnet
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import parser, set_up  # noqa: E402
from distributed.progress import progress  # noqa: E402
from metanet.criteria import criterion  # noqa: E402
from metanet.curve import fit_scores  # noqa: E402
from metanet.masks import ChannelMask  # noqa: E402
from metanet.diagnostics import CURVE_SPEEDUPS, curve_auc, pruning_curve  # noqa: E402
from metanet.meta_training import MetaTrainConfig, make_member  # noqa: E402
from metanet.levels import Level  # noqa: E402
from metanet.metanetwork import MetaNetConfig, MetaNetwork, load_metanetwork  # noqa: E402
from metanet.paired import best_by, mean_ci  # noqa: E402
from metanet.plotting import pyplot  # noqa: E402
from metanet.prune import amounts_for  # noqa: E402
from metanet.reconstruct import ReconstructSettings  # noqa: E402
from metanet.recipe import Prepared, RecipeConfig, calibration, prune_and_finetune  # noqa: E402
from metanet.scoring import gated_by_scores, learned_criterion, refined_criterion  # noqa: E402
from metanet.selection import train_and_select  # noqa: E402
from zoo.arch import build_model  # noqa: E402
from zoo.integrity import checked  # noqa: E402
from zoo.store import SeenNetworkError, Zoo, benchmark_networks, refuse_seen  # noqa: E402

DEFAULT_VARIANTS = ["layers=4", "layers=4,stats=1", "layers=0,stats=1", "layers=4,stats=1,targets=1"]
MAGNITUDE, PER_NETWORK = "magnitude", "curve"  # the reference rows: every table's first, the gap's other end
BASELINES = (MAGNITUDE, "fpgm")


VARIANT_DEFAULTS = {"layers": 4, "hidden": 32, "evidence": 1, "stats": 0, "grad": 0, "targets": 0.0, "lr": 3e-3,
                    "epochs": 20, "temperature": 0.2}


def parse_variant(text: str) -> dict:
    """``key=value,...`` over ``VARIANT_DEFAULTS`` (``layers=0``: no message passing; ``stats=1``:
    calibration statistics as node inputs; ``grad=1``: with them the curve objective's gradient at
    magnitude's ranking; ``targets=W``: the regression on per-member curve scores at weight W beside
    the masked task loss)."""
    v = dict(VARIANT_DEFAULTS)
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in v or not value:
            raise SystemExit(f"learned_criterion: --variants {text!r}: {item!r} is not key=value with a key of "
                             f"{', '.join(VARIANT_DEFAULTS)}")
        try:
            v[key] = type(VARIANT_DEFAULTS[key])(float(value)) if key != "lr" else float(value)
        except ValueError:
            raise SystemExit(f"learned_criterion: --variants {text!r}: {key}={value!r} is not a number") from None
    return v


def name_of(v: dict) -> str:
    kind = "MLP (no message passing)" if v["layers"] == 0 else f"GNN {v['layers']}x{v['hidden']}"
    extras = "".join([" + evidence"] * bool(v["evidence"]) + [" + statistics"] * bool(v["stats"])
                     + [" + curve gradient"] * bool(v["grad"]))
    targets = f", targets x{v['targets']:g}" if v["targets"] else ""
    return f"{kind}{extras}{targets}, lr {v['lr']:g}, {v['epochs']} ep"


def given_metanet(text: str) -> tuple[str, MetaNetwork]:
    """``NAME=FILE`` of ``--metanets``: a learned criterion (a channel-scores metanetwork), loaded."""
    name, _, path = text.partition("=")
    if not name or not path:
        raise SystemExit(f"learned_criterion: --metanets {text!r}: not NAME=FILE")
    try:
        net = load_metanetwork(path)[0]
    except (OSError, ValueError) as err:
        raise SystemExit(f"learned_criterion: --metanets {text!r}: {err}") from None
    if net.head.ranks is not Level.CHANNELS:
        raise SystemExit(f"learned_criterion: --metanets {text!r}: edit {net.config.edit!r} does not rank channels "
                         "(a learned criterion: meta_train.py --objective curve)")
    return name, net


def train_variant(v: dict, zoo: Zoo, train, val, data, cfg: RecipeConfig, batch_size: int, log) -> tuple[MetaNetwork, dict]:
    """Meta-trains one variant on ``train`` with the curve objective; keeps the epoch whose mean
    validation curve area over ``val`` is largest (epoch -1: the untrained network, magnitude)."""
    torch.manual_seed(0)
    meta_cfg = MetaTrainConfig(objective="curve", epochs=v["epochs"], lr=v["lr"], batch_size=batch_size,
                               milestones=(int(v["epochs"] * 0.75),), score_targets=v["targets"],
                               curve_temperature=v["temperature"])
    members = [make_member(r.id, build_model(r.arch), r.graph, meta_cfg) for r in train]
    net = MetaNetwork(MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=v["hidden"], layers=v["layers"],
                                    edit="scores", evidence=bool(v["evidence"]),
                                    calibration=bool(v["stats"] or v["grad"]), gradient=bool(v["grad"]),
                                    backend="torch"))
    x = torch.zeros(data.input_shape)
    batches = list(calibration(data, cfg)())

    def val_auc(m: MetaNetwork) -> float:
        return statistics.mean(curve_auc(pruning_curve(model, data, cfg, CURVE_SPEEDUPS, "val",
                                                       learned_criterion(m, model, x, batches))) for model in val)

    seconds = []

    def report(epoch, metrics, m, row):
        if epoch < 0:
            return
        seconds.append(metrics["seconds"])
        target = f", target loss {metrics['target_loss']:.3f}" if "target_loss" in metrics else ""
        log(f"    epoch {epoch}: curve loss {metrics['task_loss']:.3f}{target}, train acc (masked) "
            f"{100 * metrics['train_acc']:.1f}%, val curve area {100 * row['score']:.1f} ({metrics['seconds']:.1f} s)")

    chosen = train_and_select(net, members, data, meta_cfg, val_auc, report=report)
    log(f"  chosen epoch {chosen.epoch} (val curve area {100 * chosen.score:.1f}; untrained "
        f"{100 * chosen.history[0]['score']:.1f})")
    return net, {"epoch": chosen.epoch, "val_auc": chosen.score, "epoch_seconds": statistics.mean(seconds)}


def finetuned(model, crit, data, cfg: RecipeConfig, steps: int, speedups, seeds: int = 1) -> dict:
    """{speed-up: [(val, test accuracy) per finetuning seed]} of ``model`` pruned by ``crit``
    (BatchNorm recalibrated), then finetuned ``steps`` steps with the recipe's after-pruning schedule,
    once per data-order seed 0..seeds-1; every method gets the same seeds (paired)."""
    out = {}
    for s in speedups:
        out[s] = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            run = dataclasses.replace(cfg, target=s, after=dataclasses.replace(cfg.after, steps=steps, seed=seed))
            _, record = prune_and_finetune(Prepared(model, {}, crit), data, run)
            out[s].append((record["val_acc"], record["test_acc"]))
    return out


def seed_mean(runs: list[tuple[float, float]], which: int) -> float:
    """The mean over finetuning seeds of a network's validation (0) or test (1) accuracy."""
    return statistics.mean(r[which] for r in runs)


def noise_split(rows: list[dict], ref: list[dict], s: float) -> str:
    """Where the spread of (method - ref) after the finetune comes from: the finetuning seed (mean
    within-network standard deviation over seeds) or the network (standard deviation of the
    per-network means), and how many networks a 95% interval above 0 would need at this mean."""
    per_seed = [[100 * (a[1] - b[1]) for a, b in zip(rows[i][s], ref[i][s])] for i in range(len(rows))]
    means = [statistics.mean(d) for d in per_seed]
    within = statistics.mean(statistics.stdev(d) for d in per_seed)
    between = statistics.stdev(means)
    mean = statistics.mean(means)
    need = (f"needs about {max(2, math.ceil((2.0 * between / mean) ** 2))} networks" if mean > 0
            else "cannot come at this mean (not above 0)")
    return f"mean {mean:+.1f}, seed sd {within:.1f}, network sd {between:.1f}; an interval above 0 {need}"


def finetune_table(tuned: dict[str, list[dict]], steps: int, speedups, log, criteria=BASELINES) -> None:
    """Test accuracy after the finetune (the mean over finetuning seeds per network) and each method's
    paired difference against magnitude and against the best hand-crafted criterion at each speed-up
    (chosen by mean validation accuracy; a reconstructed method, ``RECONSTRUCTED``, against the best
    reconstructed one); with several seeds, where the differences' spread comes from."""
    n = len(tuned["magnitude"])
    seeds = len(tuned["magnitude"][0][speedups[0]])
    bests = {tag: {s: best_by([c + tag for c in criteria], lambda b: [seed_mean(r[s], 0) for r in tuned[b]])
                   for s in speedups} for tag in dict.fromkeys(suffix(m) for m in tuned)}
    best = bests[""]
    head = " | ".join(f"{s:g}x" for s in speedups)
    log(f"\nTest accuracy (%) after pruning and {steps} finetuning steps ({seeds} data-order seed"
        f"{'s, averaged per network' if seeds > 1 else ''}), {n} held-out networks; best hand-crafted "
        f"by validation accuracy: {'; '.join(', '.join(f'{s:g}x {b}' for s, b in bb.items()) for bb in bests.values())}"
        "; paired, 95% intervals:\n")
    log(f"| method | {head} | - magnitude at {head} | - best at {head} |")
    log("|---|" + "---|" * (3 * len(speedups)))
    for m, rows in tuned.items():
        best = bests[suffix(m)]
        mag = "magnitude" + suffix(m)
        means = [statistics.mean(100 * seed_mean(r[s], 1) for r in rows) for s in speedups]
        diffs = ["" if m == ref else
                 str(mean_ci([100 * (seed_mean(rows[i][s], 1) - seed_mean(tuned[ref][i][s], 1)) for i in range(n)]))
                 for ref, s in [*((mag, s) for s in speedups), *((best[s], s) for s in speedups)]]
        log(f"| {m} | " + " | ".join(f"{v:.1f}" for v in means) + " | " + " | ".join(diffs) + " |")
    gain_table({m: [{s: seed_mean(r[s], 1) for s in speedups} for r in rows] for m, rows in tuned.items()},
               speedups, f"after {steps} finetuning steps", log)
    if seeds > 1 and n > 1:
        log("\nThe spread of each method - best after the finetune (paired by network and seed):")
        for m, rows in tuned.items():
            best = bests[suffix(m)]
            for s in speedups:
                if m != best[s]:
                    log(f"  {m} - {best[s]} at {s:g}x: {noise_split(rows, tuned[best[s]], s)}")


RECONSTRUCTED = " + LS"  # a method's row with the least-squares reconstruction after the cut


def plot_summary(path: str, curves, val_curves, tuned, criteria, learned, speedup: float, unpruned: float,
                 title: str) -> None:
    """The figure of a run: test accuracy (%) of the learned criteria, ``curve`` and the best
    hand-crafted criterion (chosen per point by validation accuracy), each without (solid) and with
    (dashed) the re-fit; left right after pruning against the speed-up, right at ``speedup`` against
    the finetuning steps. Bars: 95% intervals over the held-out networks."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    budgets = sorted(tuned)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def test_at(row: str, s: float, steps: int, which: int = 1) -> list[float]:
        """Per network: accuracy of ``row`` at speed-up ``s`` after ``steps`` (0: right after pruning)."""
        if steps == 0:
            source = curves if which == 1 else val_curves
            return [100 * r[s] for r in source[row]]
        return [100 * seed_mean(r[s], which) for r in tuned[steps][row]]

    def best(tag: str, s: float, steps: int) -> str:
        return best_by((c + tag for c in criteria), lambda c: test_at(c, s, steps, which=0))

    # one learned criterion is what the defaults call meta; several keep their variant names
    lines = [("meta (learned criterion)" if len(learned) == 1 else n, lambda tag, s, steps, n=n: n + tag)
             for n in learned]
    lines += [(PER_NETWORK, lambda tag, s, steps: PER_NETWORK + tag)] if PER_NETWORK in curves else []
    lines += [("best hand-crafted", best)]
    for i, (label, row_of) in enumerate(lines):
        for tag in dict.fromkeys(suffix(r) for r in curves):
            style = dict(color=colors[i % len(colors)], ls="--" if tag else "-", marker="o", capsize=3,
                         label=label + tag)
            cis = [mean_ci(test_at(row_of(tag, s, 0), s, 0)) for s in CURVE_SPEEDUPS]
            left.errorbar(CURVE_SPEEDUPS, [c.mean for c in cis], yerr=[(c.high - c.low) / 2 for c in cis], **style)
            steps = [0, *budgets]
            cis = [mean_ci(test_at(row_of(tag, speedup, k), speedup, k)) for k in steps
                   if k == 0 or row_of(tag, speedup, k) in tuned[k]]
            right.errorbar(steps[:len(cis)], [c.mean for c in cis], yerr=[(c.high - c.low) / 2 for c in cis], **style)
    for ax, xlabel, what in ((left, "speed-up (MACs)", "right after pruning (BatchNorm recalibrated)"),
                             (right, "finetuning steps", f"at {speedup:g}x, after finetuning")):
        ax.axhline(unpruned, color="gray", ls=":", label=f"unpruned (mean {unpruned:.1f}%)")
        ax.set_xlabel(xlabel)
        if ax is right:
            ax.set_xticks([0, *budgets])
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(what, fontsize=10)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ls_variant(text: str) -> ReconstructSettings:
    """``key=value,...`` over ``ReconstructSettings``' fields (``--ls-variants``)."""
    try:
        return ReconstructSettings.parse(text)
    except ValueError as err:
        raise SystemExit(f"learned_criterion: --ls-variants {text!r}: {err}") from None


def suffix(method: str) -> str:
    return RECONSTRUCTED if method.endswith(RECONSTRUCTED) else ""


def gain_table(results: dict[str, list[dict]], speedups, when: str, log) -> None:
    """Reconstruction's gain per method: (method + LS) - method, paired by network, per speed-up."""
    pairs = [(m, m + RECONSTRUCTED) for m in results if m + RECONSTRUCTED in results]
    if not pairs:
        return
    head = " | ".join(f"{s:g}x" for s in speedups)
    log(f"\nWhat the reconstruction adds {when}: (method + LS) - method, points, paired by network, 95% intervals:\n")
    log(f"| method | {head} |")
    log("|---|" + "---|" * len(speedups))
    for plain, fitted in pairs:
        n = len(results[plain])
        log(f"| {plain} | " + " | ".join(str(mean_ci([100 * (results[fitted][i][s] - results[plain][i][s])
                                                        for i in range(n)])) for s in speedups) + " |")


def main(argv=None) -> None:
    p = parser(__doc__, zoo_help="the zoo: train members meta-train, val members select", heldout=True)
    p.add_argument("--test-from", nargs="*", help="zoos whose test members are evaluated (default: --zoo)")
    p.add_argument("--metanets", nargs="*", default=[], metavar="NAME=FILE",
                   help="also these metanetworks, as they are (learned criteria: meta_train.py --objective curve, or "
                   "the shipped one, metanet/pretrained/criterion-cifar10.pt)")
    p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS,
                   help=f"key=value,... over {VARIANT_DEFAULTS} (default: {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--train-family", help="meta-train on members of this family only (resnet, vgg, ...)")
    p.add_argument("--no-curve", action="store_true", help="skip the per-network curve reference")
    p.add_argument("--gates", action="store_true", help="also each variant the paper's way: its scores shrink the "
                   "channels they drop at each speed-up's amount (soft mask), then magnitude prunes")
    p.add_argument("--refine", type=int, nargs="+", default=[], metavar="STEPS",
                   help="also each variant's scores as the start of STEPS steps of the per-network curve "
                   "optimisation, beside the same optimisation from magnitude's ranking ('curve, STEPS steps'): "
                   "what the metanetwork adds as a starting point")
    p.add_argument("--finetune", type=int, nargs="*", default=[], metavar="STEPS",
                   help="also prune each network to --finetune-speedups with every criterion (not the gates "
                   "framing), finetune STEPS steps (the recipe's after-pruning finetune; several budgets: a table "
                   "each), and table the test accuracy; 'best' is the hand-crafted criterion with the highest mean "
                   "validation accuracy")
    p.add_argument("--criteria", nargs="+", default=list(BASELINES),
                   help=f"the hand-crafted criteria compared (metanet.criteria names; default: {' '.join(BASELINES)}; "
                   "magnitude is always one)")
    p.add_argument("--reconstruct", action="store_true",
                   help=f"also every method (not the gates framing) with the least-squares reconstruction after the "
                   f"cut (metanet.reconstruct, its defaults), as 'METHOD{RECONSTRUCTED}' rows: right after pruning "
                   "and after each finetune, with a table of what it adds per method")
    p.add_argument("--ls-variants", nargs="*", default=[], metavar="KEY=VALUE,...",
                   help="also magnitude with the reconstruction under other settings (metanet.reconstruct."
                   "ReconstructSettings fields: batches=1, recalibrate=1, block_targets=0, targets=local, ridge=0.01, "
                   "layers=all), right after pruning: how many calibration batches are enough, and what each choice "
                   "of the default is worth")
    p.add_argument("--finetune-speedups", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--finetune-seeds", type=int, default=1, metavar="N",
                   help="finetune each pruned network N times (data-order seeds 0..N-1, the same for every method), "
                   "table the per-network means, and split the differences' spread into seed and network parts")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--plot", metavar="PNG", help="also draw the learned criteria, curve and the best hand-crafted "
                   "criterion, with and without the re-fit, right after pruning and after each --finetune budget at "
                   "the first --finetune-speedups (default: no plot)")
    args = p.parse_args(argv)
    if args.finetune_seeds < 1:
        raise SystemExit(f"learned_criterion: --finetune-seeds {args.finetune_seeds}: must be at least 1")
    criteria = tuple(dict.fromkeys(["magnitude", *args.criteria]))
    for c in criteria:
        try:
            criterion(c)
        except ValueError as err:
            raise SystemExit(f"learned_criterion: --criteria {c}: {err}") from None
    t0 = time.perf_counter()

    def log(line: str) -> None:
        print(line, flush=True)

    setup = set_up(args)
    zoo, data = setup.zoo, setup.data
    test_from = None if args.test_from is None else [checked(p) for p in args.test_from]
    train, val, held = benchmark_networks(zoo, setup.heldout, test_from, args.train_family)
    given = dict(given_metanet(text) for text in args.metanets)
    try:  # a shipped metanetwork is judged on networks it never saw, whatever ids this build gave them
        refuse_seen(held, [text.partition("=")[2] for text in args.metanets])
    except SeenNetworkError as err:
        raise SystemExit(f"learned_criterion: {err}") from None
    if not held or (args.variants and (not train or not val)):
        raise SystemExit(f"learned_criterion: need held-out networks ({len(held)}) and, to meta-train --variants, "
                         f"train ({len(train)}) and val ({len(val)}) members")
    cfg = RecipeConfig()
    x = torch.zeros(data.input_shape)
    kinds = Counter(r.arch["family"] for r in held)
    log(f"{data.name}: meta-training on {len(train)} train members"
        f"{f' ({args.train_family} only)' if args.train_family else ''}, selecting on {len(val)} val members; "
        f"{len(held)} held-out networks ({dict(kinds)})")
    variants = {name_of(parse_variant(v)): parse_variant(v) for v in args.variants}
    nets, info = {}, {}
    for name, v in variants.items():
        log(f"  {name}:")
        nets[name], info[name] = train_variant(v, zoo, train, val, data, cfg, args.batch_size, log)
    nets.update(given)
    variants.update({name: None for name in given})  # rows like the variants', trained elsewhere
    gated = {f"{n} as gates": n for n in variants} if args.gates else {}
    # name -> (variant or None for magnitude's ranking, curve steps from it)
    refined = {f"curve, {k} steps": (None, k) for k in args.refine}
    refined.update({f"{n} + {k} curve steps": (n, k) for k in args.refine for n in variants})
    methods = [*criteria, *([] if args.no_curve else ["curve"]), *variants, *refined, *gated]
    # each method's criterion is evaluated under these recipes: the cut alone, and re-fitted
    repairs = {"": cfg, **({RECONSTRUCTED: dataclasses.replace(cfg, reconstruct=ReconstructSettings())}
                          if args.reconstruct else {})}
    sweep = {f"magnitude{RECONSTRUCTED} ({v})": dataclasses.replace(cfg, reconstruct=ls_variant(v))
             for v in args.ls_variants}
    rows_of = {m: [m + tag for tag in repairs] if m not in gated else [m] for m in methods}
    shown = [r for m in methods for r in rows_of[m]] + list(sweep)
    curves: dict[str, list[dict]] = {m: [] for m in shown}
    # the hand-crafted criteria's curves on the validation split: which is "best" is chosen there
    val_curves: dict[str, list[dict]] = {c + tag: [] for c in criteria for tag in repairs}
    # after a short finetune: (val, test) accuracy per budget, method, network and speed-up
    tuned: dict[int, dict[str, list[dict]]] = {
        steps: {r: [] for m in methods if m not in gated for r in rows_of[m]} for steps in args.finetune}
    seconds: dict[str, list[float]] = {m: [] for m in shown}
    for record in progress(held, desc="held-out networks", unit="network"):
        model = record.network().eval()
        for m in methods:
            start = time.perf_counter()
            if m in gated:  # the paper's framing: an edit per speed-up, then magnitude
                batches = list(calibration(data, cfg)())
                amounts = amounts_for(model, x, CURVE_SPEEDUPS)
                curve = {}
                for s in CURVE_SPEEDUPS:
                    edited = gated_by_scores(nets[gated[m]], model, x, amounts[s], 0.2, batches)
                    curve.update(pruning_curve(edited, data, cfg, [s], "test", criterion("magnitude")))
                seconds[m].append(time.perf_counter() - start)
                curves[m].append(curve)
                continue
            if m in criteria:
                crit = criterion(m)
            elif m == PER_NETWORK:
                amounts = list(amounts_for(model, x, [1.5, 4.0]).values())
                scores, masker = fit_scores(model, data, amounts, steps=40, batch_size=args.batch_size, seed=0)
                crit = masker.criterion(scores)
            elif m in refined:
                variant, k = refined[m]
                amounts = list(amounts_for(model, x, [1.5, 4.0]).values())
                if variant is None:  # the per-network optimisation from magnitude's ranking
                    scores, masker = fit_scores(model, data, amounts, steps=k, batch_size=args.batch_size, seed=0)
                    crit = masker.criterion(scores)
                else:
                    crit = refined_criterion(nets[variant], model, data, amounts, steps=k, batch_size=args.batch_size,
                                             seed=0, batches=list(calibration(data, cfg)()))
            else:
                crit = learned_criterion(nets[m], model, x, list(calibration(data, cfg)()))
            scoring = time.perf_counter() - start
            for tag, recipe in repairs.items():
                row = m + tag
                start = time.perf_counter()
                if m in criteria:
                    torch.manual_seed(0)
                    val_curves[row].append(pruning_curve(model, data, recipe, CURVE_SPEEDUPS, "val", crit))
                torch.manual_seed(0)
                curves[row].append(pruning_curve(model, data, recipe, CURVE_SPEEDUPS, "test", crit))
                seconds[row].append(scoring + (time.perf_counter() - start if tag else 0.0))
                for steps in args.finetune:
                    tuned[steps][row].append(finetuned(model, crit, data, recipe, steps, args.finetune_speedups,
                                                       args.finetune_seeds))
            if m == MAGNITUDE:
                for row, recipe in sweep.items():
                    torch.manual_seed(0)
                    curves[row].append(pruning_curve(model, data, recipe, CURVE_SPEEDUPS, "test", crit))
                    seconds[row].append(0.0)
    families = [r.arch["family"] for r in held]
    head = " | ".join(f"{s:g}x" for s in CURVE_SPEEDUPS)
    for subset in [None, *sorted(set(families))]:
        pick = [i for i, f in enumerate(families) if subset is None or f == subset]
        bests = {tag: {s: best_by([c + tag for c in criteria], lambda b: [val_curves[b][i][s] for i in pick])
                       for s in CURVE_SPEEDUPS} for tag in repairs}
        log(f"\nTest accuracy (%) right after pruning (BatchNorm recalibrated), {len(pick)} held-out networks"
            f"{f' ({subset})' if subset else ''}; differences paired by network, 95% intervals; best hand-crafted "
            f"by validation accuracy: {'; '.join(', '.join(f'{s:g}x {b}' for s, b in bb.items()) for bb in bests.values())}"
            + (f"; a row{RECONSTRUCTED} against magnitude{RECONSTRUCTED} and the best{RECONSTRUCTED}" if args.reconstruct
               else "") + ":\n")
        log(f"| method | {head} | - magnitude at {head} | gap closed at {head} | - best at {head} | scoring s |")
        log("|---|" + "---|" * (4 * len(CURVE_SPEEDUPS) + 1))
        for m in shown:
            tag = suffix(m) if m not in sweep else RECONSTRUCTED
            best, mag, reference = bests.get(tag, bests[""]), curves["magnitude" + tag], "curve" + tag
            rows = [curves[m][i] for i in pick]
            means = [statistics.mean(100 * r[s] for r in rows) for s in CURVE_SPEEDUPS]
            diffs = ["" if m == "magnitude" + tag else str(mean_ci([100 * (curves[m][i][s] - mag[i][s]) for i in pick]))
                     for s in CURVE_SPEEDUPS]
            gaps = []
            for s in CURVE_SPEEDUPS:
                if m in ("magnitude" + tag, reference) or reference not in curves:
                    gaps.append("")
                    continue
                gap = statistics.mean(100 * (curves[reference][i][s] - mag[i][s]) for i in pick)
                got = statistics.mean(100 * (curves[m][i][s] - mag[i][s]) for i in pick)
                gaps.append(f"{got / gap:.0%}" if gap > 0.5 else "n/a")
            vs_best = ["" if m == best[s] else str(mean_ci([100 * (curves[m][i][s] - curves[best[s]][i][s]) for i in pick]))
                       for s in CURVE_SPEEDUPS]
            log(f"| {m} | " + " | ".join(f"{v:.1f}" for v in means) + " | " + " | ".join(diffs) + " | "
                + " | ".join(gaps) + " | " + " | ".join(vs_best) + f" | {statistics.mean(seconds[m][i] for i in pick):.2f} |")
        if subset is None:
            gain_table({m: [curves[m][i] for i in pick] for m in shown}, CURVE_SPEEDUPS,
                       "right after pruning (BatchNorm recalibrated)", log)
    for steps in args.finetune:
        finetune_table(tuned[steps], steps, args.finetune_speedups, log, criteria)
    if args.plot:
        unpruned = 100 * statistics.mean(r.metrics["test_acc"] for r in held)
        plot_summary(args.plot, {m: curves[m] for m in shown if m not in sweep and m not in gated}, val_curves, tuned,
                     criteria, list(variants), args.finetune_speedups[0], unpruned,
                     f"{data.name}: {len(held)} held-out networks ({', '.join(f'{n} {f}' for f, n in kinds.items())})")
        log(f"\nplot: {args.plot}")
    log("\nmeta-training: " + "; ".join(f"{n}: epoch {i['epoch']} chosen, {i['epoch_seconds']:.1f} s per epoch"
                                        for n, i in info.items()))
    log(f"total {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
