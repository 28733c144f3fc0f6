"""Prune many models with a trained metanetwork, in parallel on Ray (and the baselines, if asked).

    python pipelines/prune_batch.py --zoo runs/zoo-digits --metanet runs/meta-train/metanet/metanetwork.pt \\
        --targets 2 4 --baselines                      # the zoo's held-out (role 'test') members
    python pipelines/prune_batch.py --models 'saved/*.pt' --dataset digits --metanet M.pt --targets 2
    python pipelines/prune_batch.py --models saved/ --dataset digits --metanet M.pt --floor 0.9   # adaptive

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
metanetwork file (``meta`` rows) and of the settings that change the result (``RESULT_SETTINGS``).
Re-running reuses a row only when all three match, and says why it recomputes one otherwise. A
model that cannot be loaded, has an unsupported layer, NaN weights or fails while pruning gets a
``failed`` row with the reason (retried on the next run), the others go on, and the run exits 1.
One run at a time per ``--out`` (a second one refuses, exit 3). Models load through
``torch.load(weights_only=True)``; a pickled whole module only with ``--trust-pickle``.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed.cli import run_cli  # noqa: E402
from distributed.locks import exclusive  # noqa: E402
from distributed.ray_env import init_ray, ray, shutdown  # noqa: E402
from distributed.settings import SettingsError  # noqa: E402
from metanet.diagnostics import CURVE_SPEEDUPS  # noqa: E402
from metanet.files import atomic_write, atomic_write_text  # noqa: E402
from metanet.metanetwork import MetanetFileError  # noqa: E402
from metanet.recipe import AFTER_STEPS, BEFORE_STEPS  # noqa: E402
from zoo.data import DatasetError  # noqa: E402
from zoo.store import ZooFormatError  # noqa: E402

DEFAULTS = {
    "zoo": None, "split": "test", "models": [], "arch": None, "trust_pickle": False, "dataset": None,
    "data_root": None, "metanet": None, "methods": ["meta"], "baselines": False, "targets": [2.0], "floor": None,
    "before_steps": BEFORE_STEPS, "before_lr": 0.01, "after_steps": AFTER_STEPS, "after_lr": 0.01, "batch_size": None,
    "augment": None, "sparse_reg": 5e-4, "seed": 0, "out": "runs/prune-batch", "cpus_per_task": 1.0, "gpu": None,
    "mlflow": True, "diagnostics": False,
}
HELP = {
    "zoo": "zoo whose --split members to prune",
    "split": "zoo split to prune: train, val, test (held out) or all",
    "models": "model files, folders or globs to prune (zoo.model_files formats)",
    "arch": "YAML architecture spec for bare state dicts",
    "trust_pickle": "allow pickled whole modules (runs code from the file)",
    "dataset": "dataset of --models files (digits, cifar10, cifar100, svhn, imagefolder)",
    "data_root": "dataset folder (overrides the zoo spec's)",
    "metanet": "metanetwork file (meta_train.py's metanetwork.pt), needed for method meta",
    "methods": "methods: meta, none, depgraph, gate, oracle",
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
    "out": "output directory: results, models, summary, plots, MLflow store",
    "cpus_per_task": "CPUs per Ray task (one task per model and method)",
    "gpu": "one GPU per task (default: when the cluster has GPUs)",
    "mlflow": "log the run to MLflow",
    "diagnostics": "add the prepared models' recalibrated pruning curves and edit selectivity",
}
FLAG_TYPES = {"floor": float, "gpu": bool, "batch_size": int, "augment": bool}
DIAGNOSTICS = ["ratio_spread", "mean_ratio", "share_below_0.1", "acc_recal",
               *(f"curve_{s:g}x" for s in CURVE_SPEEDUPS), "auc"]
COLUMNS = ["model", "source", "family", "method", "target", "floor", "status", "error", "speedup", "macs_before",
           "macs_after", "params_before", "params_after", "val_acc_before", "test_acc_before", "val_acc_pruned",
           "test_acc_pruned", "val_acc", "test_acc", "seconds", "path", *DIAGNOSTICS,
           "model_sha", "metanet_sha", "settings_sha", "settings", "node"]
KEY = ["model", "method", "target", "floor"]
# the settings a row's result depends on (besides its model, method, target/floor and metanetwork)
RESULT_SETTINGS = ("arch", "dataset", "data_root", "before_steps", "before_lr", "after_steps", "after_lr",
                   "batch_size", "augment", "sparse_reg", "seed", "diagnostics")


@dataclass(frozen=True)
class Source:
    """Where one model comes from: a zoo member (``zoo`` + ``row``) or a file."""

    name: str
    ref: str  # the file path, or "<zoo>#<member id>"
    zoo: str | None = None
    digest: str = ""  # content hash of the file the model is read from
    error: str | None = None  # set when the source cannot be read at all (its rows fail without a task)


# ------------------------------------------------------------------------------- the task
def _load(source: Source, arch: dict | None, trust_pickle: bool):
    from zoo.model_files import load_model
    from zoo.store import Zoo

    if source.zoo is not None:
        return Zoo(source.zoo, skip_unreadable=True).record(source.name).network()
    return load_model(source.ref, arch=arch, trust_pickle=trust_pickle)[0]


def check_finite(model, where: str) -> None:
    """A model with NaN or inf weights cannot be pruned meaningfully: say which tensor."""
    import itertools

    import torch

    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {name} has non-finite values (NaN or inf); the model file is broken")


def _error(err: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(err)).strip()
    return f"{type(err).__name__}: {text[:400]}"


def prune_model(source: Source, method: str, runs: list[dict], config: dict, data, metanet_path: str | None,
                out: str) -> list[dict]:
    """One Ray task: the rows of one model and method, one per target in ``runs`` (each a dict
    with ``target`` and ``floor``). Never raises for a bad model: its rows say ``failed``."""
    import torch

    from metanet.metanetwork import load_metanetwork
    from metanet.prune import count
    from metanet.recipe import prepare, prune_and_finetune, recipe_from_settings
    from zoo.model_files import save_model
    from metanet.train import evaluate

    torch.set_num_threads(max(1, int(config["cpus_per_task"])))
    torch.manual_seed(config["seed"])
    base = {"model": source.name, "source": source.ref, "method": method, "status": "failed",
            "node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None}
    rows = [dict(base, **r) for r in runs]
    started = time.perf_counter()
    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU when the task was given one
        model = _load(source, config["arch"], config["trust_pickle"]).to(device)
        check_finite(model, source.ref)
        family = _family(model)
        x = torch.zeros(data.input_shape, device=device)
        macs, params = count(model, x)
        before = {"family": family, "val_acc_before": evaluate(model, data, "val")[0],
                  "test_acc_before": evaluate(model, data, "test")[0], "macs_before": macs, "params_before": params}
        # DGL's wheel is a CPU build: on a GPU the metanetwork runs on the PyG backend
        metanet = load_metanetwork(metanet_path, None if device == "cpu" else "pyg")[0] if method == "meta" else None
        cfg = recipe_from_settings(config, batch_size=config["batch_size"], augment=config["augment"],
                                   seed=config["seed"], sparse_reg=config["sparse_reg"])
        prepared, record = prepare(model, data, method, cfg, metanet)
        if config["diagnostics"]:  # on the test split: a report, nothing is selected with it
            from metanet.diagnostics import diagnose

            before.update(diagnose(model, prepared, data, cfg, CURVE_SPEEDUPS, split="test"))
    except Exception as err:  # the model could not be loaded, converted or trained: every row says why
        return [dict(r, error=_error(err), seconds=time.perf_counter() - started) for r in rows]
    shared = record.pop("seconds_before_prune")
    for row in rows:
        began = time.perf_counter()
        row.update(before)
        try:
            cfg.target = row["target"] if row["target"] is not None else cfg.target
            cfg.floor = row["floor"]
            pruned, result = prune_and_finetune(prepared, data, cfg, dict(record))
            name = f"{source.name}__{method}__{_run_label(row)}.pt"
            path = os.path.join(out, "models", name)
            try:
                save_model(pruned, path, model=source.name, method=method, target=row["target"], floor=row["floor"],
                           source=source.ref)
            except ValueError:  # not a zoo architecture (a trusted pickled module): keep it as one
                atomic_write(path, lambda tmp: torch.save(pruned.cpu(), tmp))
            row.update({k: result[k] for k in ("speedup", "macs_after", "params_after", "val_acc_pruned",
                                               "test_acc_pruned", "val_acc", "test_acc")},
                       status="ok", error=None, path=path)
        except Exception as err:
            row.update(error=_error(err))
        row["seconds"] = shared + time.perf_counter() - began
    return rows


def _family(model) -> str:
    from zoo.arch import arch_spec

    try:
        return arch_spec(model)["family"]
    except ValueError:
        return type(model).__name__


def _run_label(row: dict) -> str:
    floor = row.get("floor")
    return f"floor{floor:g}" if floor is not None and floor == floor else f"{row['target']:g}x"  # NaN: no floor


# ---------------------------------------------------------------------------- the inputs
def find_sources(config: dict) -> list[Source]:
    """Every model to prune: the zoo split's members, then the files the ``models`` patterns match."""
    sources: list[Source] = []
    if config["zoo"]:
        from zoo.store import Zoo

        try:
            zoo = Zoo(config["zoo"], skip_unreadable=True)  # an unreadable member fails only its own rows
            meta = zoo.metadata()
        except FileNotFoundError as err:
            raise SystemExit(f"prune_batch: {err}")
        if config["split"] not in ("train", "val", "test", "all"):
            raise SystemExit(f"prune_batch: --split must be train, val, test or all, not {config['split']!r}")
        roles = {"train", "val", "test"} if config["split"] == "all" else {config["split"]}
        files = {m.id: f for m, f in zip(meta.itertuples(), _member_files(zoo))}
        for m in meta.itertuples():
            if m.status == "ok" and m.role in roles:
                sources.append(Source(m.id, f"{config['zoo']}#{m.id}", config["zoo"], file_digest(files[m.id])))
        for path, error in zoo.unreadable.items():
            if zoo.expected_role(path) in roles:
                name = Path(path).stem
                sources.append(Source(name, f"{config['zoo']}#{name}", config["zoo"], error=error))
        if not sources:
            raise SystemExit(f"prune_batch: {config['zoo']} has no built members in split {config['split']!r} "
                             f"(roles there: {sorted(set(meta.role))})")
    for pattern in config["models"]:
        if os.path.isdir(pattern):
            matches = sorted(glob.glob(os.path.join(pattern, "*.pt")) + glob.glob(os.path.join(pattern, "*.pth")))
        else:
            matches = sorted(glob.glob(pattern))
        if not matches:
            raise SystemExit(f"prune_batch: --models {pattern!r}: no such file, and no .pt/.pth files match it")
        for path in matches:
            sources.append(Source(Path(path).stem, os.path.abspath(path), digest=file_digest(path)))
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SystemExit(f"prune_batch: two models share the name(s) {dupes}; rename the files")
    if not sources:
        raise SystemExit("prune_batch: nothing to prune: give --zoo (and --split) and/or --models")
    return sources


