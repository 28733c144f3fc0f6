"""`make demo`: the whole pipeline on the embedded default (scikit-learn digits), end to end.

1. networks as graphs: three networks to graphs, into an Arrow zoo, back, bit-exact;
2. the zoo: ``pipelines/make_zoo.py`` trains the digits zoo as Ray tasks;
3. meta-training: a local Ray head on 127.0.0.1, ``ray job submit -- python pipelines/meta_train.py``,
   the head stopped again;
4. pruning: ``pipelines/prune_batch.py`` prunes the zoo's held-out members with the metanetwork and
   both baselines (same finetuning budget), prints the results table and writes the plot.

Everything is logged to one MLflow store (``runs/demo/mlflow.db``); the last lines say how to open
its UI on 127.0.0.1. Running it again resumes every stage instead of redoing it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distributed import local_head  # noqa: E402
from distributed.job_snapshot import snapshot  # noqa: E402
from metanet import graph_to_network, network_to_graph  # noqa: E402
from zoo.arch import arch_spec, build_model, resnet_spec, vgg_spec  # noqa: E402
from zoo.store import Zoo, ZooRecord  # noqa: E402

OUT = ROOT / "runs" / "demo"
HEAD_PORT, DASHBOARD_PORT = 6392, 8267  # not Ray's defaults: a user's own local Ray is left alone


def step(title: str) -> float:
    print(f"\n== {title} ==", flush=True)
    return time.perf_counter()


def run(*args: str, env: dict | None = None) -> None:
    """Runs a pipeline command, its output streaming through; stops the demo if it fails."""
    print("$ " + " ".join(args), flush=True)
    result = subprocess.run(list(args), cwd=ROOT, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise SystemExit(f"demo: `{' '.join(args[:3])} ...` failed with exit code {result.returncode}")


def graphs() -> None:
    zoo = Zoo.create(str(OUT / "graph-zoo"))
    x = torch.zeros(1, 1, 8, 8)  # digits: 8x8 grayscale
    specs = [resnet_spec(20, (8, 16, 32), in_channels=1), resnet_spec(32, (8, 12, 16), in_channels=1),
             vgg_spec(11, width_mult=0.125, input_size=8, in_channels=1)]
    records, models = [], []
    for i, spec in enumerate(specs):
        torch.manual_seed(i)
        model = build_model(spec).eval()
        t = time.perf_counter()
        graph = network_to_graph(model, x)
        print(f"  {spec['family']:<6} {graph.num_nodes:>5} nodes {graph.num_edges:>7} edges "
              f"{graph.edge_counts}  ({(time.perf_counter() - t) * 1e3:.0f} ms)")
        records.append(ZooRecord(f"demo-{i}", arch_spec(model), "digits", i, graph))
        models.append(model)
    path = zoo.write("demo", records)
    for model, rec in zip(models, zoo):
        rebuilt = graph_to_network(rec.graph, build_model(rec.arch))
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))
        if not same:
            raise SystemExit(f"demo: {rec.id}: the graph -> network round trip is not exact")
    print(f"  wrote them to {path}; read back and rebuilt: bit-exact")


def build_parser():
    import argparse

    return argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv=None) -> None:
    build_parser().parse_args(argv)  # no options; --help says what the demo does
    py = sys.executable
    OUT.mkdir(parents=True, exist_ok=True)
    mlflow_uri = f"sqlite:///{OUT / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": mlflow_uri, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)
    began = time.perf_counter()

    t = step("1. networks as graphs, stored in Apache Arrow")
    graphs()

    t = step("2. the zoo: 32 digits networks, one Ray task each (pipelines/make_zoo.py)")
    zoo = OUT / "zoo"
    run(py, "pipelines/make_zoo.py", "--out", str(zoo))
    print(f"  ({time.perf_counter() - t:.0f} s)")

    t = step("3. meta-training as a Ray job on a local head (ray job submit -- python pipelines/meta_train.py)")
    pidfile = str(OUT / "ray-head.pid")
    address = local_head.start(pidfile, None, HEAD_PORT, DASHBOARD_PORT)
    print(f"  local Ray head up; dashboard and job server on {address}")
    code = snapshot(root=str(ROOT))  # not "." itself: output written into the repository would break the upload
    try:
        runtime_env = json.dumps({"env_vars": env})
        run(str(Path(py).with_name("ray")), "job", "submit", "--address", address, "--working-dir", code,
            "--runtime-env-json", runtime_env, "--", "python", "pipelines/meta_train.py", "--zoo", str(zoo),
            "--out", str(OUT / "meta-train"), env={"RAY_AUTH_MODE": "token"})
    finally:
        local_head.stop(pidfile)
        shutil.rmtree(code, ignore_errors=True)
        print("  local Ray head stopped")
    print(f"  ({time.perf_counter() - t:.0f} s)")

    t = step("4. pruning the held-out networks: metanetwork vs both baselines (pipelines/prune_batch.py)")
    results = OUT / "prune-batch"
    run(py, "pipelines/prune_batch.py", "--zoo", str(zoo), "--split", "test",
        "--metanet", str(OUT / "meta-train" / "metanet" / "metanetwork.pt"), "--baselines",
        "--targets", "2", "4", "8", "--out", str(results))
    print(f"  ({time.perf_counter() - t:.0f} s)")

    print(f"\n== done in {(time.perf_counter() - began) / 60:.1f} min ==")
    print(f"results table: {results / 'summary.md'} (and results.parquet / results.csv)")
    print(f"plot:          {results / 'accuracy_vs_speedup.png'}")
    print("the comparison that matters runs on CIFAR-10: bench/quality.py (see README, \"The method, measured\")")
    print("MLflow UI (zoo, meta-training and pruning runs), on 127.0.0.1 only:")
    print(f"  {Path(py).with_name('mlflow')} ui --backend-store-uri {mlflow_uri} --host 127.0.0.1 --port 5000")
    print("  then open http://127.0.0.1:5000")


if __name__ == "__main__":
    main()
