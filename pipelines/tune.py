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
import os
import sys
import tempfile
import time
from pathlib import Path

from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed.cli import run_cli  # noqa: E402
from distributed.locks import exclusive  # noqa: E402
from distributed.ray_env import init_ray, shutdown  # noqa: E402
from distributed.schema import Strict, describe, read_mapping  # noqa: E402
from metanet.files import atomic_write, atomic_write_text  # noqa: E402
from metanet.selection import OBJECTIVES  # noqa: E402
from zoo.store import ZooFormatError  # noqa: E402

SEARCH_DIR = Path(__file__).resolve().parent / "searches"
DEFAULT_SEARCH = SEARCH_DIR / "digits.yaml"
META_KEYS = ("lr", "weight_decay", "reg", "alpha", "hidden", "layers", "residual", "batches_per_step", "batch_size",
             "edit", "evidence", "sparsity_norm", "objective", "calibration", "score_targets")
PRUNE_KEYS = ("before_steps", "before_lr", "after_steps", "after_lr", "criterion")
SAMPLERS = ("uniform", "loguniform", "choice", "randint")


def default_trial() -> dict:
    """The configuration a user gets without tuning: the library's defaults (``MetaTrainConfig``,
    ``MetaNetConfig``, ``metanet.recipe.RECIPE_DEFAULTS``), which meta_train.py and prune_batch.py use too."""
    from metanet.meta_training import MetaTrainConfig
    from metanet.metanetwork import MetaNetConfig
    from metanet.recipe import RECIPE_DEFAULTS

    train, net = MetaTrainConfig(), MetaNetConfig(edge_widths={})
    meta = {k: getattr(train, k) if hasattr(train, k) else getattr(net, k) for k in META_KEYS}
    return {**meta, **{k: RECIPE_DEFAULTS[k] for k in PRUNE_KEYS}}


# -------------------------------------------------------------------------------- the search file
Tunable = Literal[META_KEYS + PRUNE_KEYS]  # type: ignore[valid-type]


class Sampler(Strict):
    """One of ``uniform: [low, high]``, ``loguniform: [low, high]``, ``randint: [low, high]``,
    ``choice: [values]``."""

    uniform: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None
    loguniform: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=2, max_length=2)] | None = None
    randint: Annotated[list[int], Field(min_length=2, max_length=2)] | None = None
    choice: Annotated[list[Any], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in SAMPLERS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(SAMPLERS)}, not {given or 'none'}")
        return self


