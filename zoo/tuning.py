"""One trial of a Ray Tune search and the search's report (``pipelines/tune.py``): the trial
meta-trains a metanetwork and reports its validation score as it goes; the report picks the best
configuration by validation score, writes it as ``best_config.yaml``, and only then scores that one
configuration on the test split of the zoo's held-out members."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from distributed.cli import ANSI, training_error
from metanet.allocation import ALLOCATIONS, DEFAULT_ALLOCATION
from metanet.files import atomic_write, atomic_write_text
from metanet.levels import Level
from metanet.meta_training import MetaTrainConfig, make_member
from metanet.metanetwork import MetaNetConfig, MetaNetwork, load_metanetwork, save_metanetwork
from metanet.plotting import pyplot
from metanet.recipe import prepare, prune_and_finetune, prune_to_targets, recipe_from_settings
from metanet.selection import choose, score, train_and_select
from metanet.sources import ALLOCATION, resolve
from metanet.weight_pruning import WeightPruning
from zoo.arch import build_model
from zoo.batch.inputs import BatchInputError, settle_allocator, stage_metanetworks
from zoo.search import META_KEYS, PRUNE_KEYS, default_trial, with_objective_defaults
from zoo.store import Zoo


def trial(config: dict, search: dict, data) -> None:
    """One Tune trial: meta-train with ``config`` and report the validation score as it goes."""
    import torch

    from ray import tune

    config = with_objective_defaults(config, search)
    torch.set_num_threads(max(1, int(search.get("cpus_per_trial", 1))))
    torch.manual_seed(search.get("seed", 0))
    zoo = Zoo(search["zoo"], exclude=search.get("excluded_members"))
    records = [r for r in zoo if r.status == "ok"]
    cfg = MetaTrainConfig(epochs=search["max_epochs"], lr=config["lr"], weight_decay=config["weight_decay"],
                          milestones=(10**6,), batches_per_step=config["batches_per_step"],
                          batch_size=config["batch_size"], reg=config["reg"], alpha=config["alpha"],
                          sparsity_norm=config["sparsity_norm"], seed=search.get("seed", 0),
                          objective=config["objective"], score_targets=config["score_targets"],
                          l1_reg=config["l1_reg"], weight_temperature=config["weight_temperature"])
    members = [make_member(r.id, build_model(r.arch), r.graph, cfg) for r in records if r.role == "train"]
    val = [r.network() for r in records if r.role == "val"]
    val = val[:search.get("val_members", len(val))]
    metanet = MetaNetwork(MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=config["hidden"],
                                        layers=config["layers"], residual=config["residual"],
                                        edit=config["edit"],
                                        evidence=config["evidence"],
                                        calibration=config["calibration"] or config["gradient"],
                                        gradient=config["gradient"]))
    recipe = recipe_from_settings(config, **zoo.finetune_settings(), seed=search.get("seed", 0))
    allocator = trial_allocator(config, search)

    def validate(net) -> float:
        # the trial's own recipe settings score it: the search compares recipes, not just metanetworks
        return score(net, val, data, recipe, search["objective"], search.get("targets"), search.get("sparsities"),
                     allocator=allocator)

    def report(epoch: int, metrics: dict, net, row: dict | None) -> None:
        if row is None:
            return
        with tempfile.TemporaryDirectory() as d:
            save_metanetwork(net, os.path.join(d, "metanet.pt"), epoch=epoch)  # the one metanetwork file format
            tune.report({"score": row["score"], "epoch": epoch, "task_loss": metrics["task_loss"],
                         "sparsity_loss": metrics["sparsity_loss"], "meta_seconds": metrics["seconds"]},
                        checkpoint=tune.Checkpoint.from_directory(d))

    # Tune's scheduler stops a trial between reports, and the report picks among them (``choose``)
    train_and_select(metanet, members, data, cfg, validate, every=search.get("eval_every", 1), untrained=False,
                     final=False, report=report)


def best_configuration(results, search: dict, out: Path, data, finetune: dict) -> dict:
    """The best configuration (by validation score), written as best_config.yaml; then its test score."""
    frames, trials = [], []
    # in the order Tune created the trials (the path names count them): a restored search's
    # ResultGrid lists them in another order, and the trial numbers must not change on a resume
    results = sorted(results, key=lambda r: os.path.basename(r.path or ""))
    for i, result in enumerate(results):
        config = with_objective_defaults(result.config, search)  # as the trial trained
        if result.error or result.metrics_dataframe is None or "score" not in result.metrics_dataframe:
            trials.append({"trial": i, "config": config, "best": None,
                           "error": trial_error(result.error) if result.error else None})
            continue
        history = result.metrics_dataframe[["training_iteration", "epoch", "score"]]
        frames.append(history.assign(trial=i))
        epoch, best_score = choose(dict(zip(history.epoch.astype(int), history.score.astype(float))))
        trials.append({"trial": i, "config": config, "best": best_score, "epoch": epoch,
                       "iterations": int(history.training_iteration.max()), "path": result.path})
    scored = [t for t in trials if t["best"] is not None]
    if not scored:
        raise SystemExit(f"tune: {no_score_message(results)}")
    best = max(scored, key=lambda t: t["best"])
    wanted = {k: v for k, v in default_trial().items() if k in search["space"]}
    default = next((t for t in trials if all(t["config"].get(k) == v for k, v in wanted.items())), {})
    result = next(r for i, r in enumerate(results) if i == best["trial"])
    # the same rule among the checkpoints Tune kept (the best-scored ones: the chosen epoch's among them)
    kept = {int(metrics["epoch"]): (c, float(metrics["score"])) for c, metrics in result.best_checkpoints}
    checkpoint = kept[choose({e: value for e, (_, value) in kept.items()})[0]][0]
    with checkpoint.as_directory() as d:
        net = load_metanetwork(os.path.join(d, "metanet.pt"))[0]
    config = best["config"]
    best_config = {
        "meta_train": {**{k: config[k] for k in META_KEYS}, "epochs": best["epoch"] + 1, "milestones": [best["epoch"] + 1]},
        "prune_batch": {**{k: config[k] for k in PRUNE_KEYS},
                        **({"targets": list(map(float, search["targets"]))} if search.get("targets") else
                           {"sparsity": list(map(float, search["sparsities"]))}),
                        # the allocation metanetwork the best trial pruned with (staged under the search's output)
                        **({"allocator": search["allocator"]} if ALLOCATIONS[config["allocation"]].reads_allocator
                           and search.get("allocator")
                           else {})},
        "tune": {"search": search["name"], "trial": best["trial"], "val_score": best["best"],
                 "default_val_score": default.get("best"), "default_evaluations": default.get("iterations")},
    }
    best_config = yaml.safe_load(yaml.safe_dump(best_config))  # plain types (numpy scalars -> floats)
    text = "# Written by pipelines/tune.py: the best configuration by validation score.\n" + \
        yaml.safe_dump(best_config, sort_keys=False)
    atomic_write_text(out / "best_config.yaml", text)
    test_score = held_out_score(net, config, search, data, finetune)
    return {"best": best, "default": default, "trials": trials, "best_config": best_config,
            "test_score": test_score, "history": frames}


def trial_error(error: BaseException) -> str:
    """A failed trial's error in one line, ``Type: message``: the exception the trial function
    raised (Ray's ``RayTaskError`` keeps it as ``cause``), else the last exception line of Ray's
    text (a worker header in colour codes, then the traceback), without the colour codes."""
    cause = error
    for _ in range(8):  # a task error wrapping another task's error: down to what was raised first
        inner = getattr(cause, "cause", None)
        if not isinstance(inner, BaseException) or inner is cause:
            break
        cause = inner
    if cause is error:
        return training_error(error)
    text = " ".join(ANSI.sub("", str(cause)).split())
    return f"{type(cause).__name__}: {text}"[:300] if text else type(cause).__name__


def no_score_message(results) -> str:
    """Why a search has no best configuration, in one line: the first failed trial (in the order
    Tune created them, as the report numbers them), what it raised, and its log (Ray writes the
    whole traceback to ``error.txt`` in the trial's folder)."""
    failed = [(i, r) for i, r in enumerate(results) if r.error]
    if not failed:
        return (f"no trial reported a score, and none of the {len(results)} trial(s) failed: is eval_every larger "
                "than max_epochs?")
    i, result = failed[0]
    log = os.path.join(result.path, "error.txt") if result.path else None
    where = f" (log: {log if os.path.isfile(log) else result.path})" if log else ""
    more = f"; {len(failed) - 1} other trial(s) failed too" if len(failed) > 1 else ""
    return f"no trial reported a score; trial {i} failed: {trial_error(result.error)}{where}{more}"


def settle_search_allocator(search: dict, out: str) -> str | None:
    """Where trials can draw an allocation that reads an allocation metanetwork (``learned``, fixed
    or among the choices): the search file's ``allocator`` (a file, a ``models:/`` or ``runs:/``
    URI) or the shipped one, checked and copied under ``out`` (every node reads it; a URI is
    downloaded once, here), its path in ``search['allocator']``. The line to print, or None when
    no trial reads one; ``BatchInputError`` names a bad one."""
    sampled = search["space"].get("allocation")
    drawn = next(iter(sampled.values())) if sampled else [search["fixed"].get("allocation", DEFAULT_ALLOCATION)]
    reading = [a for a in drawn if ALLOCATIONS[a].reads_allocator]
    if not reading:
        if search.get("allocator"):
            raise BatchInputError(f"allocator {search['allocator']}: no trial draws an allocation that reads one "
                                  f"(allocation: {', '.join(a for a, c in ALLOCATIONS.items() if c.reads_allocator)})")
        return None
    config = {"allocation": reading[0], "allocator": search.get("allocator")}
    note = settle_allocator(config, flag="allocator")
    stage_metanetworks(config, out)
    search["allocator"] = config["allocator"]
    return note


def trial_allocator(config: dict, search: dict | None = None) -> MetaNetwork | None:
    """The allocation metanetwork a configuration's allocation reads (``search['allocator']``, as
    ``settle_search_allocator`` left it, else the shipped one: a trial meta-trains a criterion, not an
    allocation), else None."""
    if not ALLOCATIONS[config.get("allocation", DEFAULT_ALLOCATION)].reads_allocator:
        return None
    return load_metanetwork((search or {}).get("allocator") or resolve(None, ALLOCATION).path)[0]


def held_out_score(net, config: dict, search: dict, data, finetune: dict) -> dict:
    """Test accuracy of the best configuration on the held-out (role 'test') members, per target."""
    held_out = Zoo(search["zoo"], exclude=search.get("excluded_members")).built("test")
    if not held_out:
        return {}
    recipe = recipe_from_settings(config, **finetune, seed=search.get("seed", 0))
    if search.get("sparsities"):
        return _held_out_weights(net, held_out, search["sparsities"], data, recipe)
    scores: dict[float, list[float]] = {float(t): [] for t in search["targets"]}
    allocator = trial_allocator(config, search)
    for record in held_out:
        pruned = prune_to_targets(record.network(), data, "meta", recipe, list(scores), net, allocator=allocator)
        for target, (_, row) in zip(scores, pruned):
            scores[target].append(row["test_acc"])
    return {t: sum(v) / len(v) for t, v in scores.items()} | {"members": len(held_out)}


def _held_out_weights(net, held_out, sparsities, data, recipe) -> dict:
    """Test accuracy of a weight-level search's best metanetwork on the held-out members, per
    fraction of zeros (its finetune, then weight-level pruning, then the finetune)."""
    scores: dict[float, list[float]] = {float(s): [] for s in sparsities}
    for record in held_out:
        prepared = prepare(record.network(), data, "meta", recipe, net, level=Level.WEIGHTS)
        for s in scores:
            _, row = prune_and_finetune(prepared, data, recipe, weights=WeightPruning(sparsity=s), metanet=net)
            scores[s].append(row["test_acc"])
    return {s: sum(v) / len(v) for s, v in scores.items()} | {"members": len(held_out), "unit": "zeros"}


def print_report(report: dict, out: Path) -> None:
    print(f"\n{'trial':>5} {'val score':>10} {'epochs':>7}  configuration")
    for t in sorted(report["trials"], key=lambda t: -(t["best"] or -1)):
        shown_score = f"{100 * t['best']:.2f}" if t["best"] is not None else "error"
        label = " (default)" if t["trial"] == report["default"].get("trial") else ""
        shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in t["config"].items()}
        print(f"{t['trial']:>5} {shown_score:>10} {t.get('epoch', -1) + 1:>7}  {shown}{label}")
    best, default = report["best"], report["default"]
    print(f"\nbest: trial {best['trial']}, validation score {100 * best['best']:.2f}% "
          f"(default configuration: {100 * default['best']:.2f}% after {default['iterations']} evaluation(s))"
          if default.get("best") is not None else f"\nbest: trial {best['trial']}, {100 * best['best']:.2f}%")
    test = report["test_score"]
    if test:
        unit = "zeros" if test.get("unit") == "zeros" else "x"
        per = ", ".join(f"{100 * t:g}% zeros {100 * v:.2f}%" if unit == "zeros" else f"{t:g}x {100 * v:.2f}%"
                        for t, v in test.items() if t not in ("members", "unit"))
        print(f"test accuracy of the best configuration on {test['members']} held-out member(s): {per}")
    print(f"wrote {out / 'best_config.yaml'} and {out / 'tune_scores.png'}; {report['seconds']:.0f} s")
    write_scores_figure(report, out / "tune_scores.png")


def write_scores_figure(report: dict, path: Path) -> None:
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
