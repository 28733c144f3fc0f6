"""Metanetwork speed and memory on a CIFAR network's graph: backends and edits side by side.

For each backend and each pass, a fresh process builds the graph and the 8-layer, width-64
metanetwork (the paper's ResNet-56 setting), runs the pass ``--repeats`` times. Passes: the
metanetwork's forward, its forward+backward (loss: sum of squares of the outputs), and one full
meta-training step (``metanet.meta_training.member_step``: metanetwork, the network run with the
predicted weights on ``--step-batches`` batches of ``--batch-size`` random 32x32 images in eval
mode, the group-sparsity term, one backward pass; random images cost what CIFAR images cost). It
and reports the median time and the peak memory the pass added: on the CPU the resident memory
(``ru_maxrss`` after the runs minus the resident memory before them, with glibc's mmap threshold
fixed so that freed memory leaves the process: see ``WORKER_ENV``; that slows big allocations,
so the memory comes from a second process and the time from one with the usual allocator), on a GPU
``torch.cuda.max_memory_allocated`` minus the memory allocated before the runs (after one warm-up
pass, which is not timed).

    python bench/metanet.py [--repeats 3] [--layers 8] [--hidden 64] [--recompute] [--passes forward step]
    python bench/metanet.py --device cuda --backends torch pyg --arch resnet110 --edits additive gate
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


ARCHS = ("resnet56", "resnet110", "vgg19")
# glibc raises its mmap threshold after big frees and then keeps freed heap memory resident, so
# the resident-memory peak would count memory already freed (measured: 2.1 GB with per-layer
# recomputation, 0.6 GB with a fixed threshold); a fixed threshold returns big blocks at free
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def _arch(name: str) -> dict:
    from zoo.arch import resnet_spec, vgg_spec

    return vgg_spec(19) if name == "vgg19" else resnet_spec(int(name.removeprefix("resnet")))


PASSES = ("forward", "forward+backward", "step")


def worker(backend: str, mode: str, repeats: int, layers: int, hidden: int, device: str = "cpu",
           arch: str = "resnet56", edit: str = "additive", recompute: bool = False, batch_size: int = 64,
           step_batches: int = 4) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from metanet import network_to_graph
    from metanet.meta_training import MetaTrainConfig, make_member, member_step
    from metanet.heads import HEADS
    from metanet.metanetwork import MetaNetConfig, MetaNetwork, edge_widths_of
    from zoo.arch import build_model

    torch.manual_seed(0)
    model = build_model(_arch(arch)).eval()
    graph = network_to_graph(model, torch.zeros(1, 3, 32, 32)).to(device)
    net = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([graph]), hidden=hidden, layers=layers,
                                    backend=backend, edit=edit, evidence=HEADS[edit].channel_decoder is not None,
                                    recompute=recompute)).to(device)
    cuda = device.startswith("cuda")
    if mode == "step":
        member = make_member(arch, model, graph, MetaTrainConfig())
        member.model.to(device)
        gen = torch.Generator().manual_seed(0)
        batches = [(torch.randn(batch_size, 3, 32, 32, generator=gen).to(device),
                    torch.randint(0, 10, (batch_size,), generator=gen).to(device)) for _ in range(step_batches)]

    def run():
        if mode == "step":
            member_step(net, member, batches)
            net.zero_grad(set_to_none=True)
        elif mode == "forward":
            with torch.no_grad():
                net(graph)
        else:
            out = net(graph)
            loss = out.node_feat.square().sum() + sum(f.square().sum() for f in out.edge_feat.values())
            loss.backward()
            net.zero_grad(set_to_none=True)

    if cuda:
        run()  # warm-up: CUDA context, kernels, the allocator's pools
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"backend": backend + (" +recompute" if recompute else ""), "mode": mode, "edit": edit, "median_s": statistics.median(times),
            "peak_mb": peak - base, "nodes": graph.num_nodes, "edges": graph.num_edges}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (torch and pyg backends: DGL's wheel is CPU-only)")
    parser.add_argument("--backends", nargs="+", default=["torch", "dgl", "pyg"], choices=["torch", "dgl", "pyg"])
    parser.add_argument("--arch", default="resnet56", choices=ARCHS, help="the CIFAR network whose graph is edited")
    parser.add_argument("--edits", nargs="+", default=["additive"], choices=["additive", "gate", "gate+additive"],
                        help="the metanetwork's edit (gate edits decode per-channel gates with evidence features)")
    parser.add_argument("--recompute", nargs="?", const="both", default="off", choices=["off", "both", "only"],
                        help="per-layer recomputation in the backward pass: also (both, the default with the flag) "
                             "or only (for graphs whose plain backward would not fit in memory)")
    parser.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES,
                        help="forward, forward+backward of the metanetwork, or a full meta-training step")
    parser.add_argument("--batch-size", type=int, default=64, help="task batch size of the meta-training step")
    parser.add_argument("--step-batches", type=int, default=4, help="task batches per meta-training step")
    parser.add_argument("--worker", nargs=4, metavar=("BACKEND", "MODE", "EDIT", "RECOMPUTE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker[:2], args.repeats, args.layers, args.hidden, args.device, args.arch,
                                args.worker[2], args.worker[3] == "1", args.batch_size, args.step_batches)))
        return
    rows = []
    for mode in args.passes:
        for edit in args.edits:
            choices = {"off": (False,), "both": (False, True), "only": (True,)}[args.recompute]
            for backend, recompute in [(b, r) for b in args.backends for r in choices]:
                if recompute and mode == "forward":
                    if args.recompute == "only":  # the same forward: run it once
                        recompute = False
                    else:
                        continue  # recomputation changes only the backward pass
                cmd = [sys.executable, __file__, "--worker", backend, mode, edit, str(int(recompute)),
                       "--repeats", str(args.repeats),
                       "--layers", str(args.layers), "--hidden", str(args.hidden), "--device", args.device,
                       "--arch", args.arch, "--batch-size", str(args.batch_size),
                       "--step-batches", str(args.step_batches)]
                # time with the allocator as users have it; memory in a second process (WORKER_ENV)
                timed = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                sized = subprocess.run(cmd, check=True, capture_output=True, text=True, env=WORKER_ENV).stdout
                row = json.loads(timed.strip().splitlines()[-1])
                row["peak_mb"] = json.loads(sized.strip().splitlines()[-1])["peak_mb"]
                rows.append(row)
    r0 = rows[0]
    where = "allocated GPU memory" if args.device.startswith("cuda") else "resident memory"
    print(f"\nmetanetwork ({args.layers} layers, width {args.hidden}) on CIFAR {args.arch} ({args.device}): "
          f"{r0['nodes']} nodes, {r0['edges']} edges; median of {args.repeats}, peak = {where} added by the pass")
    head = f"{'pass':<18}{'edit':<15}{'backend':<19}{'time s':>9}{'peak MB':>10}{'time / first':>14}{'peak / first':>14}"
    print(head)
    print("-" * len(head))
    for mode in args.passes:
        mine = [x for x in rows if x["mode"] == mode]
        first = mine[0]
        for r in mine:
            print(f"{mode:<18}{r['edit']:<15}{r['backend']:<19}{r['median_s']:>9.3f}{r['peak_mb']:>10.0f}"
                  f"{r['median_s'] / first['median_s']:>14.2f}{r['peak_mb'] / max(first['peak_mb'], 1):>14.2f}")
    print("\nReference (issue #3, the paper's PyG code on this machine): 9.5 s forward, 21.5 s forward+backward, "
          "5.3 GB peak, with a dense identity-shortcut block (140,720 edges).")


if __name__ == "__main__":
    main()
