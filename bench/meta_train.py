"""Meta-training throughput: seconds per epoch with 1 and 2 Ray Train workers on the same zoo, and
the message-passing backends side by side, one member per step and several (members per second,
time per step, peak memory).

    python bench/meta_train.py --zoo runs/zoo-digits [--epochs 3] [--steps 8] [--skip-workers]
    python bench/meta_train.py --zoo runs/zoo-digits --polls 2 0.25 --epochs 6   # only Ray Train's poll interval
    python bench/meta_train.py --zoo runs/zoo-digits --skip-workers --backends torch dgl --dense-min-edges 0 1024

The epoch time is the one ``pipelines/meta_train.py`` measures inside the training loop (start-up
excluded), from the last epoch of each run; the backend rows come from fresh processes that run
``--steps`` meta-training steps over the zoo's training members (``members_step``: 1 member per
step, or ``--batch`` members edited in one metanetwork pass over their graphs' union), reporting
the median time per member and the resident memory the steps added.

``--polls`` compares whole ``pipelines/meta_train.py`` runs (2 workers, a checkpoint every epoch)
at Ray Train controller poll intervals (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``; Ray's default is
2 s, ``distributed.ray_env.TRAIN_HEALTH_CHECK_S`` this project's): the training time Ray Train
reports and the command's wall time, start-up and checkpoint selection included.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
ENV.pop("RAY_ADDRESS", None)


def epoch_seconds(zoo: str, workers: int, epochs: int, out: str) -> float:
    cmd = [sys.executable, str(ROOT / "pipelines/meta_train.py"), "--zoo", zoo, "--out", out, "--workers", str(workers),
           "--epochs", str(epochs), "--keep", "1", "--no-mlflow", "--select-members", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=True)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("meta-training done"))
    return float(ast.literal_eval(line.split("final metrics ", 1)[1])["seconds"])


def poll_run(zoo: str, epochs: int, out: str, poll: float) -> tuple[float, float]:
    """(training seconds as meta_train reports them, the command's wall seconds)."""
    cmd = [sys.executable, str(ROOT / "pipelines/meta_train.py"), "--zoo", zoo, "--out", out, "--workers", "2",
           "--epochs", str(epochs), "--keep", str(epochs), "--no-mlflow", "--select-members", "1",
           "--selection", "auc"]
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True,
                          env={**ENV, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(poll)})
    line = next(l for l in proc.stdout.splitlines() if l.startswith("meta-training done"))
    return float(line.split("done in ", 1)[1].split(" s", 1)[0]), time.perf_counter() - began