class SearchFile(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    zoo: str
    data_root: str | None = None
    targets: Annotated[list[Annotated[float, Field(gt=1, allow_inf_nan=False)]], Field(min_length=1)]
    objective: Literal[OBJECTIVES] = "recipe"  # type: ignore[valid-type]
    val_members: Annotated[int, Field(ge=1)] | None = None
    max_epochs: Annotated[int, Field(ge=1)]
    eval_every: Annotated[int, Field(ge=1)] = 1
    grace_period: Annotated[int, Field(ge=1)] = 1
    reduction_factor: Annotated[float, Field(gt=1)] = 2
    num_samples: Annotated[int, Field(ge=1)] = 8
    cpus_per_trial: Annotated[float, Field(gt=0)] = 1
    max_concurrent_trials: Annotated[int, Field(ge=1)] | None = None
    seed: int = 0
    fixed: dict[Tunable, Any] = {}
    space: Annotated[dict[Tunable, Sampler], Field(min_length=1)]


class SearchError(ValueError):
    """A search file that is missing or does not match ``SearchFile``."""


def load_search(path: str, overrides: list[str]) -> dict:
    """The search file at ``path`` with ``key=value`` overrides, validated (``SearchError`` names the
    key, the value and what is allowed); unset optional keys are left out."""
    search = read_mapping(path, "search file", SearchError)
    for item in overrides:
        if "=" not in item:
            raise SearchError(f"--set {item!r} must look like key=value")
        key, value = item.split("=", 1)
        search[key] = yaml.safe_load(value)
    try:
        return SearchFile.model_validate(search).model_dump(exclude_none=True)
    except ValidationError as err:
        raise SearchError(describe(err, path, SearchFile)) from None


def param_space(search: dict) -> dict:
    from ray import tune

    space = {}
    for key, spec in search["space"].items():
        kind, args = next(iter(spec.items()))
        space[key] = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
    return {**default_trial(), **search.get("fixed", {}), **space}


# ---------------------------------------------------------------------------------- one trial
def trial(config: dict, search: dict, data) -> None:
    """One Tune trial: meta-train with ``config`` and report the validation score as it goes."""
    import torch

    from ray import tune
    from metanet.meta_training import MetaTrainConfig, make_member, meta_train
    from zoo.arch import build_model
    from metanet.metanetwork import MetaNetConfig, MetaNetwork, save_metanetwork
    from metanet.recipe import recipe_from_settings
    from metanet.selection import score
    from zoo.store import Zoo

    torch.set_num_threads(max(1, int(search.get("cpus_per_trial", 1))))
    torch.manual_seed(search.get("seed", 0))
    zoo = Zoo(search["zoo"])
    records = [r for r in zoo if r.status == "ok"]
    cfg = MetaTrainConfig(epochs=search["max_epochs"], lr=config["lr"], weight_decay=config["weight_decay"],
                          milestones=(10**6,), batches_per_step=config["batches_per_step"],
                          batch_size=config["batch_size"], reg=config["reg"], alpha=config["alpha"],
                          sparsity_norm=config["sparsity_norm"], seed=search.get("seed", 0),
                          objective=config["objective"], score_targets=config["score_targets"])
    members = [make_member(r.id, build_model(r.arch), r.graph, cfg) for r in records if r.role == "train"]
    val = [r.network() for r in records if r.role == "val"]
    val = val[:search.get("val_members", len(val))]
    metanet = MetaNetwork(MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=config["hidden"],
                                        layers=config["layers"], residual=config["residual"],
                                        # the curve objective trains a criterion: its edit is the scores
                                        edit="scores" if config["objective"] == "curve" else config["edit"],
                                        evidence=config["evidence"], calibration=config["calibration"]))
    recipe = recipe_from_settings(config, **zoo.finetune_settings(), seed=search.get("seed", 0))
    every = search.get("eval_every", 1)

    def on_epoch(epoch: int, metrics: dict, net) -> None:
        if (epoch + 1) % every:
            return
        # the trial's own recipe settings score it: the search compares recipes, not just metanetworks
        value = score(net, val, data, recipe, search["objective"], search["targets"])
        with tempfile.TemporaryDirectory() as d:
            save_metanetwork(net, os.path.join(d, "metanet.pt"), epoch=epoch)  # the one metanetwork file format
            tune.report({"score": value, "epoch": epoch, "task_loss": metrics["task_loss"],
                         "sparsity_loss": metrics["sparsity_loss"], "meta_seconds": metrics["seconds"]},
                        checkpoint=tune.Checkpoint.from_directory(d))

    meta_train(metanet, members, data, cfg, on_epoch=on_epoch, progress=False)


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
    from zoo.store import Zoo

    try:
        zoo = Zoo(search["zoo"])
        meta = zoo.metadata()
        data = zoo.dataset(search.get("data_root"))
    except FileNotFoundError as err:
        raise SystemExit(f"tune: {err} (build it first: make zoo)")
    for role in ("train", "val"):
        if not ((meta.status == "ok") & (meta.role == role)).any():
            raise SystemExit(f"tune: {search['zoo']} has no '{role}' members; the search needs both")
    search["zoo"] = str(Path(search["zoo"]).resolve()) if "://" not in search["zoo"] else search["zoo"]
    with exclusive(str(out), "tune"):
        return _search(search, out, args, zoo, data)


