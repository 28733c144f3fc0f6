"""Ray Tune search of the hyperparameters that decide pruning quality (`make tune`).

    python pipelines/tune.py                                   # digits: pipelines/searches/digits.yaml
    python pipelines/tune.py --search pipelines/searches/cifar10.yaml --set zoo=runs/zoo-cifar10
    python pipelines/meta_train.py --config runs/tune-digits/best_config.yaml     # use what it found
    python pipelines/prune_batch.py --config runs/tune-digits/best_config.yaml --zoo ... --metanet ...

A search file names the zoo, the search space (meta-training lr, alpha, reg, residual ratio r,
metanetwork width and depth, finetuning lr and optimiser steps before and after pruning, the pruning
criterion: a ``metanet.criteria`` name), the targets and
the trial budget. Each trial meta-trains a metanetwork on the zoo's training members (one process,
``cpus_per_trial`` cores) and, every ``eval_every`` epochs, reports its *score* (the search file's
``objective``): with ``recipe`` (the default, since the search covers the finetuning settings too)
validation accuracy of the zoo's validation members after the trial's recipe (metanetwork ->
finetune -> prune to each target -> finetune), averaged over members and targets; with ``auc`` the
area under the validation members' recalibrated pruning curve right after the edit
(``metanet.diagnostics``), which scores the metanetwork alone. ASHA stops weak trials early. The first
trial is the default configuration (meta_train.py's and prune_batch.py's defaults), so the best
score is read against it.

Every trial is logged to MLflow, one run each (``distributed.trial_runs``: a trial resumed after a
restart logs into its own run); the best configuration is written to
``best_config.yaml`` (sections ``meta_train`` and ``prune_batch``, which those pipelines read with
``--config``); only then, for that one configuration, the test split of the zoo's held-out (role
``test``) members is scored and reported.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distributed.cli import run_cli  # noqa: E402
from distributed.locks import exclusive  # noqa: E402
from distributed.ray_env import check_fits, init_ray, preflight, shutdown  # noqa: E402
from zoo.search import SearchError, check_same_search, default_trial, load_search, param_space  # noqa: E402
from zoo.store import ZooFormatError  # noqa: E402
from zoo.batch.inputs import BatchInputError  # noqa: E402
from zoo.tuning import best_configuration, print_report, settle_search_allocator, trial  # noqa: E402

SEARCH_DIR = Path(__file__).resolve().parent / "searches"
DEFAULT_SEARCH = SEARCH_DIR / "digits.yaml"


# ------------------------------------------------------------------------------------ driver
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--search", default=str(DEFAULT_SEARCH), help="search file (YAML) (default: the digits search)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a search-file value, e.g. num_samples=4 (default: none)")
    p.add_argument("--out", help="output directory; the same one resumes the search (default: runs/tune-<name>)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=True,
                   help="log trials to MLflow (default: on)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    search = load_search(args.search, args.set)
    out = Path(args.out or f"runs/tune-{search['name']}").resolve()
    from zoo.integrity import checked

    try:
        zoo = checked(search["zoo"], search["damaged_members"], who="tune", override="--set damaged_members=")
        if zoo.excluded:  # the trials leave out what was left out here
            search["excluded_members"] = dict(zoo.excluded)
        meta = zoo.metadata()
        data = zoo.dataset(search.get("data_root"))
    except FileNotFoundError as err:
        raise SystemExit(f"tune: {err} (build it first: make zoo)")
    for role in ("train", "val"):
        if not ((meta.status == "ok") & (meta.role == role)).any():
            raise SystemExit(f"tune: {search['zoo']} has no '{role}' members; the search needs both")
    search["zoo"] = str(Path(search["zoo"]).resolve()) if "://" not in search["zoo"] else search["zoo"]
    try:
        note = settle_search_allocator(search, str(out))
    except BatchInputError as err:
        raise SystemExit(f"tune: {err}")
    if note:
        print(f"tune: {note}")
    preflight(float(search.get("cpus_per_trial", 1)), f"tune: cpus_per_trial {search.get('cpus_per_trial', 1):g}",
              args.address, args.num_cpus)
    if args.mlflow:
        from distributed.tracking import check_server

        check_server()
    with exclusive(str(out), "tune"):
        return _search(search, out, args, zoo, data)


def _search(search: dict, out: Path, args, zoo, data) -> dict:
    check_same_search(out, search)
    started = time.perf_counter()
    resources = init_ray(args.address, args.num_cpus)
    check_fits(float(search.get("cpus_per_trial", 1)), 0, f"tune: cpus_per_trial {search.get('cpus_per_trial', 1):g}")
    began = time.time()
    results = _fit(search, data, out, resources, args.mlflow)
    # a resumed search with every trial finished reports nothing new (Tune stamps each result)
    ran = any((r.metrics or {}).get("timestamp", 0) >= int(began) for r in results)
    report = best_configuration(results, search, out, data, zoo.finetune_settings())
    report["seconds"] = time.perf_counter() - started
    shutdown()
    print_report(report, out)
    if args.mlflow:
        experiment = f"tune-{search['name']}"
        if ran or not _summary_logged(experiment, out):
            uri = _log_summary(report, out, search)
            print(f"mlflow: every trial and the summary logged to {uri} (experiment {experiment})")
        else:
            print(f"mlflow: no trial ran and the search's summary is logged already (experiment {experiment}): "
                  "no new run")
    return report


def _summary_logged(experiment: str, out: Path) -> bool:
    import mlflow

    from distributed.tracking import use_experiment

    use_experiment(experiment, str(out))
    return len(mlflow.search_runs(experiment_names=[experiment],
                                  filter_string=f"tags.mlflow.runName = '{experiment}-summary'")) > 0


def _fit(search: dict, data, out: Path, resources: dict, use_mlflow: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    cpus = float(search.get("cpus_per_trial", 1))
    concurrent = search.get("max_concurrent_trials") or max(1, int(resources.get("CPU", 1) // cpus))
    evaluations = math.ceil(search["max_epochs"] / search.get("eval_every", 1))
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=evaluations,
                              grace_period=min(search.get("grace_period", 1), evaluations),
                              reduction_factor=search.get("reduction_factor", 2))
    default = {k: v for k, v in default_trial().items() if k in search["space"]}
    callbacks = []
    if use_mlflow:  # (a restored search uses the callbacks it was created with)
        from distributed.trial_runs import MLflowTrialRuns

        callbacks.append(MLflowTrialRuns(f"tune-{search['name']}", str(out), tags={"search": search["name"]}))
    trainable = tune.with_resources(tune.with_parameters(trial, search=search, data=data), {"cpu": cpus})
    experiment = out / "trials"
    if tune.Tuner.can_restore(str(experiment)):  # a killed search: finished trials are kept, the rest go on
        print(f"tune {search['name']}: resuming the search in {experiment}")
        return tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=param_space(search)).fit()
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(search),
        # the concurrency limit lives on the search algorithm: TuneConfig's is ignored when one is given
        tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=scheduler,
                                    num_samples=search.get("num_samples", 8),
                                    search_alg=BasicVariantGenerator(points_to_evaluate=[default], max_concurrent=concurrent,
                                                                     random_state=search.get("seed", 0))),
        run_config=tune.RunConfig(name="trials", storage_path=str(out), callbacks=callbacks, verbose=1,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2,
                                                                          checkpoint_score_attribute="score",
                                                                          checkpoint_score_order="max")))
    print(f"tune {search['name']}: {search.get('num_samples', 8)} trials (the first: the default configuration), "
          f"{concurrent} at a time, ASHA over {evaluations} evaluations of {len(search.get('targets') or search['sparsities'])} "
          f"{'target(s)' if search.get('targets') else 'sparsities'}")
    return tuner.fit()


def _log_summary(report: dict, out: Path, search: dict) -> str:
    from distributed.tracking import log_run

    metrics = {"best_val_score": report["best"]["best"], "seconds": report["seconds"], "trials": len(report["trials"])}
    if report["default"].get("best") is not None:
        metrics["default_val_score"] = report["default"]["best"]
    unit = "zeros" if report["test_score"].get("unit") == "zeros" else "x"
    metrics.update({f"test_acc_{t:g}{unit}": v for t, v in report["test_score"].items() if t not in ("members", "unit")})
    return log_run(f"tune-{search['name']}", str(out), run_name=f"tune-{search['name']}-summary",
            params=report["best_config"], metrics=metrics,
            artifacts=[str(out / "best_config.yaml"), str(out / "tune_scores.png")])


# the errors a user's input can cause: one line and exit code 2 (distributed.cli)
KNOWN_ERRORS = (SearchError, ZooFormatError, FileNotFoundError)


def cli(argv=None) -> None:
    run_cli(main, "tune", KNOWN_ERRORS, argv)


if __name__ == "__main__":
    cli()
