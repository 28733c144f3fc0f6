"""Distributed meta-training of the metanetwork with Ray Train, then checkpoint selection.

    python pipelines/meta_train.py --zoo runs/zoo-digits --workers 2     # a local Ray, started and stopped
    make meta-train                   # a Ray job on a local head that make starts and stops, as below
    RAY_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token \
      ray job submit --working-dir $(python -m distributed.job_snapshot) -- \
      python pipelines/meta_train.py --zoo $PWD/runs/zoo-digits --out $PWD/runs/meta-train --workers 2

Inside a job, relative paths are relative to the job's own copy of the code: give ``--zoo`` and
``--out`` as absolute paths (or URIs); run directly, relative paths are made absolute here.

Each of ``--workers`` Ray Train workers (gloo on CPU, nccl on GPU) takes its share of the zoo's
training members every epoch, reading each member's graph from the Arrow zoo when it needs it,
and computes the meta-objective (``metanet.meta_training.member_step``); DDP averages the
metanetwork's gradients. ``--keep`` checkpoints are written, evenly spread over the run (every
``ceil(epochs / keep)`` epochs, and the last: ``ray.train.report``) in the training's folder,
``<out>/<name>/training-<inputs>``, named by the settings and the zoo's member files: running the
same command again resumes from the latest one (and logs into the same MLflow run), a dead worker
restarts the run from it (``--max-failures``), and other settings or a changed zoo train anew in
a folder of their own. A finished run with the same inputs is reused without starting Ray.

After every epoch rank 0 diagnoses the metanetwork on ``--select-members`` validation members
(``metanet.diagnostics``: the recalibrated pruning curve of the edited network and its area, the
selectivity of the edit, accuracy after BatchNorm recalibration), reported with the epoch's
metrics and logged to MLflow (``val_*``; ``--diagnose-every 0`` turns it off).

Then a checkpoint is chosen among the kept ones (never with the test split): by default
(``--selection recipe``) each is scored by a short recipe (metanetwork -> finetune -> prune to
``--select-target`` -> finetune -> validation accuracy), one Ray task per checkpoint; with
``--selection auc``, the one whose edit has the largest validation curve area (free: it was
logged during training). The short recipe is the default because it ranks checkpoints by what
the full recipe later reaches and the curve area right after the edit does not (measured:
``bench/selection.py``, Spearman 0.67 and 0.82 against -0.75; docs/method.md). MLflow (rank 0 and the driver): params, per-epoch
loss terms and diagnostics, selection scores and their plot, the chosen metanetwork.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed.cli import run_cli  # noqa: E402
from distributed.ray_env import cluster_address, init_ray, ray, train_env  # noqa: E402
from distributed.settings import SettingsError  # noqa: E402
from metanet.meta_training import MetaTrainConfig  # noqa: E402
from metanet.metanetwork import MetaNetConfig  # noqa: E402
from metanet.selection import OBJECTIVES, SELECT_STEPS  # noqa: E402
from zoo.data import DatasetError  # noqa: E402
from zoo.store import ZooFormatError  # noqa: E402

_NET, _TRAIN = MetaNetConfig(edge_widths={}), MetaTrainConfig()  # the library's dataclasses hold the defaults
_TRAIN_KEYS = ("epochs", "lr", "weight_decay", "milestones", "batches_per_step", "members_per_step", "batch_size",
               "reg", "alpha", "seed", "bn_mode", "sparsity_norm", "distill_epochs", "gate_reg", "objective",
               "score_targets")
_NET_KEYS = ("hidden", "layers", "residual", "backend", "edit", "evidence", "calibration")
DEFAULTS = {
    "zoo": "runs/zoo-digits", "out": "runs/meta-train", "name": "metanet", "workers": 2,
    **{k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(_TRAIN, k)) for k in _TRAIN_KEYS)},
    **{k: getattr(_NET, k) for k in _NET_KEYS},
    "gpu": False, "max_failures": 2, "keep": 5, "selection": "recipe", "select_target": 2.0,
    "select_finetune_steps": SELECT_STEPS,
    "select_members": 4, "diagnose_every": 1, "data_root": None, "mlflow": True, "min_member_acc": 0.0,
}
HELP = {
    "zoo": "zoo directory or URI to meta-train on (its 'train' members; 'val' members select checkpoints)",
    "out": "Ray Train storage path: checkpoints, MLflow store, <name>/metanetwork.pt",
    "name": "run name under --out: <out>/<name>/metanetwork.pt is the latest choice",
    "workers": "Ray Train workers (data-parallel, each takes its share of the members)",
    "epochs": "meta-training epochs (one pass over the training members each)",
    "lr": "AdamW learning rate of the metanetwork",
    "weight_decay": "AdamW weight decay",
    "milestones": "epochs after which the learning rate drops x0.1",
    "batches_per_step": "task batches per member per optimiser step",
    "members_per_step": "members per optimiser step, edited in one metanetwork pass (1: the paper's)",
    "batch_size": "task batch size",
    "reg": "group-sparsity strength of the meta-objective",
    "alpha": "GroupNormPruner's alpha (layer-depth scaling of the group weights)",
    "hidden": "metanetwork width (node and edge state size)",
    "layers": "message-passing layers of the metanetwork",
    "residual": "r in: new weights = weights + r * learned edit",
    "backend": "message-passing backend: dgl, torch (plain PyTorch, also on CUDA) or pyg",
    "seed": "seed of the member order, batches and initialisation",
    "gpu": "one GPU per worker (nccl)",
    "max_failures": "restarts from the last checkpoint after a worker dies",
    "keep": "checkpoints kept, spread evenly over the run; selection chooses among them",
    "selection": "checkpoint choice: recipe (short finetune-prune-finetune on val members) or auc",
    "select_target": "speed-up the selection recipe prunes to",
    "select_finetune_steps": "finetuning steps before and after pruning in the selection recipe",
    "select_members": "validation members used for selection and diagnostics",
    "diagnose_every": "epochs between validation diagnostics (0: never)",
    "bn_mode": "BatchNorm mode of members in the meta-objective: eval (the paper) or train",
    "data_root": "dataset folder, overriding the zoo spec's",
    "mlflow": "log params, metrics and artifacts to MLflow",
    "edit": "metanetwork edit: additive (the paper), gate or gate+additive",
    "evidence": "give the metanetwork per-channel evidence features",
    "calibration": "a learned criterion also reads per-channel statistics of calibration batches (activations, "
                   "Taylor scores)",
    "sparsity_norm": "sparsity term: none (the paper), group or relative",
    "distill_epochs": "epochs of regression on per-member gates before the meta-objective (gate edits)",
    "gate_reg": "sparsity strength of the per-member gates that distillation targets",
    "min_member_acc": "skip training members below this validation accuracy",
    "objective": "paper (task loss of the edited network + group sparsity) or curve (a learned criterion, "
                 "edit 'scores': the task loss of the network masked at a drawn pruning amount)",
    "score_targets": "curve objective: weight of the regression on each member's own optimised scores (0: none)",
}
FAULT_ENV = "METAPRUNE_FAULT_INJECT"
EPOCH_LINE = "meta-training epoch"  # testing hook, see _inject_fault


# --------------------------------------------------------------------------- the training loop
def train_func(config: dict) -> None:
    """One Ray Train worker: reads like single-process meta-training, over this worker's members."""
    import torch
    import torch.distributed as dist

    import ray.train
    import ray.train.torch
    from metanet.meta_training import MetaTrainConfig, make_member, run_epoch
    from zoo.arch import build_model
    from metanet.metanetwork import MetaNetConfig, MetaNetwork
    from zoo.store import Zoo

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    zoo = Zoo(config["zoo"], skip_unreadable=True)  # the driver checked that no train/val member is unreadable
    data = zoo.dataset(config["data_root"])
    meta = zoo.metadata()
    rows = training_rows(meta, config["min_member_acc"])
    if not rows:
        raise ValueError(f"{config['zoo']}: no training members with status ok and val_acc >= "
                         f"{config['min_member_acc']}")
    cfg = MetaTrainConfig(**{k: tuple(config[k]) if k == "milestones" else config[k] for k in _TRAIN_KEYS})
    net = MetaNetwork(MetaNetConfig(**config["metanet"]))
    net = ray.train.torch.prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": True})
    core = net.module if hasattr(net, "module") else net
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
        core.load_state_dict(state["metanet"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1
    run_id = _mlflow_open(config) if rank == 0 and config["mlflow"] else None
    steps = math.ceil(len(rows) / world)  # every worker takes the same number of steps (DDP needs it)
    device = next(core.parameters()).device

    def load_member(i: int):
        record = zoo[rows[i]]  # streamed: one member's graph at a time, memory-mapped from Arrow
        member = make_member(record.id, build_model(record.arch), record.graph.to(device), cfg)
        member.model.to(device)
        return member

    if start == 0 and cfg.distill_epochs > 0:
        mine = [load_member(i) for i in range(rank, len(rows), world)] or [load_member(rank % len(rows))]
        distill_on_workers(core, mine, data, cfg, steps, world)
    for epoch in range(start, cfg.epochs):
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        mine = [int(order[(s * world + rank) % len(rows)]) for s in range(steps)]
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch * world + rank)
        began = time.perf_counter()
        after_step = lambda step, terms: _inject_fault(config.get("fault"), epoch, rank) if step == 0 else None  # noqa: E731
        done = run_epoch(net, opt, (load_member(i) for i in mine), data, cfg, epoch, gen, on_step=after_step)
        sums = torch.tensor([done["task_loss"], done["sparsity_loss"], done["train_acc"], done["steps"]],
                            dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)
        metrics = {"epoch": epoch, "task_loss": float(sums[0] / sums[3]), "sparsity_loss": float(sums[1] / sums[3]),
                   "train_acc": float(sums[2] / sums[3]), "seconds": time.perf_counter() - began,
                   "started_at_epoch": start}
        if rank == 0:  # progress: the demo shows these lines of the job (EPOCH_LINE), not Ray's
            print(f"{EPOCH_LINE} {epoch + 1}/{cfg.epochs}: task loss {metrics['task_loss']:.3f}, sparsity "
                  f"{metrics['sparsity_loss']:.3f}, train acc {100 * metrics['train_acc']:.1f}% "
                  f"({metrics['seconds']:.0f} s)", flush=True)
        every_diag = config["diagnose_every"]
        if rank == 0 and every_diag and ((epoch + 1) % every_diag == 0 or epoch == cfg.epochs - 1):
            metrics.update({f"val_{k}": v for k, v in validation_diagnostics(core, zoo, data, config).items()})
        # checkpoints spread over the run, not the last few: an early one may be the best (the
        # sparsity term can overtake the task loss late in training)
        every = math.ceil(cfg.epochs / max(1, config["keep"]))
        save = (epoch + 1) % every == 0 or epoch == cfg.epochs - 1
        if rank == 0 and run_id:
            import mlflow

            mlflow.log_metrics({k: v for k, v in metrics.items() if k != "epoch" and v == v},
                               step=epoch)  # v == v: NaN (an unreachable speed-up) is not logged
        if rank == 0 and save:
            with tempfile.TemporaryDirectory() as d:
                torch.save({"metanet": core.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                            "metanet_config": config["metanet"]},
                           os.path.join(d, "state.pt"))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics, checkpoint=None)
    if run_id:
        import mlflow

        mlflow.end_run()


