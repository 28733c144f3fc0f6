"""Network <-> graph conversion and Arrow storage: sizes, times and throughput.

For each network: nodes, edges, network->graph and graph->network (median of --repeats runs, the
per-architecture layout already traced; the first, tracing call is shown as "cold"), and Arrow
write/read throughput of a file of --copies graphs. Side by side in the same run, the cost of the
plainest exact copy of the same weights (``state_dict`` clone; ``deepcopy`` + ``load_state_dict``),
so the ratios say how much the graph adds over copying the weights at all.

    python bench/graph.py [--repeats 7] [--copies 8]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metanet import graph_to_network, network_to_graph  # noqa: E402
from metanet.graph import clear_layout_cache  # noqa: E402
from zoo.arch import build_model, resnet_spec, vgg_spec  # noqa: E402
from zoo.store import ZooRecord, read_members, write_members  # noqa: E402

NETWORKS = {
    "ResNet-56 (CIFAR)": (lambda: build_model(resnet_spec(56)), (1, 3, 32, 32)),
    "ResNet-110 (CIFAR)": (lambda: build_model(resnet_spec(110)), (1, 3, 32, 32)),
    "VGG-19-BN (CIFAR)": (lambda: build_model(vgg_spec(19)), (1, 3, 32, 32)),
    "ResNet-50 (torchvision)": (lambda: torchvision.models.resnet50(), (1, 3, 224, 224)),
}


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--copies", type=int, default=8, help="graphs per Arrow file")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    rows = []
    for name, (make, shape) in NETWORKS.items():
        model = make().eval()
        x = torch.zeros(shape)
        clear_layout_cache()
        t = time.perf_counter()
        graph = network_to_graph(model, x)
        cold = (time.perf_counter() - t) * 1e3
        to_graph = median_ms(lambda: network_to_graph(model, x), args.repeats)
        to_net = median_ms(lambda: graph_to_network(graph, model), args.repeats)
        clone = median_ms(lambda: {k: v.clone() for k, v in model.state_dict().items()}, args.repeats)
        state = model.state_dict()
        reload = median_ms(lambda: copy.deepcopy(model).load_state_dict(state), args.repeats)

        records = [ZooRecord(f"{name}-{i}", {}, "none", i, graph) for i in range(args.copies)]
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/bench.arrow"
            write_ms = median_ms(lambda: write_members(path, records), max(3, args.repeats // 2))
            size_mb = Path(path).stat().st_size / 1e6
            read_ms = median_ms(lambda: read_members(path), max(3, args.repeats // 2))
        rows.append((name, graph.num_nodes, graph.num_edges, graph.edge_counts, cold, to_graph, clone,
                     to_net, reload, size_mb, write_ms, read_ms))

    print(f"\nnetwork->graph and graph->network (median of {args.repeats}; ms), ratios to a plain copy "
          "of the same weights measured in this run")
    head = (f"{'network':<25}{'nodes':>8}{'edges':>11}{'cold':>9}{'net->g':>9}{'clone':>8}{'ratio':>7}"
            f"{'g->net':>9}{'deepcopy':>10}{'ratio':>7}")
    print(head)
    print("-" * len(head))
    for name, n, e, _, cold, tg, cl, tn, rl, *_ in rows:
        print(f"{name:<25}{n:>8}{e:>11}{cold:>9.1f}{tg:>9.1f}{cl:>8.1f}{tg / cl:>7.2f}{tn:>9.1f}{rl:>10.1f}"
              f"{tn / rl:>7.2f}")
    print("\nedge types:")
    for name, _, _, counts, *_ in rows:
        print(f"  {name:<25}{counts}")
    print(f"\nArrow IPC files of {args.copies} graphs each")
    head = f"{'network':<25}{'file MB':>9}{'write MB/s':>12}{'graphs/s':>10}{'read MB/s':>11}{'graphs/s':>10}"
    print(head)
    print("-" * len(head))
    for name, *_, size, wms, rms in rows:
        print(f"{name:<25}{size:>9.1f}{size / wms * 1e3:>12.0f}{args.copies / wms * 1e3:>10.1f}"
              f"{size / rms * 1e3:>11.0f}{args.copies / rms * 1e3:>10.1f}")
    print("\nReference (issue #2, the paper's code on this machine, ResNet-56): network->graph about 75 ms, "
          "graph->network about 15 ms, 140,720 edges (a dense identity-shortcut block), fc.weight not restored "
          "exactly. Read is to NetworkGraph tensors (one copy out of the memory map).")


if __name__ == "__main__":
    main()
