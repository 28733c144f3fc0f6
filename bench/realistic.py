"""A realistic-scale check, for a GPU: a CIFAR-10 ResNet-20 at 32x32 trained from scratch (the aim:
at least 90% test accuracy within 3 minutes), then pruned to 2x MACs by magnitude, FPGM, ``curve``
and the shipped learned criterion (``meta``), each read right after pruning (BatchNorm recalibrated)
and after a one-epoch finetune, through the recipe ``prune_batch`` runs (``metanet.api.prune``).

The benchmark networks elsewhere in docs/ are 16x16 and about 53%: whether the learned criterion
still leads on a network trained to convergence at full resolution is what this answers, once a
GPU runs it (``bench/gpu_check.sh``). ``--smoke`` runs the same code on the CPU at tiny sizes
(digits, a ResNet-8, one epoch): the test suite runs it, so the script is known to work before a
GPU is at hand; its numbers mean nothing.

    python bench/realistic.py --data-root data/cifar10-jpeg          # on a GPU
    python bench/realistic.py --smoke
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metanet import api  # noqa: E402
from metanet.methods import MAGNITUDE, method  # noqa: E402
from metanet.recipe_settings import RECIPE_DEFAULTS  # noqa: E402
from metanet.train import TrainConfig, evaluate, train  # noqa: E402
from zoo.arch import build_model, resnet_spec  # noqa: E402
from zoo.data import load_dataset  # noqa: E402

METHODS = [MAGNITUDE, "fpgm", api.CURVE, api.LEARNED]  # magnitude, the best hand-crafted one here, curve, meta
FINETUNE_BATCH = 128  # the recipe's finetuning batch (metanet.recipe_settings): one epoch in its steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", help="the cifar10-jpeg folder (ImageFolder layout: train/, test/)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=30, help="training epochs of the ResNet-20 (cosine schedule)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--speedup", type=float, default=2.0)
    p.add_argument("--before-steps", type=int, default=RECIPE_DEFAULTS["before_steps"],
                   help="the recipe's steps before pruning (curve: its fitting steps), every method alike")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: does the script run")
    args = p.parse_args(argv)
    for m in args.methods:
        method(m)  # a known method, or one line naming the known ones
    if args.smoke:
        data = load_dataset("digits")
        spec, args.epochs = resnet_spec(8, (8, 12, 16), in_channels=1), 1
    else:
        if not args.data_root:
            raise SystemExit("realistic: --data-root DIR (the cifar10-jpeg folder) is needed, or --smoke")
        data = load_dataset("imagefolder", args.data_root, size=32)
        spec = resnet_spec(20, (16, 32, 64))
    torch.manual_seed(0)
    model = build_model(spec).to(args.device)
    started = time.perf_counter()
    train(model, data, TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, schedule="cosine"),
          progress=lambda e, acc: print(f"  epoch {e + 1}/{args.epochs}: val {100 * acc:.1f}% "
                                        f"({time.perf_counter() - started:.0f} s)", flush=True))
    seconds = time.perf_counter() - started
    acc = evaluate(model, data, "test")[0]
    print(f"{data.name} {tuple(data.input_shape[1:])}: {'ResNet-8' if args.smoke else 'ResNet-20'} trained "
          f"{args.epochs} epochs in {seconds:.0f} s on {args.device}: test accuracy {100 * acc:.2f}%"
          + ("" if args.smoke else f" ({'reached' if acc >= 0.9 and seconds <= 180 else 'missed'} the aim: "
                                   "90% within 180 s)"))
    epoch_steps = math.ceil(len(data.train[1]) / FINETUNE_BATCH)
    rows = {}
    for m in args.methods:
        t = time.perf_counter()
        _, record = api.prune(model, data, args.speedup, m, before_steps=args.before_steps, finetune_steps=epoch_steps)
        rows[m] = (record["speedup"], record["test_acc_pruned"], record["test_acc"], time.perf_counter() - t)
    print(f"\npruned to {args.speedup:g}x MACs (every method: {args.before_steps} steps before pruning, BatchNorm "
          f"recalibrated; then {epoch_steps} finetuning steps, one epoch):\n")
    print("| method | MAC speed-up | test acc right after (%) | after 1 epoch (%) | seconds |")
    print("|---|---|---|---|---|")
    for m, (speedup, after, tuned, s) in rows.items():
        print(f"| {'magnitude' if m == MAGNITUDE else m} | {speedup:.2f}x | {100 * after:.2f} | {100 * tuned:.2f} | "
              f"{s:.0f} |")
    print(f"\nunpruned: {100 * acc:.2f}%")
    return {"test_acc": acc, "train_seconds": seconds, "rows": rows}


if __name__ == "__main__":
    main()
