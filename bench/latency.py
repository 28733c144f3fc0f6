"""MAC speed-up against measured speed-up: how much faster a pruned network runs, by allocation and
target, on this machine's CPU (or its GPU: ``--device``).

Each held-out network is pruned by magnitude (the criterion does not change the shapes; the
allocation does) under each ``--allocations`` entry to each ``--targets`` speed-up, no finetuning,
and timed against its unpruned self with ``metanet.latency.compare`` (the same timing as
``prune_batch --latency``: interleaved rounds, the median, threads fixed) at batch 1 and at
``--batch``. The table: the MAC speed-up reached and the measured speed-ups, means over the
networks with 95% intervals, and measured / MACs (1.0: the time fell as the MACs did).

    python bench/latency.py --zoo runs/zoo-cifar10-bench-40 --heldout runs/zoo-cifar10-bench-heldout --data-root data/cifar10-jpeg
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import parser, set_up  # noqa: E402
from distributed.progress import progress  # noqa: E402
import torch  # noqa: E402

from metanet.allocation import ALLOCATIONS, DEFAULT_ALLOCATION, Learned  # noqa: E402
from metanet.latency import LatencySettings, compare  # noqa: E402
from metanet.methods import MAGNITUDE  # noqa: E402
from metanet.paired import mean_ci  # noqa: E402
from metanet.recipe import RecipeConfig, prune_to_targets  # noqa: E402
from metanet.sources import ALLOCATION, resolve  # noqa: E402
from metanet.metanetwork import load_metanetwork  # noqa: E402
from metanet.train import TrainConfig  # noqa: E402
from zoo.store import benchmark_networks  # noqa: E402


# the default, a global ranking (Torch-Pruning's), the shipped learned allocation
DEFAULT_ROWS = (DEFAULT_ALLOCATION, "global", Learned.name)


def main(argv=None) -> None:
    p = parser(__doc__, zoo_help="the zoo whose test members are timed", heldout=True)
    p.add_argument("--allocations", nargs="+", default=list(DEFAULT_ROWS),
                   help="how many channels each group keeps (learned: the shipped allocation metanetwork)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--networks", type=int, help="the first N held-out networks (default: all)")
    args = p.parse_args(argv)
    unknown = [a for a in args.allocations if a not in ALLOCATIONS]
    if unknown:
        raise SystemExit(f"latency: --allocations {unknown}: known {', '.join(ALLOCATIONS)}")
    settings = LatencySettings(batch=args.batch, repeats=args.repeats, threads=args.threads)
    setup = set_up(args)
    held = benchmark_networks(setup.zoo, setup.heldout)[2][: args.networks]
    if not held:
        raise SystemExit("latency: no held-out networks (the zoo's test members and --heldout zoos)")
    allocator = load_metanetwork(resolve(None, ALLOCATION).path)[0] if any(
        ALLOCATIONS[a].reads_allocator for a in args.allocations) else None
    x_shape = setup.data.input_shape
    rows: dict[tuple[str, float], list[dict]] = {(a, t): [] for a in args.allocations for t in args.targets}
    t0 = time.perf_counter()
    for record in progress(held, desc="held-out networks", unit="network"):
        model = record.network().eval().to(args.device)
        for allocation in args.allocations:
            cfg = RecipeConfig(before=TrainConfig(steps=0), after=TrainConfig(steps=0), allocation=allocation)
            pruned = prune_to_targets(model, setup.data, MAGNITUDE, cfg, args.targets, report_test=False,
                                      allocator=allocator if ALLOCATIONS[allocation].reads_allocator else None)
            for t, (net, result) in zip(args.targets, pruned):
                rows[(allocation, t)].append(dict(compare(model, net, x_shape, settings, args.device),
                                                  macs=result["speedup"]))
    device = next(iter(rows.values()))[0]["latency_device"]
    print(f"\n{len(held)} held-out networks of {setup.data.name} {tuple(x_shape[1:])}, magnitude ranking, "
          f"no finetuning; {device}; median of {args.repeats} interleaved rounds; means with 95% intervals "
          f"over the networks; {time.perf_counter() - t0:.0f} s:\n")
    print(f"| allocation | target | MAC speed-up | measured, batch 1 | measured, batch {args.batch} | "
          f"batch 1 / MACs | batch {args.batch} / MACs |")
    print("|---|---|---|---|---|---|---|")
    for (allocation, t), found in rows.items():
        macs = statistics.mean(r["macs"] for r in found)
        one = mean_ci([r["latency_speedup"] for r in found])
        many = mean_ci([r["latency_speedup_batch"] for r in found])
        print(f"| {allocation} | {t:g}x | {macs:.2f}x | {one.mean:.2f}x [{one.low:.2f}, {one.high:.2f}] | "
              f"{many.mean:.2f}x [{many.low:.2f}, {many.high:.2f}] | "
              f"{statistics.mean(r['latency_speedup'] / r['macs'] for r in found):.2f} | "
              f"{statistics.mean(r['latency_speedup_batch'] / r['macs'] for r in found):.2f} |")


if __name__ == "__main__":
    main()