def _inject_fault(fault: str | None, epoch: int, rank: int) -> None:
    """Testing hook (``METAPRUNE_FAULT_INJECT=kill-worker:<epoch>:<marker dir>``): the last worker
    dies mid-epoch ``epoch``, once (a marker file remembers), as on an OOM kill or a lost node. It
    first waits a dozen of Ray Train's polls (``distributed.ray_env.TRAIN_HEALTH_CHECK_S``), so that
    the controller has registered the previous epoch's checkpoint: a worker lost sooner restarts
    from the checkpoint before that one."""
    import ray.train

    parts = (fault or "").split(":")
    if len(parts) == 3 and parts[0] == "kill-worker" and int(parts[1]) == epoch \
            and rank == ray.train.get_context().get_world_size() - 1:
        marker = Path(parts[2]) / f"killed-worker-epoch{epoch}"
        if not marker.exists():
            marker.touch()
            time.sleep(3)
            os._exit(1)


def training_rows(meta, min_acc: float) -> list[int]:
    """Zoo rows meta-trained on: training members that trained (status ok) to at least ``min_acc``
    validation accuracy (weak members teach the metanetwork to edit networks nobody would prune)."""
    return [i for i, m in enumerate(meta.itertuples())
            if m.status == "ok" and m.role == "train" and (m.val_acc >= min_acc if min_acc > 0 else True)]