def _search(search: dict, out: Path, args, zoo, data) -> dict:
    check_same_search(out, search)
    started = time.perf_counter()
    resources = init_ray(args.address, args.num_cpus)
    began = time.time()
    results = _fit(search, data, out, resources, args.mlflow)
    # a resumed search with every trial finished reports nothing new (Tune stamps each result)
    ran = any((r.metrics or {}).get("timestamp", 0) >= int(began) for r in results)
    report = _report(results, search, out, data, zoo.finetune_settings())
    report["seconds"] = time.perf_counter() - started
    shutdown()
    _print_report(report, out)
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


def check_same_search(out: Path, search: dict) -> None:
    """A search resumes only into an output that holds the same search (``search.json``): another
    search's trials would be mixed with this one's. Writes ``search.json`` for a new output."""
    import json

    path = out / "search.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(search)):
            changed = sorted(k for k in set(old) | set(search) if old.get(k) != search.get(k))
            raise SearchError(f"{out} holds another search (different {', '.join(changed)}); give another --out "
                              "or remove that directory")
        return
    atomic_write_text(path, json.dumps(search, indent=1, sort_keys=True))


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
          f"{concurrent} at a time, ASHA over {evaluations} evaluations of {len(search['targets'])} target(s)")
    return tuner.fit()


def _report(results, search: dict, out: Path, data, finetune: dict) -> dict:
    """The best configuration (by validation score), written as best_config.yaml; then its test score."""
    from metanet.metanetwork import load_metanetwork

    frames, trials = [], []
    # in the order Tune created the trials (the path names count them): a restored search's
    # ResultGrid lists them in another order, and the trial numbers must not change on a resume
    results = sorted(results, key=lambda r: os.path.basename(r.path or ""))
    for i, result in enumerate(results):
        if result.error or result.metrics_dataframe is None or "score" not in result.metrics_dataframe:
            trials.append({"trial": i, "config": result.config, "best": None, "error": str(result.error)[:300]})
            continue
        history = result.metrics_dataframe[["training_iteration", "epoch", "score"]]
        frames.append(history.assign(trial=i))
        best_row = history.loc[history.score.idxmax()]
        trials.append({"trial": i, "config": result.config, "best": float(best_row.score),
                       "epoch": int(best_row.epoch), "iterations": int(history.training_iteration.max()),
                       "path": result.path})
    scored = [t for t in trials if t["best"] is not None]
    if not scored:
        raise SystemExit(f"tune: no trial reported a score; errors: {[t.get('error') for t in trials]}")
    best = max(scored, key=lambda t: t["best"])
    wanted = {k: v for k, v in default_trial().items() if k in search["space"]}
    default = next((t for t in trials if all(t["config"].get(k) == v for k, v in wanted.items())), {})
    result = next(r for i, r in enumerate(results) if i == best["trial"])
    checkpoint = max(result.best_checkpoints, key=lambda cm: cm[1]["score"])[0]
    with checkpoint.as_directory() as d:
        net = load_metanetwork(os.path.join(d, "metanet.pt"))[0]
    config = best["config"]
    best_config = {
        "meta_train": {**{k: config[k] for k in META_KEYS}, "epochs": best["epoch"] + 1, "milestones": [best["epoch"] + 1]},
        "prune_batch": {**{k: config[k] for k in PRUNE_KEYS}, "targets": list(map(float, search["targets"]))},
        "tune": {"search": search["name"], "trial": best["trial"], "val_score": best["best"],
                 "default_val_score": default.get("best"), "default_evaluations": default.get("iterations")},
    }
    best_config = yaml.safe_load(yaml.safe_dump(best_config))  # plain types (numpy scalars -> floats)
    text = "# Written by pipelines/tune.py: the best configuration by validation score.\n" + \
        yaml.safe_dump(best_config, sort_keys=False)
    atomic_write_text(out / "best_config.yaml", text)
    test_score = _test_score(net, config, search, data, finetune)
    return {"best": best, "default": default, "trials": trials, "best_config": best_config,
            "test_score": test_score, "history": frames}


