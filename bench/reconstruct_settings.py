"""Which reconstruction settings? The choices behind ``metanet.reconstruct``'s defaults, on the
validation split of digits networks (so nothing is chosen on test).

Two digits ResNet-20s (identity and projection shortcuts, widths 8/16/32, 3 epochs) pruned by
magnitude to 2x, 4x and 8x, then re-fitted under each setting; validation accuracy right after:
a residual block's last convolution fitted to its own output or to the block's output (block
targets), BatchNorm statistics kept or recomputed after the fit, sequential or local targets; and,
at weight level, magnitude and Wanda masks (80% zeros, 1:4) with the statistics kept or recomputed.

    python bench/reconstruct_settings.py

With ``--zoo``, the settings a CIFAR-10 run uses are chosen the same way: every validation member
of the zoo pruned by magnitude to 1.5x-4x and re-fitted under each setting of ``--settings``
(``ReconstructSettings`` fields as ``key=value,...``; "default" for the defaults), validation
accuracy right after, differences to the first setting paired by network with 95% intervals:

    python bench/reconstruct_settings.py --zoo runs/zoo-cifar10-bench-40 --data-root DIR/cifar10-jpeg \
        --settings default intercept=1 batches=30 positions=256 ridge=0.01 ridge=0.0001
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed.progress import progress  # noqa: E402
from metanet.diagnostics import CURVE_SPEEDUPS, pruning_curve  # noqa: E402
from metanet.paired import mean_ci  # noqa: E402
from metanet.prune import prune_to_speedup, recalibrate_bn  # noqa: E402
from metanet.recipe import RecipeConfig  # noqa: E402
from metanet.reconstruct import ReconstructSettings, reconstruct, reconstruct_masked  # noqa: E402
from metanet.train import TrainConfig, evaluate, train  # noqa: E402
from metanet.criteria import criterion
from metanet.levels import Level
from metanet.weight_pruning import WeightPruning, sparsify  # noqa: E402
from zoo.arch import build_model, resnet_spec  # noqa: E402
from zoo.data import load_digits  # noqa: E402
from zoo.integrity import checked  # noqa: E402

CHANNEL_SETTINGS = {
    "own targets, statistics recomputed": (ReconstructSettings(block_targets=False, recalibrate=True)),
    "own targets, statistics kept": ReconstructSettings(block_targets=False, recalibrate=False),
    "block targets, statistics recomputed": ReconstructSettings(recalibrate=True),
    "block targets, statistics kept (default)": ReconstructSettings(),
    "local targets, statistics kept": ReconstructSettings(targets="local", recalibrate=False),
}
WEIGHT_SETTINGS = {"statistics kept": ReconstructSettings(recalibrate=False),
                   "statistics recomputed (default)": ReconstructSettings()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--zoo", help="choose on this zoo's validation members instead of the digits ResNets")
    p.add_argument("--data-root", help="the dataset folder, if not where the zoo was built from")
    p.add_argument("--settings", nargs="+", default=["default"], metavar="KEY=VALUE,...",
                   help="with --zoo: the settings compared, the first the reference")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if not args.zoo and (args.data_root or args.settings != ["default"]):
        raise SystemExit("reconstruct_settings: --settings and --data-root need --zoo")
    if len(set(args.settings)) < len(args.settings):
        raise SystemExit(f"reconstruct_settings: --settings names a setting twice: {' '.join(args.settings)}")
    if args.zoo:
        zoo_settings(args.zoo, args.data_root, {s: parse_settings(s) for s in args.settings})
        print(f"\ntotal {(time.perf_counter() - t0) / 60:.1f} min")
        return
    data = load_digits()
    gen = torch.Generator().manual_seed(1)
    xs = [x for x, _ in data.batches("train", 128, shuffle=True, generator=gen, limit=10)]
    speedups = (2.0, 4.0, 8.0)
    print("Validation accuracy (%) right after pruning by magnitude and the re-fit, digits ResNet-20s:\n")
    print("| network | setting | " + " | ".join(f"{s:g}x" for s in speedups) + " |")
    print("|---|---|" + "---|" * len(speedups))
    nets = {}
    for shortcut in ("identity", "projection"):
        torch.manual_seed(0)
        model = build_model(resnet_spec(20, (8, 16, 32), in_channels=1, num_classes=10, shortcut=shortcut))
        train(model, data, TrainConfig(epochs=3, lr=0.05, batch_size=64, augment=False))
        nets[shortcut] = model.eval()
        pruned = {}
        for s in speedups:
            work = copy.deepcopy(model)
            pruned[s] = (work, prune_to_speedup(work, torch.zeros(data.input_shape), s).channels)
        cut = [100 * evaluate(recalibrate_bn(copy.deepcopy(pruned[s][0]), xs), data, "val")[0] for s in speedups]
        print(f"| {shortcut} ({100 * evaluate(model, data, 'val')[0]:.1f} unpruned) | the cut alone, statistics "
              "recomputed | " + " | ".join(f"{a:.1f}" for a in cut) + " |")
        for name, settings in CHANNEL_SETTINGS.items():
            accs = []
            for s in speedups:
                work = copy.deepcopy(pruned[s][0])
                reconstruct(work, model, pruned[s][1], xs, settings)
                if settings.recalibrates(channels=True):
                    recalibrate_bn(work, xs)
                accs.append(100 * evaluate(work, data, "val")[0])
            print(f"| {shortcut} | {name} | " + " | ".join(f"{a:.1f}" for a in accs) + " |")
    runs = {"80% zeros": WeightPruning(sparsity=0.8), "1:4": WeightPruning(nm=(1, 4))}
    print("\nWeight level, the identity ResNet: validation accuracy (%) right after masking and the re-fit:\n")
    print("| criterion | setting | " + " | ".join(runs) + " |")
    print("|---|---|" + "---|" * len(runs))
    model = nets["identity"]
    for crit in ("magnitude", "wanda"):
        rows = {"the masks alone, statistics recomputed": None, **WEIGHT_SETTINGS}
        for name, settings in rows.items():
            accs = []
            for pruning in runs.values():
                work = copy.deepcopy(model)
                report = sparsify(work, pruning, criterion(crit, Level.WEIGHTS), lambda: iter(list(data.batches(
                    "train", 128, shuffle=True, generator=torch.Generator().manual_seed(2), limit=10))))
                if settings is not None:
                    reconstruct_masked(work, model, report.layers, xs, settings)
                if settings is None or settings.recalibrates(channels=False):
                    recalibrate_bn(work, xs)
                accs.append(100 * evaluate(work, data, "val")[0])
            print(f"| {crit} | {name} | " + " | ".join(f"{a:.1f}" for a in accs) + " |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


def parse_settings(text: str) -> ReconstructSettings:
    """``key=value,...`` over ``ReconstructSettings``' fields ("default": none changed)."""
    try:
        return ReconstructSettings.parse(text)
    except ValueError as err:
        raise SystemExit(f"reconstruct_settings: --settings {text!r}: {err}") from None