def distill_on_workers(metanet, members, data, cfg, steps: int, world: int) -> None:
    """Distillation (``metanet.meta_training.distill_step``) over this worker's ``members``, the
    same ``steps`` per epoch on every worker, gradients averaged across workers by hand
    (``gate_logits`` bypasses DDP's forward, so DDP does not see these passes)."""
    import torch
    import torch.distributed as dist

    from metanet.meta_training import distill_step, gate_targets

    targets = [gate_targets(m, data, cfg) for m in members]
    opt = torch.optim.AdamW(metanet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.distill_epochs):
        for s in range(steps):
            k = s % len(members)
            opt.zero_grad(set_to_none=True)
            distill_step(metanet, members[k], targets[k])
            if world > 1:
                for p in metanet.parameters():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= world
            opt.step()


def _mlflow_open(config: dict) -> str:
    """Rank 0 logs into the run the driver chose (``mlflow_run``), also after a restart."""
    import mlflow

    from distributed.tracking import use_experiment

    use_experiment("meta-train", config["out"])
    return mlflow.start_run(run_id=config["mlflow_run_id"]).info.run_id


MLFLOW_RUN_NOTE = "mlflow_run_id"  # in a training's folder: the MLflow run it logs into


def mlflow_run(config: dict, training_dir: str) -> str:
    """The MLflow run of one training (one folder, one set of inputs): the run its folder notes, so
    that an interrupted training, resumed, goes on logging into its own run; else a new run with
    the settings as parameters, noted in the folder before any worker starts."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from distributed.tracking import flatten, use_experiment
    from metanet.files import atomic_write_text

    use_experiment("meta-train", config["out"])
    note = os.path.join(training_dir, MLFLOW_RUN_NOTE)
    local = "://" not in training_dir
    if local and os.path.exists(note):
        run_id = Path(note).read_text().strip()
        try:
            if mlflow.get_run(run_id).info.lifecycle_stage == "active":
                return run_id
        except MlflowException:
            pass  # deleted from the store, or another store: a new run
    with mlflow.start_run(run_name=config["name"]) as run:
        mlflow.log_params({k: str(v) for k, v in flatten(config).items()})
    if local:
        os.makedirs(training_dir, exist_ok=True)
        atomic_write_text(note, run.info.run_id)
    return run.info.run_id


def validation_diagnostics(metanet, zoo, data, config: dict) -> dict:
    """``metanet.diagnostics.diagnose`` of the metanetwork's edit, averaged over the first
    ``select_members`` validation members (an empty dict when the zoo has none)."""
    import torch

    from metanet.diagnostics import diagnose
    from metanet.recipe import RecipeConfig, apply_metanetwork
    from metanet.selection import criterion_of
    from metanet.train import TrainConfig

    val = zoo.built("val")[:config["select_members"]]
    if not val:
        return {}
    ft = zoo.finetune_settings()
    cfg = RecipeConfig(before=TrainConfig(steps=0, seed=config["seed"], **ft))
    device = next(metanet.parameters()).device
    was_training = metanet.training
    per = []
    for record in val:
        model = record.network().to(device).eval()
        x = torch.zeros(data.input_shape, device=device)
        per.append(diagnose(model, apply_metanetwork(metanet, model, x), data, cfg, split="val",
                            criterion=criterion_of(metanet, model, x, cfg, data)))
    metanet.train(was_training)
    return {k: sum(d[k] for d in per) / len(per) for k in per[0]}


# ------------------------------------------------------------------------ checkpoint selection
def score_checkpoint(ckpt_path: str, metanet_config: dict, zoo_root: str, data_root: str | None, target: float,
                     steps: int, members: int, seed: int) -> float:
    """Validation score of one checkpoint by the short recipe (a Ray task in ``select``)."""
    import torch

    from metanet.metanetwork import MetaNetConfig, MetaNetwork
    from metanet.selection import score, selection_recipe
    from zoo.store import Zoo

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    zoo = Zoo(zoo_root)
    val = Zoo(zoo_root, skip_unreadable=True).built("val")[:members]
    if not val:
        raise ValueError(f"{zoo_root}: no validation members (role 'val') to select checkpoints with")
    net = MetaNetwork(MetaNetConfig(**metanet_config))
    net.load_state_dict(torch.load(os.path.join(ckpt_path, "state.pt"), weights_only=True)["metanet"])
    recipe = selection_recipe(zoo.finetune_settings(), steps, target=target, seed=seed)
    return score(net, [r.network() for r in val], zoo.dataset(data_root), recipe)


def select(result, config: dict, run_dir, training_dir: str) -> dict:
    """Scores the kept checkpoints on validation members; writes the best as ``run_dir``'s
    metanetwork.pt, and a copy in the training's folder (kept when other settings train later)."""
    import torch

    from metanet.metanetwork import MetaNetConfig, MetaNetwork, save_metanetwork
    from metanet.selection import choose

    candidates, areas = {}, {}
    for ckpt, metrics in result.best_checkpoints:
        candidates[int(metrics["epoch"])] = ckpt.path
        areas[int(metrics["epoch"])] = metrics.get("val_auc", float("nan"))
    epochs = sorted(candidates)
    # the curve areas were computed during training (rank 0's diagnostics): choosing by them is free
    use_auc = config["selection"] == "auc" and all(areas[e] == areas[e] for e in epochs)
    if config["selection"] == "auc" and not use_auc:
        print("meta_train: some kept checkpoints have no validation diagnostics (--diagnose-every); "
              "selecting by the short recipe instead")
    if use_auc:
        scores = {e: areas[e] for e in epochs}
        how = "validation curve area of the edit (mean accuracy right after pruning, BN recalibrated)"
    else:
        task = ray.remote(num_cpus=1)(score_checkpoint)
        refs = [task.remote(candidates[e], config["metanet"], config["zoo"], config["data_root"],
                            config["select_target"], config["select_finetune_steps"], config["select_members"],
                            config["seed"]) for e in epochs]
        scores = dict(zip(epochs, ray.get(refs)))
        how = f"val acc after finetune -> prune to {config['select_target']}x -> finetune"
    best_epoch, best_score = choose(scores)
    net = MetaNetwork(MetaNetConfig(**config["metanet"]))
    net.load_state_dict(torch.load(os.path.join(candidates[best_epoch], "state.pt"), weights_only=True)["metanet"])
    out = f"{run_dir}/metanetwork.pt"  # run_dir: a local path or a URI
    for path in (f"{training_dir}/metanetwork.pt", out):
        save_metanetwork(net, path, epoch=best_epoch, selection_score=best_score, selection=how,
                         zoo=config["zoo"], inputs=config.get("inputs_digest"))
    return {"epochs": epochs, "scores": [scores[e] for e in epochs], "best_epoch": best_epoch,
            "best_score": best_score, "path": out, "how": how}


