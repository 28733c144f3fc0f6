"""How many channels each layer keeps: every registered allocation against uniform, on held-out
networks, right after pruning (the recipe's repair: BatchNorm recalibrated, the least-squares
re-fit with ``--reconstruct``) and after each finetuning budget, beside the unpruned network
finetuned for the same steps (the benchmark's networks are not trained to convergence: a long
finetune trains them further).

``--allocators NAME=FILE ...`` adds one row per allocation metanetwork (the ``learned`` allocation,
``metanet.allocation_fit``; ``meta_train.py --objective allocation`` trains them), labelled
``learned:NAME``. ``--rows uniform+fpgm learned:gnn+meta ...`` adds rows with another method inside
an allocation (``meta``: the learned criterion ranks channels, so the metanetworks decide both how
many and which); ``--best`` the rows "uniform + best" and "learned:gnn + best" (for an allocation
with hand-crafted ``--rows``), the hand-crafted criterion chosen per target and budget by validation
accuracy. ``--save`` keeps every network's accuracies and ``--pair-with`` pairs each row with the
same row of such a file (a run without ``--reconstruct`` against one with it: the re-fit's gain).

Every allocation prunes with the same criterion (``--method``, magnitude by default: after the
re-fit the criteria cannot be told apart, docs/benchmarks.md) through the recipe itself
(``metanet.recipe.prune_to_targets`` with ``RecipeConfig.allocation``); differences are paired by
network against ``uniform``, 95% intervals; a row says when the interval holds 0. EagleEye's budget
(``--candidates``) and every allocation's seconds per network are printed beside the accuracies.

    python bench/allocation.py --zoo runs/zoo-digits --heldout runs/zoo-digits-heldout --targets 2 3 --finetune 0 20
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import parser, set_up  # noqa: E402
from distributed.progress import progress  # noqa: E402
from metanet.allocation import ALLOCATIONS, Learned, Uniform, out_channels  # noqa: E402
from metanet.files import atomic_write_text  # noqa: E402
from metanet.latency import LatencySettings, compare  # noqa: E402
from metanet.metanetwork import load_metanetwork  # noqa: E402
from metanet.paired import mean_ci  # noqa: E402
from metanet.plotting import pyplot  # noqa: E402
from metanet.prune import prunable_groups  # noqa: E402
from metanet.levels import Level  # noqa: E402
from metanet.methods import example_input, names, uses_metanet  # noqa: E402
from metanet.recipe import prune_to_targets, recipe_from_settings  # noqa: E402
from metanet.sources import ALLOCATION, CRITERION, resolve  # noqa: E402
from metanet.train import evaluate, train  # noqa: E402
from zoo.store import SeenNetworkError, benchmark_networks, refuse_seen  # noqa: E402

UNPRUNED = "unpruned, finetuned as long"


def run_network(record, data, allocations, method: str, targets, budgets, finetune: dict, args,
                allocators: dict | None = None, extra: dict | None = None, metanet=None) -> dict:
    """{"acc" and "val": {(row, target, steps): test / validation accuracy}, "seconds": ..., "widths":
    ...} for one network; ``allocators``: {row label: (allocation name, its metanetwork)} rows beside
    the registered ones; ``extra``: {row label: (allocation name, allocator or None, method)} rows with
    another method than ``method`` (``metanet``: the learned criterion, for ``meta``)."""
    model = record.network().eval()
    x = example_input(model, data)
    sizes = prunable_groups(model, x)
    longest = max(budgets)
    out: dict = {"acc": {}, "val": {}, "seconds": {}, "widths": {}, "speed": {}}
    timing = LatencySettings(batch=args.latency_batch, threads=1) if args.latency else None
    rows_of = {name: (name, None, method) for name in allocations}
    rows_of.update({label: (chosen, net, method) for label, (chosen, net) in (allocators or {}).items()})
    rows_of.update(extra or {})
    for name, (chosen, allocator, row_method) in rows_of.items():
        settings = {"before_steps": 0, "before_lr": 0.01, "after_steps": longest, "after_lr": 0.01,
                    "reconstruct": args.reconstruct, "allocation": chosen, "allocation_candidates": args.candidates}
        cfg = recipe_from_settings(settings, **finetune, seed=0)
        start = time.perf_counter()
        rows = prune_to_targets(model, data, row_method, cfg, targets, metanet if uses_metanet([row_method]) else None,
                                extra_after=[b for b in budgets if 0 < b < longest], allocator=allocator)
        out["seconds"][name] = time.perf_counter() - start
        for target, (pruned, row) in zip(targets, rows):
            for steps in budgets:
                key = "acc_pruned" if steps == 0 else "acc" if steps == longest else f"acc_ft{steps}"
                out["acc"][name, float(target), steps] = row[f"test_{key}"]
                out["val"][name, float(target), steps] = row[f"val_{key}"]
            modules = dict(pruned.named_modules())
            out["widths"][name, float(target)] = {r: out_channels(modules[r]) for r in sizes}
            if timing is not None:  # the shapes decide the time, not the weights: the finetuned network will do
                timed = compare(model, pruned, tuple(x.shape), timing)
                out["speed"][name, float(target)] = {1: timed["latency_speedup"],
                                                     timing.batch: timed["latency_speedup_batch"]}
    out["sizes"] = sizes
    for steps in budgets:  # the reference: the unpruned network finetuned for the same steps
        if steps == 0:
            out["acc"][UNPRUNED, 0.0, 0] = evaluate(model, data, "test")[0]
            continue
        other = copy.deepcopy(model)
        train(other, data, replace(cfg.after, steps=steps))
        out["acc"][UNPRUNED, 0.0, steps] = evaluate(other, data, "test")[0]
    return out


def best_rows(results: list[dict], groups: dict, targets, budgets) -> dict:
    """Adds a row ``ALLOCATION + best`` per group ({its label: candidate rows, the same allocation under
    each hand-crafted criterion}) to every result: at each (target, steps) the candidate with the
    highest mean validation accuracy over the networks (the same choice for every network); returns
    the choices, {(label, target, steps): row}."""
    chosen = {}
    for label, candidates in groups.items():
        for t in map(float, targets):
            for s in budgets:
                pick = chosen[label, t, s] = max(
                    candidates, key=lambda c: statistics.mean(r["val"][c, t, s] for r in results))
                for r in results:
                    r["acc"][label, t, s] = r["acc"][pick, t, s]
                    r["val"][label, t, s] = r["val"][pick, t, s]
        for r in results:
            r["seconds"][label] = sum(r["seconds"][c] for c in candidates)  # it ran every candidate
    return chosen


def across_runs(results: list[dict], ids: list[str], rows, targets, budgets, other: dict, log) -> None:
    """Each row's paired difference to the same row of another run (``--save``'s file), network by
    network: what one setting of the run changes (the re-fit: a run with ``--reconstruct`` against one
    without)."""
    cols = [(float(t), s) for t in targets for s in budgets]
    log("\nThis run minus the paired run, network by network (points, 95% interval):\n")
    log("| row | " + " | ".join(f"{t:g}x, {s} steps" for t, s in cols) + " |")
    log("|---|" + "---|" * len(cols))
    for name in rows:
        cells = []
        for t, s in cols:
            key = f"{name}|{t:g}x|{s}"
            if not all(key in other[i] for i in ids):
                cells.append("not in the paired run")
                continue
            d = mean_ci([100 * (r["acc"][name, t, s] - other[i][key]) for r, i in zip(results, ids)])
            cells.append(f"{d}{'' if d.low > 0 or d.high < 0 else ' (cannot tell)'}")
        if any(c != "not in the paired run" for c in cells):
            log(f"| {name} | " + " | ".join(cells) + " |")


def table(results: list[dict], allocations, targets, budgets, log, pairs=()) -> None:
    cols = [(float(t), s) for t in targets for s in budgets]
    head = " | ".join(f"{t:g}x, {s} steps" for t, s in cols)
    log(f"\nTest accuracy (%), mean over {len(results)} held-out networks; below each allocation its paired "
        "difference to uniform (points, 95% interval; 'cannot tell' where it holds 0):\n")
    log(f"| allocation | {head} | seconds per network |")
    log("|---|" + "---|" * (len(cols) + 1))
    for name in allocations:
        means = [statistics.mean(100 * r["acc"][name, t, s] for r in results) for t, s in cols]
        seconds = statistics.mean(r["seconds"][name] for r in results)
        log(f"| {name} | " + " | ".join(f"{m:.1f}" for m in means) + f" | {seconds:.1f} |")
        if name == "uniform":
            continue
        diffs = [mean_ci([100 * (r["acc"][name, t, s] - r["acc"]["uniform", t, s]) for r in results]) for t, s in cols]
        log(f"| {name} - uniform | " + " | ".join(f"{d}{'' if d.low > 0 or d.high < 0 else ' (cannot tell)'}"
                                                   for d in diffs) + " | |")
    for a, b in pairs:  # other paired differences asked for (the GNN against the per-group MLP)
        diffs = [mean_ci([100 * (r["acc"][a, t, s] - r["acc"][b, t, s]) for r in results]) for t, s in cols]
        log(f"| {a} - {b} | " + " | ".join(f"{d}{'' if d.low > 0 or d.high < 0 else ' (cannot tell)'}"
                                           for d in diffs) + " | |")
    reference = {s: statistics.mean(100 * r["acc"][UNPRUNED, 0.0, s] for r in results) for s in budgets}
    log(f"| {UNPRUNED} | " + " | ".join(f"{reference[s]:.1f}" for _, s in cols) + " | |")


def at_equal_speed(results: list[dict], a: str, b: str, targets, budgets, log) -> None:
    """Row ``a`` against row ``b`` at the speed-up ``b`` measured, network by network: ``a``'s accuracy
    linearly interpolated over its own targets at the measured speed-up of ``b`` at each target (a
    network where ``b``'s speed-up lies outside ``a``'s measured range is left out and counted)."""
    batches = sorted(next(iter(results[0]["speed"].values())))
    cols = [(float(t), s) for t in targets for s in budgets]
    log(f"\n{a} - {b} at the speed-up {b} measured (CPU, 1 thread; {a}'s accuracy interpolated between its "
        "targets by measured speed-up; points, 95% interval, networks compared):\n")
    log("| batch | " + " | ".join(f"{b} at {t:g}x, {s} steps" for t, s in cols) + " |")
    log("|---|" + "---|" * len(cols))
    for batch in batches:
        cells = []
        for t, steps in cols:
            diffs = []
            for r in results:
                points = sorted((r["speed"][a, float(u)][batch], r["acc"][a, float(u), steps]) for u in targets)
                speed = r["speed"][b, t][batch]
                if points[0][0] <= speed <= points[-1][0]:
                    diffs.append(100 * (float(np.interp(speed, *zip(*points))) - r["acc"][b, t, steps]))
            if len(diffs) < 2:
                cells.append(f"({len(diffs)} of {len(results)} in range)")
                continue
            d = mean_ci(diffs)
            cells.append(f"{d}{'' if d.low > 0 or d.high < 0 else ' (cannot tell)'}, {len(diffs)}/{len(results)}")
        log(f"| {batch} | " + " | ".join(cells) + " |")
    for batch in batches:
        log(f"measured speed-up at batch {batch}: " + "; ".join(
            f"{name} " + " / ".join(f"{statistics.mean(r['speed'][name, float(t)][batch] for r in results):.2f}"
                                    for t in targets) for name in (a, b)) + f" (at {' / '.join(f'{t:g}x' for t in targets)} MACs)")


def plot_widths(result: dict, target: float, allocations, path: str, title: str) -> None:
    """Each allocation's kept fraction per group of one network at ``target``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    roots = list(result["sizes"])
    for name in allocations:
        kept = result["widths"][name, target]
        ax.plot(range(len(roots)), [kept[r] / result["sizes"][r] for r in roots], marker="o", label=name)
    ax.set_xticks(range(len(roots)))
    ax.set_xticklabels(roots, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("fraction of channels kept")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = parser(__doc__, zoo_help="the zoo whose test members are pruned", heldout=True)
    p.add_argument("--allocations", nargs="+", default=[a for a, c in ALLOCATIONS.items() if not c.reads_allocator],
                   choices=[a for a, c in ALLOCATIONS.items() if not c.reads_allocator])
    p.add_argument("--allocators", nargs="+", default=[], metavar="NAME=FILE",
                   help="allocation metanetworks, each a row learned:NAME")
    p.add_argument("--method", default="none", choices=names(Level.CHANNELS, hand_crafted=True),
                   help="the hand-crafted criterion every allocation prunes with (none: magnitude)")
    p.add_argument("--rows", nargs="+", default=[], metavar="ALLOCATION+METHOD",
                   help="also rows with another method inside an allocation: uniform+fpgm, learned:gnn+meta (meta: "
                        "--metanet, by default the shipped learned criterion), each labelled 'ALLOCATION + METHOD'")
    p.add_argument("--metanet", help="the learned criterion of meta rows (default: the shipped one)")
    p.add_argument("--best", action="store_true",
                   help="also a row 'ALLOCATION + best' for uniform and for each allocation with hand-crafted "
                        "--rows: at each target and budget the row of that allocation (--method and the "
                        "hand-crafted --rows) with the highest mean validation accuracy")
    p.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0])
    p.add_argument("--finetune", type=int, nargs="+", default=[0, 80], help="finetuning budgets (steps; 0: none)")
    p.add_argument("--candidates", type=int, default=16, help="eagleeye: random allocations per network and target")
    p.add_argument("--reconstruct", action="store_true", help="the least-squares re-fit after the cut (the repair)")
    p.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="also print the paired difference of rows A and B (e.g. learned:gnn learned:mlp)")
    p.add_argument("--latency", action="store_true",
                   help="also time every pruned network against its unpruned self (CPU, 1 thread, batch 1 and "
                        "--latency-batch; nothing else should run)")
    p.add_argument("--latency-batch", type=int, default=64)
    p.add_argument("--equal-speed", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="with --latency: row A against row B at the speed-up B measured at each target, A's "
                        "accuracy interpolated over its targets by measured speed-up")
    p.add_argument("--networks", type=int, help="at most this many held-out networks (the first ones)")
    p.add_argument("--spread", action="store_true",
                   help="with --networks: evenly spaced over the held-out list instead of the first ones (both "
                        "families, and the held-out zoo's members, which sit at its end)")
    p.add_argument("--save", metavar="JSON", help="also write every network's accuracies (to pair rows across runs)")
    p.add_argument("--pair-with", metavar="JSON",
                   help="another run's --save file over the same networks: each row's paired difference to it")
    p.add_argument("--plot", metavar="PNG", help="each allocation's widths on the first network at the first target")
    args = p.parse_args(argv)
    if "uniform" not in args.allocations:
        args.allocations = ["uniform", *args.allocations]
    budgets = sorted(set(args.finetune))
    allocators, paths = {}, []  # paths: every metanetwork file the run evaluates
    for item in args.allocators:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"allocation: --allocators takes NAME=FILE, not {item!r}")
        net, _ = load_metanetwork(path)
        paths.append(path)
        if not net.head.allocates:
            raise SystemExit(f"allocation: {path}: edit {net.config.edit!r} is not an allocation metanetwork")
        allocators[f"{Learned.name}:{label}"] = (Learned.name, net)
    extra, home = {}, {}
    for item in args.rows:
        where, sep, how = item.rpartition("+")
        if not sep or (where not in ALLOCATIONS and where not in allocators) or how not in names(Level.CHANNELS):
            raise SystemExit(f"allocation: --rows {item!r}: not ALLOCATION+METHOD (allocations: {', '.join(ALLOCATIONS)} "
                             f"or an --allocators label; methods: {', '.join(names(Level.CHANNELS))})")
        chosen, net = allocators.get(where, (where, None))
        if net is None and ALLOCATIONS[chosen].reads_allocator:  # learned with no --allocators label: the shipped
            paths.append(resolve(None, ALLOCATION).path)
            net = load_metanetwork(paths[-1])[0]
        extra[f"{where} + {how}"] = (chosen, net, how)
        home[f"{where} + {how}"] = where
    metanet = None
    if uses_metanet([m for _, _, m in extra.values()]):
        paths.append(resolve(args.metanet, CRITERION).path)
        metanet = load_metanetwork(paths[-1])[0]
    hand = set(names(Level.CHANNELS, hand_crafted=True))
    best_of = {}  # 'ALLOCATION + best': its candidate rows (the allocation under each hand-crafted criterion)
    if args.best:
        for where in [*args.allocations, *allocators]:
            others = [label for label, (_, _, m) in extra.items() if home[label] == where and m in hand]
            if where == Uniform.name or others:
                best_of[f"{where} + best"] = [where, *others]
    rows = [*args.allocations, *allocators, *extra, *best_of]
    try:
        other_run = json.loads(Path(args.pair_with).read_text()) if args.pair_with else None
    except (OSError, ValueError) as e:
        raise SystemExit(f"allocation: --pair-with {args.pair_with}: not a file --save wrote ({e})") from None
    if args.equal_speed and not args.latency:
        raise SystemExit("allocation: --equal-speed compares at measured speed-ups: it needs --latency")
    unknown = [name for pair in [*args.compare, *args.equal_speed] for name in pair if name not in rows]
    if unknown:
        raise SystemExit(f"allocation: --compare/--equal-speed name rows {unknown} that this run has not; it has {rows}")
    setup = set_up(args)
    _, _, held = benchmark_networks(setup.zoo, setup.heldout)
    if args.networks and args.spread and args.networks < len(held):
        held = [held[round(i * (len(held) - 1) / (args.networks - 1))] for i in range(args.networks)] \
            if args.networks > 1 else held[:1]
    elif args.networks:
        held = held[: args.networks]
    if not held:
        raise SystemExit("allocation: no held-out networks (the zoo's test members and --heldout zoos)")
    try:  # a shipped metanetwork is judged on networks it never saw, whatever ids this build gave them
        refuse_seen(held, paths)
    except SeenNetworkError as err:
        raise SystemExit(f"allocation: {err}") from None
    missing = [r.id for r in held if other_run is not None and r.id not in other_run]
    if missing:  # checked before the run, not after it
        raise SystemExit(f"allocation: {args.pair_with} holds no network {missing[0]} ({len(missing)} of this "
                         f"run's {len(held)} missing): --pair-with needs a run over the same networks")
    t0 = time.perf_counter()
    results = [run_network(r, setup.data, args.allocations, args.method, args.targets, budgets,
                           setup.zoo.finetune_settings(), args, allocators, extra, metanet)
               for r in progress(held, desc="held-out networks", unit="network")]
    print(f"\n{len(held)} held-out networks, method {args.method}, {'with' if args.reconstruct else 'without'} the "
          f"re-fit, eagleeye {args.candidates} candidates; {time.perf_counter() - t0:.0f} s")
    if best_of:
        chosen = best_rows(results, best_of, args.targets, budgets)
        for label in best_of:
            print(f"{label}, by mean validation accuracy: "
                  + ", ".join(f"{t:g}x/{s} steps {c}" for (lab, t, s), c in chosen.items() if lab == label))
    table(results, rows, args.targets, budgets, print, [tuple(p) for p in args.compare])
    for a, b in args.equal_speed:
        at_equal_speed(results, a, b, args.targets, budgets, print)
    if other_run is not None:
        across_runs(results, [r.id for r in held], rows, args.targets, budgets, other_run, print)
    if args.save:
        per_network = {r.id: {**{f"{name}|{t:g}x|{s}": acc for (name, t, s), acc in result["acc"].items()},
                              **{f"speed, batch {n}|{name}|{t:g}x": v for (name, t), by in result["speed"].items()
                                 for n, v in by.items()}}
                       for r, result in zip(held, results)}
        atomic_write_text(args.save, json.dumps(per_network, indent=1, sort_keys=True))
        print(f"wrote {args.save}")
    if args.plot:
        plot_widths(results[0], float(args.targets[0]), [r for r in rows if (r, float(args.targets[0]))
                                                          in results[0]["widths"]], args.plot,
                    f"{held[0].id}: channels kept per group at {args.targets[0]:g}x")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