def zoo_settings(path: str, data_root: str | None, settings: dict[str, ReconstructSettings]) -> None:
    """Validation accuracy right after magnitude pruning and the re-fit under each of ``settings``,
    over every validation member of the zoo at ``path``; differences to the first setting."""
    zoo = checked(path)
    data = zoo.dataset(data_root)
    members = [r for r in zoo if r.status == "ok" and r.role == "val"]
    if not members:
        raise SystemExit(f"reconstruct_settings: {path}: no validation members")
    acc: dict[str, list[dict]] = {name: [] for name in ["the cut alone", *settings]}
    for record in progress(members, desc="validation networks", unit="network"):
        model = record.network().eval()
        for name in acc:
            cfg = RecipeConfig(reconstruct=settings.get(name))
            torch.manual_seed(0)
            acc[name].append(pruning_curve(model, data, cfg, CURVE_SPEEDUPS, "val"))
    unpruned = statistics.mean(100 * r.metrics["val_acc"] for r in members) if all(
        r.metrics.get("val_acc") is not None for r in members) else float("nan")
    head = " | ".join(f"{s:g}x" for s in CURVE_SPEEDUPS)
    reference = next(iter(settings))
    print(f"\nValidation accuracy (%) right after magnitude pruning and the re-fit, {len(members)} validation "
          f"networks of {path} (unpruned {unpruned:.1f}); differences to '{reference}' paired by network, 95% "
          "intervals:\n")
    print(f"| setting | {head} | - {reference} at {head} |")
    print("|---|" + "---|" * (2 * len(CURVE_SPEEDUPS)))
    for name, rows in acc.items():
        means = [statistics.mean(100 * r[s] for r in rows) for s in CURVE_SPEEDUPS]
        diffs = ["" if name == reference else str(mean_ci([100 * (a[s] - b[s]) for a, b in zip(rows, acc[reference])]))
                 for s in CURVE_SPEEDUPS]
        print(f"| {name} | " + " | ".join(f"{m:.1f}" for m in means) + " | " + " | ".join(diffs) + " |")


if __name__ == "__main__":
    main()