def _member_files(zoo) -> list[str]:
    """The file of each row of ``zoo.metadata()``, in order."""
    return [path for path, _ in zoo.index()]


def file_digest(path: str) -> str:
    """Content hash of a file (the first 16 hex digits of its SHA-256)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def settings_digest(config: dict) -> tuple[str, str]:
    """The settings that change a row's result, as JSON, and their hash."""
    import hashlib
    import json

    text = json.dumps({k: config.get(k) for k in RESULT_SETTINGS}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], text


def why_recompute(previous: dict, current: dict) -> str | None:
    """None when ``previous`` (a finished row) was produced by what ``current`` describes; else
    what changed, in words."""
    import json

    def text(key):  # a missing value reads back from parquet as None or NaN
        value = previous.get(key)
        return value if isinstance(value, str) else ""

    if not text("settings_sha"):
        return "the row records no fingerprint (written by an older version)"
    reasons = []
    if text("model_sha") != current["model_sha"]:
        reasons.append("the model file changed")
    if text("metanet_sha") != current["metanet_sha"]:
        reasons.append("the metanetwork file changed")
    if previous.get("settings_sha") != current["settings_sha"]:
        old, new = json.loads(text("settings") or "{}"), json.loads(current["settings"])
        changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
        reasons.append("settings changed: " + (", ".join(changed) or "(unknown)"))
    return "; ".join(reasons) or None


