"""`make demo`: the whole pipeline on the embedded default (scikit-learn digits), end to end.

1. networks as graphs: three networks to graphs, into an Arrow zoo, back, bit-exact;
2. the zoo: ``pipelines/make_zoo.py`` trains the digits zoo as Ray tasks;
3. meta-training: a local Ray head on 127.0.0.1, ``ray job submit -- python pipelines/meta_train.py``,
   the head stopped again; the chosen metanetwork is registered in the MLflow Model Registry
   (``models:/metaprune-demo/VERSION``);
4. pruning: ``pipelines/prune_batch.py`` prunes the zoo's held-out members with the metanetwork
   (read back by that URI) and
   both baselines (same finetuning budget), prints the results table and writes the plot.

Everything is logged to one MLflow store (``runs/demo/mlflow.db``); the last lines say how to open
its UI on 127.0.0.1. Running it again resumes every stage instead of redoing it.

The terminal shows the project's own lines and progress bars; each stage's whole output (Ray's,
Ray Train's and DDP's logs included) goes to ``runs/demo/logs/<stage>.log``, named at each stage;
``--verbose`` shows everything on the terminal too.
"""

from __future__ import annotations

import json
import os
import re
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
from distributed.model_registry import latest_version  # noqa: E402
from pipelines.meta_train import completed  # noqa: E402
from zoo.batch import file_digest  # noqa: E402
from pipelines.meta_train import main as meta_train_main  # noqa: E402
from zoo.arch import arch_spec, build_model, resnet_spec, vgg_spec  # noqa: E402
from zoo.store import Zoo, ZooRecord  # noqa: E402

OUT = ROOT / "runs" / "demo"
HEAD_PORT, DASHBOARD_PORT = 6392, 8267  # not Ray's defaults: a user's own local Ray is left alone


def step(title: str) -> float:
    print(f"\n== {title} ==", flush=True)
    return time.perf_counter()


# lines that are Ray's, Ray Train's, DDP's or MLflow's logs, not the pipeline's own output
LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING|ERROR|SUCC|DEBUG)\b"  # Ray's logger
    r"|^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (INFO|WARNING)\b"                     # MLflow's logger
    r"|^\(\w+ pid=\d+"                                                       # a Ray worker's line
    r"|^\[?\w*\]?\s*\[[WE]\d{4} "                                              # a C++ warning (DDP)
    r"|^Running entrypoint for job |^\s*warnings\.warn\(|\w*Warning: ")


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Ray colours its worker prefixes


WORKER_PREFIX = re.compile(r"^\(\w+ pid=\d+[^)]*\)\s*")
REGISTERED = "metaprune-demo"  # the demo's metanetwork in the MLflow Model Registry
EPOCH_LINE = "meta-training epoch"  # what rank 0 of pipelines/meta_train.py prints after each epoch


def display(line: str) -> str | None:
    """What the terminal shows of one output line: the line without colours, the message of a
    meta-training worker's epoch line, or None for a framework's log line or a blank one."""
    line = ANSI.sub("", line).strip()
    message = WORKER_PREFIX.sub("", line)
    if message != line:
        return message if message.startswith(EPOCH_LINE) else None
    return line if line and not LOG_LINE.search(line) else None