def _log_selection(config: dict, selection: dict, run_id: str) -> None:
    from distributed.tracking import log_run, use_experiment
    from metanet.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(selection["epochs"], [100 * s for s in selection["scores"]], marker="o")
    ax.axvline(selection["best_epoch"], color="tab:red", ls="--", label="chosen")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation score (%)")
    ax.set_title(f"checkpoint selection: {config['selection']}")
    ax.legend()
    fig.tight_layout()
    figures = {"selection_scores.png": fig}
    if run_id:  # rank 0's run: its metric history has the diagnostics of every epoch
        use_experiment("meta-train", config["out"])
        diagnostics = _diagnostics_figure(run_id)
        if diagnostics is not None:
            figures["validation_diagnostics.png"] = diagnostics
    log_run("meta-train", config["out"], run_id=run_id or None, run_name=config["name"],
            metrics={"chosen_epoch": selection["best_epoch"], "chosen_score": selection["best_score"]},
            step_metrics={"selection_score": list(zip(selection["epochs"], selection["scores"]))},
            artifacts=[selection["path"]], figures=figures)
    for f in figures.values():
        plt.close(f)


def _diagnostics_figure(run_id: str):
    """The per-epoch validation diagnostics (MLflow metric history) as one figure (None if none)."""
    import mlflow

    from metanet.plotting import pyplot

    client = mlflow.MlflowClient()
    panels = [("val_auc", "curve area (%)", 100), ("val_ratio_spread", "ratio spread", 1),
              ("val_share_below_0.1", "channels below 0.1 (%)", 100), ("val_acc_recal", "acc after recal (%)", 100)]
    history = {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k, _, _ in panels}
    if not any(history.values()):
        return None
    fig, axes = pyplot().subplots(1, len(panels), figsize=(15, 3.4))
    for ax, (key, title, scale) in zip(axes, panels):
        ax.plot([s + 1 for s, _ in history[key]], [scale * v for _, v in history[key]], marker="o")
        ax.set_title(title)
        ax.set_xlabel("epochs done")
        ax.grid(alpha=0.3)
    fig.suptitle("validation members: the edit's diagnostics during meta-training")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------- driver
