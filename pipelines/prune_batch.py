"""Prune many models with a trained metanetwork, in parallel on Ray (and the baselines, if asked).

    python pipelines/prune_batch.py --zoo runs/zoo-digits --metanet runs/meta-train/metanet/metanetwork.pt \\
        --targets 2 4 --baselines                      # the zoo's held-out (role 'test') members
    python pipelines/prune_batch.py --models 'saved/*.pt' --dataset digits --metanet M.pt --targets 2
    python pipelines/prune_batch.py --models saved/ --dataset digits --metanet M.pt --floor 0.9   # adaptive
    python pipelines/prune_batch.py --zoo runs/zoo-digits --metanet M.pt --sparsity 0.8 0.9 --nm 2:4 --baselines

Weight-level runs (``--sparsity``, ``--nm``) zero weights instead of removing channels
(``metanet.weight_pruning``: ``none`` by magnitude, ``wanda``, ``random``, ``meta`` the paper's edit
then magnitude); the finetune keeps the zeros, the saved files hold them, each row records the
zeros measured and the file's compressed size, and ``accuracy_vs_sparsity.png`` plots them.

Per model and method, one Ray task: metanetwork forward pass (``meta``) or sparse learning
(``depgraph``) or nothing (``none``) -> finetune -> for each target: prune to it (or, with
``--floor``, while validation accuracy stays at or above the floor) -> recompute BatchNorm
statistics -> finetune -> evaluate. Every method gets the same finetuning budget, counted in
optimiser steps (``--before-steps``, ``--after-steps``). The finetuning before pruning is shared
by the targets. With several methods the summary adds paired differences (same model) with 95%
intervals; ``--diagnostics`` adds each prepared model's recalibrated pruning curve and the
selectivity of its edit (``metanet.diagnostics``) to the rows and a curve plot.

Outputs under ``--out``: every pruned model (``models/<model>__<method>__<target>.pt``, loadable with
``zoo.model_files.load_model``), ``results.parquet`` and ``results.csv`` (one row per model,
method and target), ``summary.md``, ``accuracy_vs_speedup.png``, and one MLflow run with all of it.
Every row records what produced it: a content hash of the model file (or zoo member file), of the
metanetwork file (``meta`` rows) and of the settings that change the result (``zoo.batch.RESULT_SETTINGS``).
Re-running reuses a row only when all three match, and says why it recomputes one otherwise. A
model that cannot be loaded, has an unsupported layer, NaN weights or fails while pruning gets a
``failed`` row with the reason (retried on the next run), the others go on, and the run exits 1.
One run at a time per ``--out`` (a second one refuses, exit 3). Models load through
``torch.load(weights_only=True)``; a pickled whole module only with ``--trust-pickle``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed.cli import run_cli  # noqa: E402
from distributed.fanout import fan_out  # noqa: E402
from distributed.locks import exclusive  # noqa: E402
from distributed.ray_env import check_fits, init_ray, preflight, ray, shutdown  # noqa: E402
from distributed.settings import SettingsError  # noqa: E402
from metanet.metanetwork import MetanetFileError  # noqa: E402
from metanet.recipe import (RECIPE_DEFAULTS, RECIPE_LIMITS, RECONSTRUCT_DEFAULTS, RECONSTRUCT_LIMITS,  # noqa: E402
                            prepare_reads_target)
from zoo import batch  # noqa: E402
from zoo.data import DatasetError  # noqa: E402
from zoo.store import ZooFormatError  # noqa: E402

DEFAULTS = {
    "zoo": None, "split": "test", "models": [], "arch": None, "trust_pickle": False, "dataset": None,
    "data_root": None, "metanet": None, "allocator": None, "methods": ["meta"], "baselines": False,
    "targets": list(batch.DEFAULT_TARGETS), "floor": None,
    **{k: RECIPE_DEFAULTS[k] for k in ("before_steps", "before_lr", "after_steps", "after_lr", "criterion",
                                       "allocation", "allocation_candidates")},
    **RECONSTRUCT_DEFAULTS,
    "batch_size": None,
    "augment": None, "sparse_reg": RECIPE_DEFAULTS["sparse_reg"], "seed": 0, "out": "runs/prune-batch", "cpus_per_task": 1.0, "gpu": None,
    "mlflow": True, "diagnostics": False, "learned_as": "criterion",
    "sparsity": [], "nm": None, "sparsity_scope": "global", "prune_ends": False, "damaged_members": "refuse",
    **batch.LATENCY_DEFAULTS,
}
HELP = {
    "sparsity": "instead of targets: fractions of zero weights to prune to (0 < s < 1; unstructured, conv and linear "
                "weights; methods none (magnitude), wanda, random, curve (per-network scores), meta)",
    "nm": "instead of targets: N:M sparsity, e.g. 2:4 (at most N nonzero in every M consecutive input weights)",
    "sparsity_scope": "with --sparsity: global (one ranking over all layers) or layer (each layer to the fraction)",
    "prune_ends": "with --sparsity/--nm: prune the first layer and the classifier too (kept dense by default)",
    "zoo": "zoo whose --split members to prune",
    "damaged_members": "zoo members whose files are not what the zoo's manifest records (zoo.integrity): refuse "
                       "(name them and stop), skip (their rows fail, saying why) or use (prune them as they are)",
    "split": "zoo split to prune: train, val, test (held out) or all",
    "models": "model files, folders or globs to prune (zoo.model_files formats)",
    "arch": "architecture of bare state dicts: a YAML spec file, or MODULE:NAME[,key=value...] from "
            "torchvision.models or timm (e.g. torchvision.models:mobilenet_v2,num_classes=10)",
    "trust_pickle": "allow pickled whole modules (runs code from the file)",
    "dataset": "dataset of --models files (digits, cifar10, cifar100, svhn, imagefolder)",
    "data_root": "dataset folder (overrides the zoo spec's)",
    "metanet": "the learned criterion for method meta: a metanetwork file (meta_train.py's metanetwork.pt) or an MLflow "
               "URI, models:/NAME/VERSION or runs:/RUN_ID/metanetwork (MLFLOW_TRACKING_URI's store) (default: the "
               "shipped one, metanet/pretrained)",
    "methods": "methods: meta, none (magnitude), depgraph, the Torch-Pruning criteria taylor, bn_scale, lamp, fpgm, "
               "hessian, random, curve (per-network optimised scores), gate, oracle",
    "criterion": "what ranks channels for meta, depgraph, gate and oracle: magnitude, taylor, bn_scale, lamp, fpgm, "
                 "hessian, random",
    "allocation": "how many channels each group keeps (the criterion picks which): uniform (the same fraction of "
                  "every group), global, isomorphic, lamp (global rankings), sensitivity (each group pruned alone, "
                  "validation accuracy), fitted (fitted per network on the curve objective), learned (an "
                  "allocation metanetwork, --allocator), eagleeye (the best of --allocation-candidates random "
                  "allocations by validation accuracy after BatchNorm recalibration)",
    "allocator": "for --allocation learned: an allocation metanetwork file (meta_train.py --objective allocation) or "
                 "MLflow URI (default: the shipped one, metanet/pretrained)",
    "allocation_candidates": "eagleeye: random allocations tried per network and target",
    "baselines": "add the baselines none and depgraph",
    "targets": "MAC speed-ups to prune to (finite, > 1)",
    "floor": "instead of targets: prune while validation accuracy stays at or above this",
    "before_steps": "finetuning steps after the edit, before pruning",
    "before_lr": "learning rate of the finetuning before pruning (constant)",
    "after_steps": "finetuning steps after pruning",
    "after_lr": "learning rate of the finetuning after pruning (cosine)",
    "batch_size": "finetuning batch size (default: the zoo's, else 128)",
    "augment": "augment while finetuning (default: the zoo's, else yes)",
    "sparse_reg": "group-sparsity strength of the depgraph baseline's sparse learning",
    "seed": "seed of finetuning batches",
    **batch.RECONSTRUCT_HELP,
    "out": "output directory: results, models, summary, plots, MLflow store",
    "cpus_per_task": "CPUs per Ray task (one task per model and method)",
    "gpu": "one GPU per task (default: when the cluster has GPUs)",
    **batch.LATENCY_HELP,
    "mlflow": "log the run to MLflow",
    "diagnostics": "add the prepared models' recalibrated pruning curves and edit selectivity",
    "learned_as": "a learned-criterion metanetwork (meta_train.py --objective curve) in meta: criterion (its scores "
                  "rank channels) or gates (the paper's framing: its scores shrink the channels they drop at the first "
                  "target, then finetune, then magnitude)",
}
FLAG_TYPES = {"floor": float, "gpu": bool, "batch_size": int, "augment": bool, "sparsity": float, "nm": str}
LIMITS = {**RECIPE_LIMITS, **RECONSTRUCT_LIMITS, **batch.LATENCY_LIMITS, "targets": {"gt": 1, "distinct": True}, "methods": {"distinct": True},
          "sparsity": {"gt": 0, "lt": 1, "distinct": True},
          "batch_size": {"ge": 1}, "floor": {"gt": 0, "le": 1}, "cpus_per_task": {"gt": 0}}


def prune_task(source: batch.Source, method: str, runs: list[dict], config: dict, data, metanet_path: str | None,
               out: str) -> list[dict]:
    """One Ray task: ``zoo.batch.prune_model``, each row marked with the node it ran on."""
    node = ray.get_runtime_context().get_node_id()
    return [dict(r, node=node) for r in batch.prune_model(source, method, runs, config, data, metanet_path, out)]


def _log_mlflow(config: dict, frame, out: str, wall: float) -> str:
    from distributed.tracking import log_run

    ok = frame[frame.status == "ok"]
    metrics = batch.mlflow_metrics(frame, wall)
    files = ("results.parquet", "results.csv", "summary.md", "accuracy_vs_speedup.png", "accuracy_vs_sparsity.png",
             "pruning_curve.png", "latency.png")
    return log_run("prune-batch", out, run_name=f"prune-batch-{ok.model.nunique()}-models", params=config,
                   metrics=metrics, artifacts=[os.path.join(out, f) for f in files])


# ---------------------------------------------------------------------------------- driver
def build_parser() -> argparse.ArgumentParser:
    from distributed.settings import add_flags

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, DEFAULTS, types=FLAG_TYPES, helps=HELP)
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    return p


def parse_args(argv=None) -> dict:
    from distributed.settings import resolve

    flags = vars(build_parser().parse_args(argv))
    config = resolve(flags, DEFAULTS, "prune_batch", "prune_batch", types=FLAG_TYPES, limits=LIMITS)
    try:
        batch.check_runs_and_methods(config, targets_given=flags.get("targets") is not None)
        batch.check_choices(config)
    except batch.BatchInputError as err:
        raise SystemExit(f"prune_batch: {err}") from None
    return config


def main(argv=None) -> dict:
    config = parse_args(argv)
    preflight(config["cpus_per_task"], _cpus_flag(config), config["address"], config["num_cpus"])
    if config["mlflow"]:
        from distributed.tracking import check_server

        check_server()
    started = time.perf_counter()
    # the inputs are checked before the output is touched: a refused run leaves nothing behind
    # resolved (file, MLflow URI or the shipped one), loaded, checked; digests in the rows' fingerprint
    metanet, metanet_sha, note = batch.settle_metanet(config)
    allocator_note = batch.settle_allocator(config)
    arch = batch.arch_file(config["arch"])
    sources = batch.find_sources(config)  # then a line if a shipped metanetwork learned from any of them
    for line in filter(None, (note, allocator_note, batch.seen_note(config, sources))):
        print(f"prune_batch: {line}")
    # the rows of a method whose preparation reads the target are keyed on it too
    per_method = batch.method_settings(config, config["methods"], lambda m: prepare_reads_target(m, metanet, config["learned_as"]))
    if config["before_steps"] == 0 and config["after_steps"] == 0:  # post-training: say what reads labels
        print(f"prune_batch: {batch.post_training_note(config, metanet)}")
    config = batch.finetune_defaults(config)
    out = os.path.abspath(config["out"])
    with exclusive(out, "prune_batch"):  # also the check that --out is writable
        previous = batch.read_results(out).to_dict("records")  # an unreadable one is refused before --out changes
        os.makedirs(os.path.join(out, "models"), exist_ok=True)
        batch.stage_metanetworks(config, out)  # a downloaded or shipped one where every node reads it
        return _main(config, out, started, metanet_sha, arch, sources, per_method, previous)


def _main(config: dict, out: str, started: float, metanet_sha: str, arch: dict | None, sources: list,
          per_method: dict, previous: list[dict]) -> dict:
    config = dict(config, arch=arch)
    runs = batch.runs_of(config)
    todo = batch.plan(sources, config["methods"], runs, previous, metanet_sha,
                      batch.settings_digest(config), per_method)
    for note in todo.notes:
        print(f"  {note}")
    total = len(sources) * len(config["methods"]) * len(runs)
    print(f"prune_batch: {len(sources)} models x {len(config['methods'])} methods x {len(runs)} {'targets' if runs[0]['target'] or runs[0]['floor'] else 'sparsities'} = {total} "
          f"rows; {todo.reused} already done with the same model, metanetwork and settings -> {out}")
    # the rows this run recomputes stay until their replacements exist (a killed run loses nothing)
    rows, nodes = todo.rows + todo.stale, set()
    if todo.jobs:
        data = batch.load_data(config)
        resources = init_ray(config.pop("address"), config.pop("num_cpus"))
        check_fits(config["cpus_per_task"], 1 if config["gpu"] else 0, _cpus_flag(config))
        print(f"ray: {resources.get('CPU', 0):.0f} CPUs, {resources.get('GPU', 0):.0f} GPUs on "
              f"{len([n for n in ray.nodes() if n['Alive']])} node(s); data {data.name} (train {len(data.train[1])}, "
              f"val {len(data.val[1])}, test {len(data.test[1])})")
        rows, nodes = _run(todo, config, data, out, rows)
        shutdown()
    if config["latency"]:  # once no task runs: one pair of models at a time, on this machine's device
        shape = (data if todo.jobs else batch.load_data(config)).input_shape
        rows = batch.measure_rows(rows, todo.keys, sources, config, shape, batch.row_key, _device())
    frame = batch.write_results(out, rows)
    mine, table = batch.write_summary(out, frame, todo)
    written = ["results.parquet", "results.csv", "summary.md", *batch.write_plots(out, mine)]
    wall = time.perf_counter() - started
    failed = int((mine.status != "ok").sum())
    print(f"\n{table}\n\nwrote {', '.join(f'{out}/{w}' for w in written)} ({wall:.0f} s)"
          + (f"; tasks ran on {len(nodes)} node(s)" if nodes else ""))
    for warning in sorted(set(mine.warning.dropna())):
        print(f"prune_batch: warning: {warning}", file=sys.stderr)
    if failed:
        print(f"prune_batch: {failed} of {len(mine)} rows failed (reasons above); exit code 1", file=sys.stderr)
    if config["mlflow"] and (todo.jobs or config["latency"]):  # new rows, or new timings of old ones
        uri = _log_mlflow({k: v for k, v in config.items() if k not in ("address", "num_cpus")}, mine, out, wall)
        print(f"mlflow: run logged to {uri} (experiment prune-batch)")
    elif config["mlflow"]:
        print("mlflow: every row reused, no new run")
    return {"results": frame, "seconds": wall, "failed": failed}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpus_flag(config: dict) -> str:
    return f"prune_batch: --cpus-per-task {config['cpus_per_task']:g}"


def _run(work: batch.Plan, config: dict, data, out: str, rows: list[dict]) -> tuple[list[dict], set]:
    """One Ray task per model and method; after each, its models move into place (``batch.publish``)
    and the results file and the summary are rewritten, so a killed driver loses only what was
    running. Returns every row and the nodes this run's tasks ran on."""
    jobs = work.jobs
    data_ref = ray.put(data)
    use_gpu = config["gpu"] if config["gpu"] is not None else ray.cluster_resources().get("GPU", 0) > 0
    state = {"rows": rows, "failed": 0, "nodes": set(), "pending": {batch.row_key(r) for r in work.stale}}
    fingerprints = ("model_sha", "metanet_sha", "settings_sha", "settings", *batch.RUN_KEYS)

    def record(job, new: list[dict]) -> dict:
        source, method, todo = job
        new = [dict(n, **{k: r[k] for k in fingerprints}) for n, r in zip(new, todo)]
        state["failed"] += sum(r["status"] != "ok" for r in new)
        state["nodes"] |= {r["node"] for r in new if r.get("node")}
        new = [batch.publish(n, out) for n in new]
        replaced = {batch.row_key(n) for n in new}
        state["rows"] = [r for r in state["rows"] if batch.row_key(r) not in replaced] + new
        state["pending"] -= replaced
        batch.write_summary(out, batch.write_results(out, state["rows"]), work, state["pending"])
        return {"rows_ok": sum(r["status"] == "ok" for r in state["rows"]), "failed": state["failed"]}

    def lost(job, error: str) -> dict:  # the task itself died (every retry): its rows say so
        source, method, todo = job
        return record(job, [{"model": source.name, "source": source.ref, "method": method, "status": "failed",
                             "error": error} for _ in todo])

    jobs_args = [((s, m, [{k: r[k] for k in batch.RUN_KEYS} for r in todo], config, data_ref,
                   config["metanet"], out), (s, m, todo)) for s, m, todo in jobs]
    fan_out(prune_task, jobs_args, options={"num_cpus": config["cpus_per_task"], "num_gpus": 1 if use_gpu else 0,
                                            "max_retries": 1},
            desc="pruning", unit="task", on_result=record, on_death=lost)
    return state["rows"], state["nodes"]


# the errors a user's input can cause: one line and exit code 2 (distributed.cli)
KNOWN_ERRORS = (MetanetFileError, ZooFormatError, DatasetError, SettingsError, FileNotFoundError,
                batch.BatchInputError)


def cli(argv=None) -> None:
    run_cli(main, "prune_batch", KNOWN_ERRORS, argv)


if __name__ == "__main__":
    cli()
