"""Every torchvision classifier through the converter: exact / refused / crash / wrong.

For each classification model of ``torchvision.models`` (``weights=None``, 10 classes) under
``--max-params`` parameters: random BatchNorm statistics and biases, ``network_to_graph`` on one
input (224x224, 299x299 for Inception v3), then ``graph_to_network`` and a comparison of every
parameter and buffer and of the output. ``exact``: equal; ``refused``: an
``UnsupportedNetworkError`` (its one-line reason is printed); ``crash``: any other exception;
``wrong``: the round trip differs. Each model runs in its own process under ``--memory-gb``.

    python bench/torchvision_models.py [--models resnet18 mobilenet_v2] [--max-params 150e6]
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INPUT_SIZE = {"inception_v3": 299}


def randomize(model):
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            for p in m.parameters(recurse=False):
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return model.eval()


def check(name: str, max_params: float = float("inf")) -> tuple[str, str, int, float]:
    """(verdict, detail, parameters, seconds) for one torchvision model; ``skipped`` over ``max_params``."""
    import torch
    import torchvision

    from metanet import UnsupportedNetworkError, graph_to_network, network_to_graph

    kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    model = randomize(torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs))
    params = sum(p.numel() for p in model.parameters())
    if params > max_params:
        return "skipped", "", params, 0.0
    size = INPUT_SIZE.get(name, 224)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    try:
        graph = network_to_graph(model, x)
        rebuilt = graph_to_network(graph, model)
    except UnsupportedNetworkError as err:
        return "refused", str(err).splitlines()[0], params, time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - a crash is what this table reports
        return "crash", f"{type(err).__name__}: {err}".splitlines()[0][:200] + "\n" + traceback.format_exc(limit=-3), \
            params, time.perf_counter() - start
    seconds = time.perf_counter() - start
    a, b = model.state_dict(), rebuilt.state_dict()
    differing = [k for k in a if k not in b or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    if differing or list(a) != list(b):
        return "wrong", f"{len(differing)} tensors differ, first {differing[:1]}", params, seconds
    with torch.no_grad():
        same = torch.equal(model(x), rebuilt(x))
    return ("exact", f"{graph.num_nodes} nodes, {graph.num_edges} edges, types {','.join(graph.edge_types)}",
            params, seconds) if same else ("wrong", "outputs differ", params, seconds)


def _in_subprocess(name: str, memory_gb: float, max_params: float) -> tuple[str, str, int, float]:
    """``check(name)`` in a fresh process with its address space capped at ``memory_gb``: one
    model's memory cannot end the table, and running out is reported as a crash that says so."""
    import json
    import subprocess

    code = ("import json, resource, sys; sys.path.insert(0, %r); "
            "resource.setrlimit(resource.RLIMIT_AS, (%d, %d)); "
            "import torchvision_models as b; print(json.dumps(b.check(%r, %r)))"
            % (str(Path(__file__).parent), int(memory_gb * 2**30), int(memory_gb * 2**30), name, max_params))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode == 0:
        return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if "MemoryError" in proc.stderr:
        last = f"out of memory under the {memory_gb:g} GB limit ({last[:120]})"
    return "crash", last[:300], 0, 0.0


def main() -> None:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="model names (default: every torchvision classifier)")
    parser.add_argument("--max-params", type=float, default=150e6, help="skip models with more parameters")
    parser.add_argument("--memory-gb", type=float, default=16, help="address-space limit of each model's process")
    args = parser.parse_args()
    names = args.models or sorted(torchvision.models.list_models(module=torchvision.models))
    rows, skipped = [], []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}", file=sys.stderr, flush=True)
        verdict, detail, params, seconds = _in_subprocess(name, args.memory_gb, args.max_params)
        if verdict == "skipped":  # built once, in the model's own process, to count its parameters
            skipped.append((name, params))
            continue
        rows.append((name, verdict, detail, params, seconds))
    width = max(len(r[0]) for r in rows) + 2
    print(f"\n{'model':<{width}}{'result':<9}{'params M':>9}{'s':>7}  detail")
    for name, verdict, detail, params, seconds in rows:
        print(f"{name:<{width}}{verdict:<9}{params / 1e6:>9.1f}{seconds:>7.1f}  {detail.splitlines()[0]}")
    counts = Counter(r[1] for r in rows)
    print(f"\n{len(rows)} models under {args.max_params / 1e6:.0f}M parameters: "
          + ", ".join(f"{counts.get(v, 0)} {v}" for v in ("exact", "refused", "crash", "wrong"))
          + (f"; skipped {len(skipped)} larger: {', '.join(n for n, _ in skipped)}" if skipped else ""))
    for name, verdict, detail, *_ in rows:
        if verdict == "crash":
            print(f"\n{name}: {detail}")


if __name__ == "__main__":
    main()