def build_parser() -> argparse.ArgumentParser:
    from distributed.settings import add_flags

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, DEFAULTS, helps=HELP)
    p.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, or the job's cluster, else local)")
    p.add_argument("--check", action="store_true", help="only say whether a metanetwork from these settings and "
                   "this zoo is there (exit 0) or would be trained (exit 1), without starting Ray (make meta-train "
                   "asks before it starts a head) (default: off)")
    return p


def parse_args(argv=None) -> dict:
    from distributed.settings import resolve

    config = resolve(vars(build_parser().parse_args(argv)), DEFAULTS, "meta_train", "meta_train")
    if config["selection"] not in OBJECTIVES:
        raise SystemExit(f"meta_train: --selection must be one of {', '.join(OBJECTIVES)}, not {config['selection']!r}")
    if config["bn_mode"] not in ("eval", "train"):
        raise SystemExit(f"meta_train: --bn-mode must be eval or train, not {config['bn_mode']!r}")
    from metanet.metanetwork import EDITS

    if config["edit"] not in EDITS:
        raise SystemExit(f"meta_train: --edit must be one of {', '.join(EDITS)}, not {config['edit']!r}")
    from metanet.sparsity import SPARSITY_FORMS

    if config["sparsity_norm"] not in SPARSITY_FORMS:
        raise SystemExit(f"meta_train: --sparsity-norm must be one of {', '.join(SPARSITY_FORMS)}, "
                         f"not {config['sparsity_norm']!r}")
    from metanet.meta_training import OBJECTIVES as TRAINING_OBJECTIVES

    if config["objective"] not in TRAINING_OBJECTIVES:
        raise SystemExit(f"meta_train: --objective must be one of {', '.join(TRAINING_OBJECTIVES)}, "
                         f"not {config['objective']!r}")
    if config["objective"] == "curve" and config["edit"] == DEFAULTS["edit"]:
        config["edit"] = "scores"  # the curve objective trains a criterion: its edit is the scores
    if (config["objective"] == "curve") != (config["edit"] == "scores"):
        raise SystemExit(f"meta_train: --edit {config['edit']} with --objective {config['objective']}: a learned "
                         "criterion (--edit scores) is trained with --objective curve, an edit with --objective paper")
    if config["distill_epochs"] and config["edit"] == "additive":
        raise SystemExit("meta_train: --distill-epochs needs a gate edit (--edit gate): the additive edit has no gates")
    for key in ("zoo", "out"):  # Ray Train's workers run in another directory: hand them absolute paths
        if "://" not in config[key] and not os.path.isabs(config[key]):
            config[key] = os.path.abspath(config[key])
    return config