def load_data(config: dict):
    from zoo.data import DatasetError, load_dataset

    try:
        if config["dataset"]:
            return load_dataset(config["dataset"], config["data_root"])
        if config["zoo"]:
            from zoo.store import Zoo

            return Zoo(config["zoo"]).dataset(config["data_root"])
    except (DatasetError, FileNotFoundError) as err:
        raise SystemExit(f"prune_batch: {err}")
    raise SystemExit("prune_batch: --dataset is needed when the models do not come from a zoo")


def _finetune_defaults(config: dict) -> dict:
    """Batch size and augmentation not given: the zoo's finetuning settings, else 128 with
    augmentation."""
    zoo_settings = {"batch_size": 128, "augment": True}
    if config["zoo"] and (config["batch_size"] is None or config["augment"] is None):
        from zoo.store import Zoo

        zoo_settings = Zoo(config["zoo"]).finetune_settings()
    return dict(config, batch_size=config["batch_size"] or zoo_settings["batch_size"],
                augment=config["augment"] if config["augment"] is not None else zoo_settings["augment"])


def _arch_file(path: str | None) -> dict | None:
    if path is None:
        return None
    import yaml

    if not os.path.exists(path):
        raise SystemExit(f"prune_batch: --arch file not found: {path}")
    with open(path) as f:
        arch = yaml.safe_load(f)
    if not isinstance(arch, dict) or "family" not in arch:
        raise SystemExit(f"prune_batch: --arch {path}: not an architecture spec (a mapping with 'family')")
    return arch