def backend_worker(zoo_root: str, backend: str, steps: int, per_step: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from metanet.meta_training import MetaTrainConfig, make_member, members_step
    from zoo.arch import build_model
    from metanet.metanetwork import MetaNetConfig, MetaNetwork
    from zoo.integrity import checked

    torch.manual_seed(0)
    zoo = checked(zoo_root)
    data = zoo.dataset()
    cfg = MetaTrainConfig()
    members = [make_member(r.id, build_model(r.arch), r.graph, cfg) for r in zoo if r.status == "ok"]
    net = MetaNetwork(MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=32, layers=4, backend=backend))
    batches = list(data.batches("train", cfg.batch_size, limit=cfg.batches_per_step))
    groups = [[members[(i * per_step + j) % len(members)] for j in range(per_step)] for i in range(steps)]
    members_step(net, groups[0], batches)  # warm-up
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    times = []
    for group in groups:
        t = time.perf_counter()
        members_step(net, group, batches)
        times.append((time.perf_counter() - t) / per_step)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"backend": backend, "per_step": per_step, "member_s": statistics.median(times), "peak_mb": peak - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="runs/zoo-digits")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds over every backend row")
    parser.add_argument("--batch", type=int, default=4, help="members per step in the batched rows")
    parser.add_argument("--backends", nargs="+", default=["torch", "dgl", "pyg"], choices=["torch", "dgl", "pyg"])
    parser.add_argument("--dense-min-edges", nargs="+", type=int, default=[],
                        help="also torch rows with these thresholds of metanet.dense_passing (groups smaller than "
                             "N edges passed edge by edge; 0: every group dense)")
    parser.add_argument("--skip-workers", action="store_true", help="only the backend rows (no Ray Train runs)")
    parser.add_argument("--polls", nargs="+", type=float, help="only this: whole runs at these Ray Train poll "
                        "intervals in seconds (e.g. 2 0.25)")
    parser.add_argument("--backend-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    zoo = str(Path(args.zoo).resolve())
    if args.backend_worker:
        print(json.dumps(backend_worker(zoo, args.backend_worker[0], args.steps, int(args.backend_worker[1]))))
        return
    if not (Path(zoo) / "manifest.json").exists():
        raise SystemExit(f"no zoo at {zoo}: build one first (make zoo)")
    if args.polls:
        with tempfile.TemporaryDirectory() as tmp:
            runs = {p: poll_run(zoo, args.epochs, f"{tmp}/p{i}", p) for i, p in enumerate(args.polls)}
        first = runs[args.polls[0]]
        print(f"\nmeta-training on {zoo}, {args.epochs} epochs, 2 workers, a checkpoint every epoch")
        print(f"{'poll s':>7}{'training s':>12}{'run s':>8}{'training / first':>18}{'run / first':>13}")
        for p, (train_s, run_s) in runs.items():
            print(f"{p:>7g}{train_s:>12.0f}{run_s:>8.1f}{train_s / first[0]:>18.2f}{run_s / first[1]:>13.2f}")
        return
    per_epoch = {}
    if not args.skip_workers:
        with tempfile.TemporaryDirectory() as tmp:
            per_epoch = {w: epoch_seconds(zoo, w, args.epochs, f"{tmp}/w{w}") for w in (1, 2)}
    sys.path.insert(0, str(ROOT))
    from metanet.dense_passing import DENSE_MIN_EDGES_ENV

    variants = [(b, None) for b in args.backends] + [("torch", n) for n in args.dense_min_edges]
    runs: dict[tuple, list[dict]] = {}
    for _ in range(args.repeats):  # rounds over every row, so that a slow spell of the machine hits them all
        for backend, threshold in variants:
            env = {**ENV, DENSE_MIN_EDGES_ENV: str(threshold)} if threshold is not None else ENV
            for per_step in (1, args.batch):
                out = subprocess.run([sys.executable, __file__, "--zoo", zoo, "--steps", str(args.steps),
                                      "--backend-worker", backend, str(per_step)],
                                     capture_output=True, text=True, check=True, env=env).stdout
                row = json.loads(out.strip().splitlines()[-1])
                row["backend"] = backend if threshold is None else f"torch>={threshold}"
                runs.setdefault((row["backend"], per_step), []).append(row)
    rows = [{**r[0], "member_s": statistics.median(x["member_s"] for x in r),
             "spread": (max(x["member_s"] for x in r) - min(x["member_s"] for x in r)) / statistics.median(
                 x["member_s"] for x in r), "peak_mb": max(x["peak_mb"] for x in r)} for r in runs.values()]
    print(f"\nmeta-training on {zoo}")
    if per_epoch:
        print(f"{'workers':>8}{'s / epoch':>11}{'speed-up':>10}")
        for w, s in per_epoch.items():
            print(f"{w:>8}{s:>11.1f}{per_epoch[1] / s:>10.2f}")
    first = rows[0]
    print(f"\nmedian over {args.repeats} interleaved round(s) of {args.steps} steps each (spread: (max - min) / "
          "median of the rounds)")
    print(f"{'backend':<12}{'members/step':>13}{'s / member':>12}{'members/s':>11}{'peak MB':>9}"
          f"{'time / first':>14}{'spread':>8}")
    for r in rows:
        print(f"{r['backend']:<12}{r['per_step']:>13}{r['member_s']:>12.3f}{1 / r['member_s']:>11.1f}"
              f"{r['peak_mb']:>9.0f}{r['member_s'] / first['member_s']:>14.2f}{r['spread']:>8.0%}")


if __name__ == "__main__":
    main()