def run(*args: str, log: Path, verbose: bool = False, env: dict | None = None) -> None:
    """Runs a pipeline command with its whole output in ``log``; the terminal gets what ``display``
    keeps and live progress bars (everything with ``verbose``). Stops the demo if the
    command fails, pointing at the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        sink.write(("$ " + " ".join(args) + "\n").encode())
        # on a terminal the children draw tqdm bars into the pipe and this loop keeps each on one
        # line; into a file (make demo > demo.log) they print a progress line now and then instead
        mode = "bar" if sys.stdout.isatty() else "lines"
        proc = subprocess.Popen(list(args), cwd=ROOT, env={**os.environ, "METAPRUNE_PROGRESS": mode, **(env or {})},
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        pending, last = b"", None
        while chunk := proc.stdout.read1(65536):
            sink.write(chunk)
            sink.flush()
            pending += chunk
            *lines, pending = re.split(rb"(?<=[\n\r])", pending)
            for raw in lines:
                line = raw.decode(errors="replace")
                text = line.rstrip() if verbose else display(line)
                if text is None or not text.strip() or (text == last and not verbose):
                    continue  # Ray prints a job's worker lines twice
                last = text
                if line.endswith("\r"):  # a progress bar redrawing itself: keep it on one line
                    sys.stdout.write("\r  " + text.strip()[:110].ljust(110))
                else:
                    sys.stdout.write(("\r" if mode == "bar" else "") + "  " + text + "\n")
            sys.stdout.flush()
        code = proc.wait()
    sys.stdout.write("\n" if not verbose and mode == "bar" else "")
    if code != 0:
        raise SystemExit(f"demo: `{' '.join(args[:3])} ...` failed with exit code {code}; its output: {log}")


def graphs(out: Path) -> None:
    zoo = Zoo.create(str(out / "graph-zoo"))
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


def meta_train_job(py: str, out: Path, logs: Path, meta_argv: list[str], env: dict, verbose: bool) -> None:
    """``ray job submit -- python pipelines/meta_train.py ...`` on a local head started and stopped here."""
    pidfile = str(out / "ray-head.pid")
    address = local_head.start(pidfile, None, HEAD_PORT, DASHBOARD_PORT)
    print(f"  local Ray head up; dashboard and job server on {address}; log: {logs / 'meta-train.log'}")
    code = snapshot(root=str(ROOT))  # not "." itself: output written into the repository would break the upload
    try:
        runtime_env = json.dumps({"env_vars": env})
        run(str(Path(py).with_name("ray")), "job", "submit", "--address", address, "--working-dir", code,
            "--runtime-env-json", runtime_env, "--", "python", "pipelines/meta_train.py", *meta_argv,
            env={"RAY_AUTH_MODE": "token"}, log=logs / "meta-train.log", verbose=verbose)
    finally:
        local_head.stop(pidfile)
        shutil.rmtree(code, ignore_errors=True)
        print("  local Ray head stopped")


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="also show Ray's, Ray Train's and DDP's logs (default: off; they are in <out>/logs)")
    parser.add_argument("--quick", action="store_true",
                        help="a small run for a first look (and the tests): 9 zoo members trained for 2 epochs, "
                             "2 meta-training epochs, one target (2x) (default: off: 32 members, targets 2x, 4x, 8x)")
    parser.add_argument("--out", default=str(OUT), help="where everything goes (default: %(default)s)")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    out = Path(args.out).resolve()
    logs = out / "logs"
    zoo_args = ["--members", "9", "--set", "train.epochs=2", "--set", "finetune.epochs=1"] if args.quick else []
    meta_args = ["--epochs", "2", "--keep", "2"] if args.quick else []
    targets = ["2"] if args.quick else ["2", "4", "8"]
    py = sys.executable
    out.mkdir(parents=True, exist_ok=True)
    mlflow_uri = f"sqlite:///{out / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": mlflow_uri, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)
    began = time.perf_counter()

    t = step("1. networks as graphs, stored in Apache Arrow")
    graphs(out)

    t = step(f"2. the zoo: {9 if args.quick else 32} digits networks, one Ray task each (pipelines/make_zoo.py)")
    zoo = out / "zoo"
    print(f"  log: {logs / 'zoo.log'}")
    run(py, "pipelines/make_zoo.py", "--out", str(zoo), *zoo_args, log=logs / "zoo.log", verbose=args.verbose)
    print(f"  ({time.perf_counter() - t:.0f} s)")

    t = step("3. meta-training as a Ray job on a local head (ray job submit -- python pipelines/meta_train.py)")
    meta_argv = ["--zoo", str(zoo), "--out", str(out / "meta-train"), "--register", REGISTERED, *meta_args]
    done = completed(meta_argv)
    if done:  # nothing the job would change: no head, no job
        print(f"  already done with this zoo and these settings: {done}")
        if latest_version(REGISTERED, file_digest(done)) is None:  # not registered yet: now, without Ray
            meta_train_main(meta_argv)
    else:
        meta_train_job(py, out, logs, meta_argv, env, args.verbose)
    # the version of this metanetwork (another demo, --quick or not, may have registered a newer one)
    model_uri = latest_version(REGISTERED, file_digest(str(out / "meta-train" / "metanet" / "metanetwork.pt")))
    print(f"  the metanetwork is registered in MLflow as {model_uri} (store {mlflow_uri})")
    print(f"  ({time.perf_counter() - t:.0f} s)")

    t = step("4. pruning the held-out networks: metanetwork vs both baselines (pipelines/prune_batch.py)")
    results = out / "prune-batch"
    print(f"  log: {logs / 'prune-batch.log'}")
    run(py, "pipelines/prune_batch.py", "--zoo", str(zoo), "--split", "test",
        "--metanet", model_uri, "--baselines",
        "--targets", *targets, "--out", str(results), log=logs / "prune-batch.log", verbose=args.verbose)
    print(f"  ({time.perf_counter() - t:.0f} s)")

    print(f"\n== done in {(time.perf_counter() - began) / 60:.1f} min ==")
    print(f"results table: {results / 'summary.md'} (and results.parquet / results.csv)")
    print(f"plot:          {results / 'accuracy_vs_speedup.png'}")
    print("the comparison that matters runs on CIFAR-10: bench/quality.py (see docs/benchmarks.md)")
    print("MLflow UI (zoo, meta-training and pruning runs), on 127.0.0.1 only:")
    print(f"  {Path(py).with_name('mlflow')} ui --backend-store-uri {mlflow_uri} --host 127.0.0.1 --port 5000")
    print("  then open http://127.0.0.1:5000")


if __name__ == "__main__":
    main()