# ------------------------------------------------------------------------------- results
def read_results(out: str):
    import pandas as pd

    path = os.path.join(out, "results.parquet")
    if not os.path.exists(path):
        return pd.DataFrame(columns=COLUMNS)
    return pd.read_parquet(path)


def write_results(out: str, rows: list[dict]):
    """Rewrites results.parquet and results.csv from ``rows`` (atomically); returns the frame."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame = frame.astype({"target": "float64", "floor": "float64"})
    frame = frame.sort_values(["model", "method", "target", "floor"], na_position="last").reset_index(drop=True)
    atomic_write(os.path.join(out, "results.parquet"), lambda p: frame.to_parquet(p, index=False))
    atomic_write(os.path.join(out, "results.csv"), lambda p: frame.to_csv(p, index=False))
    return frame


def _key(row) -> tuple:
    def num(v):
        return None if v is None or v != v else round(float(v), 6)

    return row["model"], row["method"], num(row["target"]), num(row["floor"])


def paired_summary(frame) -> str:
    """Markdown: paired differences in final test accuracy (same model) with 95% intervals, for
    meta against each baseline (or the baselines against each other), per target; '' if one method."""
    from metanet.paired import paired_key_table, paired_table

    ok = frame[(frame.status == "ok") & frame.floor.isna()]
    methods = list(dict.fromkeys(ok.method))
    if len(methods) < 2:
        return ""
    pairs = [("meta", b) for b in methods if b != "meta"] if "meta" in methods else \
        [(a, b) for i, a in enumerate(methods) for b in methods[i + 1:]]
    targets = sorted(set(ok.target))
    rows = ok.to_dict("records")
    text = ("Paired by model, final test accuracy, mean difference in points [95% interval over "
            f"{ok.model.nunique()} models]:\n\n" + paired_table(rows, pairs, targets, "test_acc", unit="model"))
    if ok["auc"].notna().any():
        curve = [r for r in rows if r["target"] == targets[0]]
        keys = [f"curve_{s:g}x" for s in CURVE_SPEEDUPS]
        text += ("\n\nRecalibrated pruning curve of the prepared models (no finetuning after pruning), "
                 "paired by model, points:\n\n" + paired_key_table(curve, pairs, keys, unit="model"))
    return text


def summary_table(frame) -> str:
    """Markdown: per method and target, the mean over models that finished."""
    ok = frame[frame.status == "ok"]
    lines = ["| method | target | models | reached speed-up | test acc before | test acc pruned (BN recal, no ft) | "
             "test acc after | val acc after | s each |", "|---|---|---|---|---|---|---|---|---|"]
    group = ok.assign(run=[_run_label(r) for r in ok.to_dict("records")]).groupby(["run", "method"], sort=False)
    order = sorted(group.groups, key=lambda k: (k[0], k[1]))
    for run, method in order:
        g = group.get_group((run, method))
        lines.append(f"| {method} | {run} | {len(g)} | {g.speedup.mean():.2f}x | {100 * g.test_acc_before.mean():.2f} | "
                     f"{100 * g.test_acc_pruned.mean():.2f} | {100 * g.test_acc.mean():.2f} | "
                     f"{100 * g.val_acc.mean():.2f} | {g.seconds.mean():.0f} |")
    failed = frame[frame.status != "ok"]
    if len(failed):
        lines += ["", f"{len(failed)} failed:", ""]
        lines += [f"- {r.model} / {r.method} / {_run_label(r._asdict())}: {r.error}" for r in failed.itertuples()]
    paired = paired_summary(frame)
    return "\n".join(lines) + (f"\n\n{paired}" if paired else "")


def plot(frame, path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = frame[frame.status == "ok"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (method, g), marker in zip(ok.groupby("method"), "os^vD"):
        ax.scatter(g.speedup, 100 * g.test_acc, marker=marker, alpha=0.35, s=18)
        means = g.groupby(g.target.fillna(-1)).agg(x=("speedup", "mean"), y=("test_acc", "mean")).sort_values("x")
        ax.plot(means.x, 100 * means.y, marker=marker, label=f"{method} (mean)",
                color=ax.collections[-1].get_facecolor()[0][:3])
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("MAC speed-up reached")
    ax.set_ylabel("test accuracy after finetuning (%)")
    ax.set_title(f"{ok.model.nunique()} models: accuracy vs speed-up")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def plot_curves(frame, path: str) -> bool:
    """With ``--diagnostics``: each method's recalibrated pruning curve (mean over models, 95%
    interval), the unedited networks' beside them. False when no row has diagnostics."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metanet.paired import mean_ci

    ok = frame[(frame.status == "ok") & frame["auc"].notna()]
    if ok.empty:
        return False
    first = ok[ok.target == ok.target.min()] if ok.target.notna().any() else ok
    keys = [f"curve_{s:g}x" for s in CURVE_SPEEDUPS]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (method, g), marker in zip(first.groupby("method"), "os^vD"):
        cis = [mean_ci(list(100 * g.groupby("model")[k].mean())) for k in keys]
        ax.errorbar(CURVE_SPEEDUPS, [c.mean for c in cis], yerr=[(c.high - c.low) / 2 if c.n > 1 else 0 for c in cis],
                    marker=marker, capsize=3, label=f"{method} (prepared)")
    ax.axhline(100 * first.groupby("model").test_acc_before.first().mean(), color="gray", ls="--", label="unpruned")
    ax.set_xscale("log", base=2)
    ax.set_xticks(CURVE_SPEEDUPS)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(0, 100)
    ax.set_xlabel("MAC speed-up")
    ax.set_ylabel("test accuracy right after pruning (%)")
    ax.set_title(f"recalibrated pruning curve, {first.model.nunique()} models (95% interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return True


def _log_mlflow(config: dict, frame, out: str, wall: float) -> str:
    import mlflow

    from distributed.tracking import flatten, use_experiment

    uri = use_experiment("prune-batch", out)
    ok = frame[frame.status == "ok"]
    with mlflow.start_run(run_name=f"prune-batch-{ok.model.nunique()}-models"):
        mlflow.log_params({k: str(v)[:5000] for k, v in flatten(config).items()})
        metrics = {"rows_ok": float(len(ok)), "rows_failed": float((frame.status != "ok").sum()), "wall_seconds": wall}
        labelled = ok.assign(run=[_run_label(r) for r in ok.to_dict("records")])
        for (method, run), g in labelled.groupby(["method", "run"]):
            tag = re.sub(r"[^0-9A-Za-z_.x-]", "_", f"{method}_{run}")
            metrics.update({f"test_acc_{tag}": g.test_acc.mean(), f"val_acc_{tag}": g.val_acc.mean(),
                            f"speedup_{tag}": g.speedup.mean()})
        mlflow.log_metrics(metrics)
        for name in ("results.parquet", "results.csv", "summary.md", "accuracy_vs_speedup.png", "pruning_curve.png"):
            if os.path.exists(os.path.join(out, name)):
                mlflow.log_artifact(os.path.join(out, name))
    return uri


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

    config = resolve(vars(build_parser().parse_args(argv)), DEFAULTS, "prune_batch", "prune_batch", types=FLAG_TYPES)
    if config["baselines"]:
        config["methods"] = list(dict.fromkeys([*config["methods"], "none", "depgraph"]))
    from metanet.recipe import ALL_METHODS

    bad = [m for m in config["methods"] if m not in ALL_METHODS]
    if bad:
        raise SystemExit(f"prune_batch: unknown method(s) {bad}; known: {', '.join(ALL_METHODS)}")
    if "meta" in config["methods"]:
        if not config["metanet"]:
            raise SystemExit("prune_batch: --metanet FILE is needed for method 'meta' (or --methods none depgraph)")
        if not os.path.isfile(config["metanet"]):
            raise SystemExit(f"prune_batch: metanetwork file not found: {config['metanet']}")
    if config["floor"] is None and any(not (math.isfinite(t) and t > 1) for t in config["targets"]):
        raise SystemExit(f"prune_batch: --targets must be finite speed-ups > 1, got {config['targets']}")
    if config["floor"] is not None and not (math.isfinite(config["floor"]) and 0 < config["floor"] <= 1):
        raise SystemExit(f"prune_batch: --floor is a validation accuracy in (0, 1], got {config['floor']}")
    return config


def main(argv=None) -> dict:
    config = parse_args(argv)
    started = time.perf_counter()
    out = os.path.abspath(config["out"])
    with exclusive(out, "prune_batch"):  # also the check that --out is writable
        os.makedirs(os.path.join(out, "models"), exist_ok=True)
        return _main(config, out, started)


def _main(config: dict, out: str, started: float) -> dict:
    metanet_sha = ""
    if "meta" in config["methods"]:
        from metanet.metanetwork import load_metanetwork

        load_metanetwork(config["metanet"])  # a truncated or foreign file: one line now, not a failed row per model
        metanet_sha = file_digest(config["metanet"])
    sources = find_sources(config)
    arch = _arch_file(config["arch"])
    config = _finetune_defaults(config)
    config = dict(config, arch=arch, metanet=os.path.abspath(config["metanet"]) if config["metanet"] else None)
    settings_sha, settings = settings_digest(config)
    runs = [{"target": None, "floor": config["floor"]}] if config["floor"] is not None else \
        [{"target": float(t), "floor": None} for t in config["targets"]]
    previous = {_key(r): r for r in read_results(out).to_dict("records")}
    kept, jobs, failed_now, reused = {}, [], [], 0
    for source in sources:
        for method in config["methods"]:
            current = {"model_sha": source.digest, "metanet_sha": metanet_sha if method == "meta" else "",
                       "settings_sha": settings_sha, "settings": settings}
            todo = []
            for r in runs:
                key = _key({"model": source.name, "method": method, **r})
                old = previous.get(key)
                if source.error is not None:
                    failed_now.append({"model": source.name, "source": source.ref, "method": method, **r,
                                       "status": "failed", "error": source.error, **current})
                    continue
                reason = why_recompute(old, current) if old is not None and old["status"] == "ok" else "not done"
                if reason is None:
                    kept[key] = old
                    reused += 1
                    continue
                if reason != "not done":
                    print(f"  {source.name} / {method} / {_run_label(r)}: recomputed ({reason})")
                todo.append(dict(r, **current))
            if todo:
                jobs.append((source, method, todo))
    this_run = {_key({"model": s.name, "method": m, **r}) for s in sources for m in config["methods"] for r in runs}
    rows = [r for k, r in previous.items() if k not in this_run] + list(kept.values()) + failed_now
    total = len(sources) * len(config["methods"]) * len(runs)
    print(f"prune_batch: {len(sources)} models x {len(config['methods'])} methods x {len(runs)} targets = {total} "
          f"rows; {reused} already done with the same model, metanetwork and settings -> {out}")
    if jobs:
        data = load_data(config)
        resources = init_ray(config.pop("address"), config.pop("num_cpus"))
        print(f"ray: {resources.get('CPU', 0):.0f} CPUs, {resources.get('GPU', 0):.0f} GPUs on "
              f"{len([n for n in ray.nodes() if n['Alive']])} node(s); data {data.name} (train {len(data.train[1])}, "
              f"val {len(data.val[1])}, test {len(data.test[1])})")
        rows = _run(jobs, config, data, out, rows)
        shutdown()
    frame = write_results(out, rows)
    table = summary_table(frame)
    atomic_write_text(os.path.join(out, "summary.md"), table + "\n")
    written = ["results.parquet", "results.csv", "summary.md"]
    if (frame.status == "ok").any():
        plot(frame, os.path.join(out, "accuracy_vs_speedup.png"))
        written.append("accuracy_vs_speedup.png")
        if plot_curves(frame, os.path.join(out, "pruning_curve.png")):
            written.append("pruning_curve.png")
    wall = time.perf_counter() - started
    mine = frame[[_key(r) in this_run for r in frame.to_dict("records")]]
    failed = int((mine.status != "ok").sum())
    nodes = set(mine.node.dropna()) if "node" in mine else set()
    print(f"\n{table}\n\nwrote {', '.join(f'{out}/{w}' for w in written)} ({wall:.0f} s)"
          + (f"; tasks ran on {len(nodes)} node(s)" if nodes else ""))
    if failed:
        print(f"prune_batch: {failed} of {len(mine)} rows failed (reasons above); exit code 1", file=sys.stderr)
    if config["mlflow"]:
        uri = _log_mlflow({k: v for k, v in config.items() if k not in ("address", "num_cpus")}, frame, out, wall)
        print(f"mlflow: run logged to {uri} (experiment prune-batch)")
    return {"results": frame, "seconds": wall, "failed": failed}


def _run(jobs, config: dict, data, out: str, rows: list[dict]) -> list[dict]:
    from tqdm import tqdm

    data_ref = ray.put(data)
    use_gpu = config["gpu"] if config["gpu"] is not None else ray.cluster_resources().get("GPU", 0) > 0
    task = ray.remote(prune_model).options(num_cpus=config["cpus_per_task"], num_gpus=1 if use_gpu else 0,
                                           max_retries=1)
    pending = {task.remote(s, m, [{"target": r["target"], "floor": r["floor"]} for r in todo], config, data_ref,
                           config["metanet"], out): (s, m, todo) for s, m, todo in jobs}
    models = {s.name for s, _, _ in jobs}
    left = {name: sum(s.name == name for s, _, _ in jobs) for name in models}
    failed = 0
    bar = tqdm(total=len(models), desc="pruning models", unit="model")
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        source, method, todo = pending.pop(ready[0])
        try:
            new = ray.get(ready[0])
        except Exception as err:  # the task itself died (every retry): its rows say so
            cause = getattr(err, "cause", None) or err
            new = [{"model": source.name, "source": source.ref, "method": method, "status": "failed",
                    "error": _error(cause)} for r in todo]
        new = [dict(n, **{k: r[k] for k in ("model_sha", "metanet_sha", "settings_sha", "settings", "target",
                                             "floor")}) for n, r in zip(new, todo)]
        failed += sum(r["status"] != "ok" for r in new)
        replaced = {_key(n) for n in new}
        rows = [r for r in rows if _key(r) not in replaced] + new
        write_results(out, rows)  # after every task: a killed driver loses only what was running
        left[source.name] -= 1
        if left[source.name] == 0:
            bar.update(1)
        bar.set_postfix(rows_ok=sum(r["status"] == "ok" for r in rows), failed=failed)
    bar.close()
    return rows


# the errors a user's input can cause: one line and exit code 2 (distributed.cli)
KNOWN_ERRORS = (MetanetFileError, ZooFormatError, DatasetError, SettingsError, FileNotFoundError)


def cli(argv=None) -> None:
    run_cli(main, "prune_batch", KNOWN_ERRORS, argv)


if __name__ == "__main__":
    cli()