def _test_score(net, config: dict, search: dict, data, finetune: dict) -> dict:
    """Test accuracy of the best configuration on the held-out (role 'test') members, per target."""
    from metanet.recipe import prune_to_targets, recipe_from_settings
    from zoo.store import Zoo

    held_out = Zoo(search["zoo"]).built("test")
    if not held_out:
        return {}
    recipe = recipe_from_settings(config, **finetune, seed=search.get("seed", 0))
    scores: dict[float, list[float]] = {float(t): [] for t in search["targets"]}
    for record in held_out:
        for target, (_, row) in zip(scores, prune_to_targets(record.network(), data, "meta", recipe, list(scores), net)):
            scores[target].append(row["test_acc"])
    return {t: sum(v) / len(v) for t, v in scores.items()} | {"members": len(held_out)}


def _print_report(report: dict, out: Path) -> None:
    print(f"\n{'trial':>5} {'val score':>10} {'epochs':>7}  configuration")
    for t in sorted(report["trials"], key=lambda t: -(t["best"] or -1)):
        score = f"{100 * t['best']:.2f}" if t["best"] is not None else "error"
        label = " (default)" if t["trial"] == report["default"].get("trial") else ""
        shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in t["config"].items()}
        print(f"{t['trial']:>5} {score:>10} {t.get('epoch', -1) + 1:>7}  {shown}{label}")
    best, default = report["best"], report["default"]
    print(f"\nbest: trial {best['trial']}, validation score {100 * best['best']:.2f}% "
          f"(default configuration: {100 * default['best']:.2f}% after {default['iterations']} evaluation(s))"
          if default.get("best") is not None else f"\nbest: trial {best['trial']}, {100 * best['best']:.2f}%")
    test = report["test_score"]
    if test:
        per = ", ".join(f"{t:g}x {100 * v:.2f}%" for t, v in test.items() if t != "members")
        print(f"test accuracy of the best configuration on {test['members']} held-out member(s): {per}")
    print(f"wrote {out / 'best_config.yaml'} and {out / 'tune_scores.png'}; {report['seconds']:.0f} s")
    _plot(report, out / "tune_scores.png")


def _plot(report: dict, path: Path) -> None:
    from metanet.plotting import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for frame in report["history"]:
        i = int(frame.trial.iloc[0])
        style = dict(color="black", lw=2.2, label="default") if i == report["default"].get("trial") else \
            dict(color="tab:red", lw=2.2, label=f"best (trial {i})") if i == report["best"]["trial"] else \
            dict(color="tab:gray", lw=1, alpha=0.6)
        ax.plot(frame.epoch + 1, 100 * frame.score, marker="o", ms=3, **style)
    ax.set_xlabel("meta-training epoch")
    ax.set_ylabel("validation score (%)")
    ax.set_title("Tune trials (ASHA stops the weak ones early)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def _log_summary(report: dict, out: Path, search: dict) -> str:
    from distributed.tracking import log_run

    metrics = {"best_val_score": report["best"]["best"], "seconds": report["seconds"], "trials": len(report["trials"])}
    if report["default"].get("best") is not None:
        metrics["default_val_score"] = report["default"]["best"]
    metrics.update({f"test_acc_{t:g}x": v for t, v in report["test_score"].items() if t != "members"})
    return log_run(f"tune-{search['name']}", str(out), run_name=f"tune-{search['name']}-summary",
            params=report["best_config"], metrics=metrics,
            artifacts=[str(out / "best_config.yaml"), str(out / "tune_scores.png")])


# the errors a user's input can cause: one line and exit code 2 (distributed.cli)
KNOWN_ERRORS = (SearchError, ZooFormatError, FileNotFoundError)


def cli(argv=None) -> None:
    run_cli(main, "tune", KNOWN_ERRORS, argv)


if __name__ == "__main__":
    cli()