# settings that do not change the chosen metanetwork (where Ray runs, logging, retries)
NOT_RESULT_SETTINGS = ("address", "mlflow", "max_failures", "check")


def inputs_digest(config: dict, zoo) -> str | None:
    """What decides the chosen metanetwork: the settings (not ``NOT_RESULT_SETTINGS``) and the
    content of the zoo's training and validation member files. None for a zoo behind a URI."""
    import hashlib
    import json

    from zoo.batch import file_digest

    if "://" in config["zoo"]:
        return None
    meta = zoo.metadata()
    files = sorted({path for (path, _), role in zip(zoo.index(), meta.role) if role in ("train", "val")})
    members = {os.path.basename(f): file_digest(f) for f in files}
    settings = {k: v for k, v in sorted(config.items()) if k not in NOT_RESULT_SETTINGS}
    return hashlib.sha256(json.dumps([settings, members], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prepare(config: dict):
    """The checks and derived settings every run needs before Ray starts: (zoo, run directory,
    digest of the inputs); refuses unreadable training or validation members by name."""
    from zoo.store import Zoo

    zoo = Zoo(config["zoo"], skip_unreadable=True)
    meta = zoo.metadata()
    for path, error in zoo.unreadable.items():
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
    config["metanet"] = {"edge_widths": zoo.edge_widths(), "hidden": config["hidden"],
                         "layers": config["layers"], "residual": config["residual"], "backend": config["backend"],
                         "edit": config["edit"], "evidence": config["evidence"],
                         "calibration": config["calibration"]}
    if "://" in config["out"]:  # Ray Train and pyarrow take URIs; pathlib would fold "s3://" into "s3:/"
        return zoo, f"{config['out'].rstrip('/')}/{config['name']}", inputs_digest(config, zoo)
    out = Path(config["out"]).resolve()
    config["out"] = str(out)
    return zoo, out / config["name"], inputs_digest(config, zoo)


def training_folder(run_dir, config: dict, digest: str | None) -> str:
    """``run_dir``'s folder for the training these inputs make (a local path or a URI)."""
    return f"{run_dir}/{training_name(config, digest)}"


def training_name(config: dict, digest: str | None) -> str:
    """The folder (Ray Train's run name, under ``<out>/<name>``) of the training these inputs
    make. Ray Train resumes whatever run it finds under a name: other settings or another zoo
    must not resume this one's checkpoints, so each set of inputs has its own folder."""
    import hashlib
    import json

    if digest is None:  # a zoo behind a URI: its member files are not hashed, its address and the settings are
        settings = {k: v for k, v in sorted(config.items()) if k not in NOT_RESULT_SETTINGS}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"training-{digest}"


def already_done(config: dict, run_dir, digest: str | None) -> str | None:
    """``run_dir``'s metanetwork.pt if an earlier run with the same inputs (``inputs_digest``)
    chose it, else None. When it holds another run's choice but this run's own training folder
    kept its copy (settings changed and changed back), that copy becomes ``run_dir``'s again."""
    from metanet.files import atomic_write
    from metanet.metanetwork import MetanetFileError, load_metanetwork

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


def completed(argv=None) -> str | None:
    """For callers that would start Ray only to learn it: the metanetwork a run with ``argv``
    would reuse as it is, or None (the demo asks before it starts a head for the job)."""
    config = parse_args(argv)
    _, run_dir, digest = _prepare(config)
    return already_done(config, run_dir, digest)


def main(argv=None) -> dict:
    config = parse_args(argv)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    zoo, run_dir, digest = _prepare(config)
    done = already_done(config, run_dir, digest)
    if config.pop("check"):
        print(f"meta_train: {done} comes from this zoo and these settings" if done else
              f"meta_train: no metanetwork from this zoo and these settings in {run_dir}: a run would train one")
        raise SystemExit(0 if done else 1)
    if done:
        print(f"meta_train: {done} already comes from this zoo and these settings: nothing to do "
              f"(to train again: another --name, or delete {run_dir})")
        return {"selection": None, "metrics": {}, "run_dir": str(run_dir), "reused": done}
    training = training_name(config, digest)
    folder = training_folder(run_dir, config, digest)
    config["inputs_digest"] = digest
    if config["mlflow"]:
        config["mlflow_run_id"] = mlflow_run(config, folder)
    address = config.pop("address")
    # read by Ray Train's controller when the trainer starts: set before it exists
    os.environ.update(train_env(local=cluster_address(address) is None))
    init_ray(address)
    threads = max(1, int(ray.cluster_resources().get("CPU", 1) // config["workers"]))
    config["threads"] = threads
    config["fault"] = os.environ.get(FAULT_ENV)
    trainer = TorchTrainer(
        train_func, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=config["workers"], use_gpu=config["gpu"],
                                     resources_per_worker={"CPU": threads}),
        run_config=RunConfig(name=training, storage_path=str(run_dir),
                             checkpoint_config=CheckpointConfig(num_to_keep=config["keep"]),
                             failure_config=FailureConfig(max_failures=config["max_failures"])))
    started = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise SystemExit(f"meta_train: training failed: {result.error}")
    print(f"meta-training done in {time.perf_counter() - started:.0f} s; final metrics {result.metrics}")
    if result.metrics.get("started_at_epoch"):
        print(f"the last workers started from the checkpoint of epoch {result.metrics['started_at_epoch'] - 1} "
              "(a resumed run, or workers restarted after a failure)")
    selection = select(result, config, run_dir, folder)
    print(f"checkpoint selection on validation members ({selection['how']}):")
    for e, s in zip(selection["epochs"], selection["scores"]):
        print(f"  epoch {e:>3}: {100 * s:6.2f}%{'  <- chosen' if e == selection['best_epoch'] else ''}")
    print(f"wrote {selection['path']}")
    if config["mlflow"]:
        _log_selection(config, selection, config["mlflow_run_id"])
    return {"selection": selection, "metrics": result.metrics, "run_dir": str(run_dir)}


# the errors a user's input can cause: one line and exit code 2 (distributed.cli)
KNOWN_ERRORS = (ZooFormatError, DatasetError, SettingsError, FileNotFoundError)


def cli(argv=None) -> None:
    run_cli(main, "meta_train", KNOWN_ERRORS, argv)


if __name__ == "__main__":
    cli()
