"""A meta-training run over a zoo, around Ray Train (``pipelines/meta_train.py``): which members it
trains on, the digest of its inputs that names its folder and decides reuse, and the choice of a
checkpoint on validation members once training is done.

A run's folder is ``<out>/<name>/training-<digest>``: Ray Train resumes whatever it finds under a
name, so other settings or another zoo train in a folder of their own; the chosen metanetwork is
``<out>/<name>/metanetwork.pt`` with a copy in the training's folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Mapping

import torch

from distributed.model_registry import log_metanetwork
from metanet.files import atomic_write
from metanet.metanetwork import MetaNetConfig, MetaNetwork, MetanetFileError, load_metanetwork, save_metanetwork
from metanet.selection import choose, score, selection_recipe
from zoo.batch import file_digest
from metanet.diagnostics import CURVE_SPARSITIES
from metanet.plotting import DIAGNOSTIC_PANELS, diagnostics_figure, pyplot, selection_figure
from zoo.meta_settings import NOT_RESULT_SETTINGS, WEIGHT_OBJECTIVES, metanet_settings
from zoo.integrity import checked
from zoo.store import Zoo


def training_rows(meta, min_acc: float) -> list[int]:
    """Zoo rows meta-trained on: training members that trained (status ok) to at least ``min_acc``
    validation accuracy (weak members teach the metanetwork to edit networks nobody would prune)."""
    return [i for i, m in enumerate(meta.itertuples())
            if m.status == "ok" and m.role == "train" and (m.val_acc >= min_acc if min_acc > 0 else True)]


def prepare(config: dict):
    """The checks and derived settings every run needs before Ray starts: (zoo, run directory,
    digest of the inputs); refuses unreadable training or validation members by name. Sets
    ``config["metanet"]`` (``MetaNetConfig``'s arguments)."""
    zoo = checked(config["zoo"], config["damaged_members"], roles=("train", "val"), who="meta_train",
                  skip_unreadable=True, override="--damaged-members ")
    config["excluded_members"] = dict(zoo.excluded)  # the workers leave out what the driver left out
    zoo.spec()  # the workers read the dataset from it: a damaged spec.json is named here, before Ray starts
    meta = zoo.metadata()
    for path, error in zoo.unreadable.items():
        if path in zoo.excluded:
            continue  # a damaged member left out as asked: checked() said so
        if zoo.expected_role(path) in ("train", "val"):
            raise SystemExit(f"meta_train: {error} (a {zoo.expected_role(path)} member: rebuild it with make_zoo "
                             "and the zoo's spec)")
        print(f"meta_train: skipping unreadable held-out member file {path}")
    if not ((meta.status == "ok") & (meta.role == "train")).any():
        raise SystemExit(f"meta_train: {config['zoo']} has no training members")
    if not training_rows(meta, config["min_member_acc"]):
        raise SystemExit(f"meta_train: --min-member-acc {config['min_member_acc']}: no training member of "
                         f"{config['zoo']} reaches that validation accuracy")
    if config["gpu"] and config["backend"] == "dgl":  # DGL's only wheel is a CPU build
        print("meta_train: --gpu: the metanetwork runs on the 'torch' backend (DGL's wheel is CPU-only)")
        config["backend"] = "torch"
    config["metanet"] = metanet_settings(config, zoo.edge_widths())
    if "://" in config["out"]:  # Ray Train and pyarrow take URIs; pathlib would fold "s3://" into "s3:/"
        return zoo, f"{config['out'].rstrip('/')}/{config['name']}", inputs_digest(config, zoo)
    out = Path(config["out"]).resolve()
    if out.exists() and not out.is_dir():
        raise SystemExit(f"meta_train: --out {out}: an existing file, not a folder; give another --out")
    config["out"] = str(out)
    return zoo, out / config["name"], inputs_digest(config, zoo)


def _settings_digest(config: dict, members: dict | None = None) -> str:
    settings = {k: v for k, v in sorted(config.items()) if k not in NOT_RESULT_SETTINGS}
    payload = [settings, members] if members is not None else settings
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def inputs_digest(config: dict, zoo: Zoo) -> str | None:
    """What decides the chosen metanetwork: the settings (not ``NOT_RESULT_SETTINGS``) and the
    content of the zoo's training and validation member files. None for a zoo behind a URI."""
    if "://" in config["zoo"]:
        return None
    meta = zoo.metadata()
    files = sorted({path for (path, _), role in zip(zoo.index(), meta.role) if role in ("train", "val")})
    return _settings_digest(config, {os.path.basename(f): file_digest(f) for f in files})


def training_name(config: dict, digest: str | None) -> str:
    """The folder (Ray Train's run name, under ``<out>/<name>``) of the training these inputs make;
    a zoo behind a URI: its address and the settings name it (its member files are not hashed)."""
    return f"training-{digest or _settings_digest(config)}"


def training_folder(run_dir, config: dict, digest: str | None) -> str:
    """``run_dir``'s folder for the training these inputs make (a local path or a URI)."""
    return f"{run_dir}/{training_name(config, digest)}"


def already_done(config: dict, run_dir, digest: str | None) -> str | None:
    """``run_dir``'s metanetwork.pt if an earlier run with the same inputs (``inputs_digest``)
    chose it, else None. When it holds another run's choice but this run's own training folder
    kept its copy (settings changed and changed back), that copy becomes ``run_dir``'s again."""
    if digest is None or "://" in str(run_dir):
        return None
    current = Path(run_dir) / "metanetwork.pt"
    kept = Path(training_folder(run_dir, config, digest)) / "metanetwork.pt"
    for path in (current, kept):
        try:
            if path.exists() and load_metanetwork(str(path))[1].get("inputs") == digest:
                if path == kept:
                    atomic_write(current, lambda tmp: shutil.copyfile(kept, tmp))
                return str(current)
        except MetanetFileError:
            continue
    return None


def load_checkpoint(ckpt_dir: str, metanet_config: dict) -> MetaNetwork:
    """The metanetwork of one Ray Train checkpoint (``state.pt``, written by the training loop)."""
    net = MetaNetwork(MetaNetConfig(**metanet_config))
    net.load_state_dict(torch.load(os.path.join(ckpt_dir, "state.pt"), weights_only=True)["metanet"])
    return net


def score_checkpoint(ckpt_dir: str, metanet_config: dict, zoo_root: str, data_root: str | None, target: float,
                     steps: int, members: int, seed: int, objective: str = "paper",
                     exclude: dict[str, str] | None = None) -> float:
    """Validation score of one checkpoint by the short recipe (metanetwork -> finetune -> prune to
    ``target`` -> finetune, validation accuracy over the first ``members`` validation members); for
    a weight-level ``objective`` the weight-level curve area (``WEIGHT_SELECTION``)."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    zoo = Zoo(zoo_root)
    val = Zoo(zoo_root, skip_unreadable=True, exclude=exclude).built("val")[:members]
    if not val:
        raise ValueError(f"{zoo_root}: no validation members (role 'val') to select checkpoints with")
    recipe = selection_recipe(zoo.finetune_settings(), steps, target=target, seed=seed)
    return score(load_checkpoint(ckpt_dir, metanet_config), [r.network() for r in val], zoo.dataset(data_root),
                 recipe, sparsities=CURVE_SPARSITIES if objective in WEIGHT_OBJECTIVES else None)


WEIGHT_SELECTION = ("validation weight-level curve area (mean accuracy right after pruning to "
                    + "/".join(f"{100 * s:g}" for s in CURVE_SPARSITIES) + "% zeros, BN recalibrated)")


def select(checkpoints: Mapping[int, str], areas: Mapping[int, float], config: dict, run_dir, training_dir: str,
           score_all: Callable[[list[str]], list[float]]) -> dict:
    """Chooses among the kept ``checkpoints`` (epoch -> folder) on validation members: by the curve
    areas logged during training (``--selection auc``, free) or by ``score_all`` (the short recipe
    per checkpoint folder; the pipeline runs them as Ray tasks). Writes the best as ``run_dir``'s
    metanetwork.pt and a copy in the training's folder (kept when other settings train later)."""
    epochs = sorted(checkpoints)
    logged = [areas.get(e, float("nan")) for e in epochs]
    weights = config.get("objective") in WEIGHT_OBJECTIVES  # the logged areas are channel-level: not its
    use_auc = config["selection"] == "auc" and all(a == a for a in logged) and not weights  # NaN: not diagnosed
    if config["selection"] == "auc" and not use_auc and not weights:
        print("meta_train: some kept checkpoints have no validation diagnostics (--diagnose-every); "
              "selecting by the short recipe instead")
    if use_auc:
        scores = {e: areas[e] for e in epochs}
        how = "validation curve area (mean accuracy right after pruning, BN recalibrated)"
    else:
        scores = dict(zip(epochs, score_all([checkpoints[e] for e in epochs])))
        how = WEIGHT_SELECTION if weights else f"val acc after finetune -> prune to {config['select_target']}x -> finetune"
    best_epoch, best_score = choose(scores)
    net = load_checkpoint(checkpoints[best_epoch], config["metanet"])
    out = f"{run_dir}/metanetwork.pt"  # run_dir: a local path or a URI
    for path in (f"{training_dir}/metanetwork.pt", out):
        save_metanetwork(net, path, epoch=best_epoch, selection_score=best_score, selection=how,
                         zoo=config["zoo"], inputs=config.get("inputs_digest"))
    return {"epochs": epochs, "scores": [scores[e] for e in epochs], "best_epoch": best_epoch,
            "best_score": best_score, "path": out, "how": how}


def log_model(config: dict, path: str, run_id: str) -> str:
    """The chosen metanetwork (``path``) as an MLflow model in run ``run_id``, registered under
    ``--register`` when given, with its provenance as the model's metadata; returns the URI to read
    it by (``models:/NAME/VERSION`` or ``runs:/RUN_ID/metanetwork``). A ``path`` behind a URI
    (``--out s3://...``) is read through a local copy."""
    import tempfile

    import pyarrow.fs

    from distributed.tracking import use_experiment

    use_experiment("meta-train", config["out"])
    if "://" in str(path):
        with tempfile.TemporaryDirectory() as d:
            local = os.path.join(d, "metanetwork.pt")
            fs, inside = pyarrow.fs.FileSystem.from_uri(str(path))
            pyarrow.fs.copy_files(inside, local, source_filesystem=fs)
            return log_model(config, local, run_id)
    net, extra = load_metanetwork(path)
    provenance = {"metanet_config": json.dumps(net.config.to_dict()), "objective": config["objective"],
                  "zoo": config["zoo"], "zoo_inputs_digest": extra.get("inputs") or "",
                  "chosen_epoch": extra.get("epoch"), "selection": extra.get("selection"),
                  "selection_score": extra.get("selection_score"), "file_sha256": file_digest(path)}
    return log_metanetwork(net, path, run_id, config.get("register"), provenance)


def log_selection(config: dict, selection: dict, run_id: str) -> None:
    """MLflow, into the training's run: the chosen epoch and score, each checkpoint's score, the
    chosen metanetwork, the selection plot and the per-epoch validation diagnostics."""
    from distributed.tracking import log_run, metric_histories, use_experiment

    figures = {"selection_scores.png": selection_figure(selection["epochs"], selection["scores"],
                                                        selection["best_epoch"],
                                                        f"checkpoint selection: {config['selection']}")}
    if run_id:  # rank 0's run: its metric history has the diagnostics of every epoch
        use_experiment("meta-train", config["out"])
        diagnostics = diagnostics_figure(metric_histories(run_id, [k for k, _, _ in DIAGNOSTIC_PANELS]))
        if diagnostics is not None:
            figures["validation_diagnostics.png"] = diagnostics
    log_run("meta-train", config["out"], run_id=run_id or None, run_name=config["name"],
            metrics={"chosen_epoch": selection["best_epoch"], "chosen_score": selection["best_score"]},
            step_metrics={"selection_score": list(zip(selection["epochs"], selection["scores"]))},
            artifacts=[selection["path"]], figures=figures)
    for f in figures.values():
        pyplot().close(f)
