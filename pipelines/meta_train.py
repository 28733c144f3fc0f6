"""Distributed meta-training of the metanetwork with Ray Train, then checkpoint selection.

    python pipelines/meta_train.py --zoo runs/zoo-digits --workers 2     # a local Ray, started and stopped
    make meta-train                   # a Ray job on a local head that make starts and stops, as below
    RAY_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token \
      ray job submit --working-dir $(python -m distributed.job_snapshot) -- \
      python pipelines/meta_train.py --zoo $PWD/runs/zoo-digits --out $PWD/runs/meta-train --workers 2

Inside a job, relative paths are relative to the job's own copy of the code: give ``--zoo`` and
``--out`` as absolute paths (or URIs); run directly, relative paths (``--data-root`` too) are made
absolute here.

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

Then a checkpoint is chosen among the kept ones (never with the test split): for an edit (by
default ``--selection recipe``) each is scored by a short recipe (metanetwork -> finetune -> prune to
``--select-target`` -> finetune -> validation accuracy), one Ray task per checkpoint; with
``--selection auc`` (the default for ``--objective curve``), the one with the largest validation
curve area (free: it was logged during training). Each default is the score that ranked checkpoints
better by what the full recipe later reaches (``bench/selection.py``, docs/method.md: for the edit
the short recipe, Spearman 0.67 and 0.82 against -0.75; for a learned criterion the curve area,
0.61 against 0.57 and 0.36). MLflow (rank 0 and the driver): params, per-epoch
loss terms and diagnostics, selection scores and their plot, the chosen metanetwork.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed.cli import run_cli, training_error  # noqa: E402
from distributed.faults import FAULT_ENV, inject_fault  # noqa: E402
from distributed.ray_env import check_total, cluster_address, init_ray, preflight, ray, train_env  # noqa: E402
from distributed.settings import SettingsError  # noqa: E402
from zoo.data import DatasetError  # noqa: E402
from zoo.meta_runs import already_done, log_model, log_selection, prepare, select, training_folder, training_name  # noqa: E402
from zoo.meta_settings import DEFAULTS, HELP, LIMITS, TYPES, check_settings  # noqa: E402
from zoo.store import ZooFormatError  # noqa: E402

EPOCH_LINE = "meta-training epoch"  # what rank 0 prints after each epoch (the demo shows these lines)


# --------------------------------------------------------------------------- the training loop
def train_func(config: dict) -> None:
    """One Ray Train worker: reads like single-process meta-training, over this worker's members."""
    import torch
    import torch.distributed as dist

    import ray.train
    import ray.train.torch
    from metanet.diagnostics import mean_diagnostics
    from metanet.meta_training import distill_across_workers, make_member, run_epoch
    from metanet.objectives import objective
    from metanet.metanetwork import MetaNetConfig, MetaNetwork
    from metanet.recipe import RecipeConfig
    from metanet.train import TrainConfig
    from zoo.arch import build_model
    from zoo.meta_runs import training_rows
    from zoo.meta_settings import train_config
    from zoo.store import Zoo

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    # the driver checked that no train/val member is unreadable, and chose what to do with damaged ones
    zoo = Zoo(config["zoo"], skip_unreadable=True, exclude=config.get("excluded_members"))
    data = zoo.dataset(config["data_root"])
    rows = training_rows(zoo.metadata(), config["min_member_acc"])
    cfg = train_config(config)
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
    # validation members for the diagnostics, with the zoo's finetuning settings (rank 0 only)
    diag_recipe = RecipeConfig(before=TrainConfig(steps=0, seed=config["seed"], **zoo.finetune_settings()))

    def load_member(i: int):
        record = zoo[rows[i]]  # streamed: one member's graph at a time, memory-mapped from Arrow
        member = make_member(record.id, build_model(record.arch), record.graph.to(device), cfg)
        member.model.to(device)
        return member

    if start == 0 and cfg.distill_epochs > 0:
        mine = [load_member(i) for i in range(rank, len(rows), world)] or [load_member(rank % len(rows))]
        distill_across_workers(core, mine, data, cfg, steps)
    for epoch in range(start, cfg.epochs):
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        mine = [int(order[(s * world + rank) % len(rows)]) for s in range(steps)]
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch * world + rank)
        began = time.perf_counter()
        after_step = lambda step, terms: inject_fault(config.get("fault"), epoch, rank, world) if step == 0 else None  # noqa: E731
        done = run_epoch(net, opt, (load_member(i) for i in mine), data, cfg, epoch, gen, on_step=after_step)
        sums = torch.tensor([done["task_loss"], done["sparsity_loss"], done["train_acc"], done["steps"]],
                            dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)
        metrics = {"epoch": epoch, "task_loss": float(sums[0] / sums[3]), "sparsity_loss": float(sums[1] / sums[3]),
                   "train_acc": float(sums[2] / sums[3]), "seconds": time.perf_counter() - began,
                   "started_at_epoch": start}
        if rank == 0:
            sparsity = f", sparsity {metrics['sparsity_loss']:.3f}" if objective(cfg.objective).sparsity_term else ""
            print(f"{EPOCH_LINE} {epoch + 1}/{cfg.epochs}: task loss {metrics['task_loss']:.3f}{sparsity}, train acc "
                  f"{100 * metrics['train_acc']:.1f}% ({metrics['seconds']:.0f} s)", flush=True)
        every_diag = config["diagnose_every"]
        if rank == 0 and every_diag and ((epoch + 1) % every_diag == 0 or epoch == cfg.epochs - 1):
            val = [r.network() for r in zoo.built("val")[:config["select_members"]]]
            metrics.update({f"val_{k}": v for k, v in mean_diagnostics(core, val, data, diag_recipe).items()})
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


def _mlflow_open(config: dict) -> str:
    """Rank 0 logs into the run the driver chose (``resumable_run``), also after a restart."""
    import mlflow

    from distributed.tracking import use_experiment

    use_experiment("meta-train", config["out"])
    return mlflow.start_run(run_id=config["mlflow_run_id"]).info.run_id


def _score_on_ray(config: dict):
    """The short recipe for each checkpoint folder, one Ray task each."""
    from zoo.meta_runs import score_checkpoint

    task = ray.remote(num_cpus=1)(score_checkpoint)

    def score_all(folders: list[str]) -> list[float]:
        return ray.get([task.remote(f, config["metanet"], config["zoo"], config["data_root"], config["select_target"],
                                    config["select_finetune_steps"], config["select_members"], config["seed"],
                                    config["objective"], config.get("excluded_members")) for f in folders])
    return score_all


# ------------------------------------------------------------------------------------- driver
def build_parser() -> argparse.ArgumentParser:
    from distributed.settings import add_flags

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, DEFAULTS, types=TYPES, helps=HELP)
    p.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, or the job's cluster, else local)")
    p.add_argument("--check", action="store_true", help="only say whether a metanetwork from these settings and "
                   "this zoo is there (exit 0) or would be trained (exit 1), without starting Ray (make meta-train "
                   "asks before it starts a head) (default: off)")
    return p


def parse_args(argv=None) -> dict:
    from distributed.settings import resolve

    return check_settings(resolve(vars(build_parser().parse_args(argv)), DEFAULTS, "meta_train", "meta_train",
                                  types=TYPES, limits=LIMITS))


def completed(argv=None) -> str | None:
    """For callers that would start Ray only to learn it: the metanetwork a run with ``argv``
    would reuse as it is, or None (the demo asks before it starts a head for the job)."""
    config = parse_args(argv)
    _, run_dir, digest = prepare(config)
    return already_done(config, run_dir, digest)


def main(argv=None) -> dict:
    config = parse_args(argv)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    zoo, run_dir, digest = prepare(config)
    done = already_done(config, run_dir, digest)
    if config.pop("check"):
        print(f"meta_train: {done} comes from this zoo and these settings" if done else
              f"meta_train: no metanetwork from this zoo and these settings in {run_dir}: a run would train one")
        raise SystemExit(0 if done else 1)
    if done:
        print(f"meta_train: {done} already comes from this zoo and these settings: nothing to do "
              f"(to train again: another --name, or delete {run_dir})")
        if config["register"]:  # the training is reused; its metanetwork is registered now, into its own run
            from distributed.tracking import resumable_run, tracking_uri

            run_id = resumable_run("meta-train", config["out"], training_folder(run_dir, config, digest), config["name"],
                                   config)
            uri = log_model(config, done, run_id)
            print(f"mlflow: {done} registered as {uri} (store {tracking_uri(config['out'])})")
        return {"selection": None, "metrics": {}, "run_dir": str(run_dir), "reused": done}
    preflight(config["workers"], f"meta_train: --workers {config['workers']}", config["address"])
    folder = training_folder(run_dir, config, digest)
    config["inputs_digest"] = digest
    if config["mlflow"]:
        from distributed.tracking import check_server, resumable_run, tracking_uri

        check_server()

        config["mlflow_run_id"] = resumable_run("meta-train", config["out"], folder, config["name"], config)
    address = config.pop("address")
    # read by Ray Train's controller when the trainer starts: set before it exists
    os.environ.update(train_env(local=cluster_address(address) is None))
    resources = init_ray(address)
    check_total(config["workers"], config["workers"] if config["gpu"] else 0,
                f"meta_train: --workers {config['workers']}{' --gpu' * config['gpu']}")  # one CPU (GPU) each
    threads = max(1, int(resources.get("CPU", 1) // config["workers"]))
    config["threads"] = threads
    config["fault"] = os.environ.get(FAULT_ENV)
    trainer = TorchTrainer(
        train_func, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=config["workers"], use_gpu=config["gpu"],
                                     resources_per_worker={"CPU": threads}),
        run_config=RunConfig(name=training_name(config, digest), storage_path=str(run_dir),
                             checkpoint_config=CheckpointConfig(num_to_keep=config["keep"]),
                             failure_config=FailureConfig(max_failures=config["max_failures"])))
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:  # a worker's error after --max-failures restarts, or the controller's
        raise SystemExit(f"meta_train: training failed: {training_error(err)} (the checkpoints so far are kept in "
                         f"{folder}: the same command resumes from the last)") from None
    if result.error:
        raise SystemExit(f"meta_train: training failed: {training_error(result.error)}")
    print(f"meta-training done in {time.perf_counter() - started:.0f} s; final metrics {result.metrics}")
    if result.metrics.get("started_at_epoch"):
        print(f"the last workers started from the checkpoint of epoch {result.metrics['started_at_epoch'] - 1} "
              "(a resumed run, or workers restarted after a failure)")
    kept = {int(m["epoch"]): c.path for c, m in result.best_checkpoints}
    areas = {int(m["epoch"]): m.get("val_auc", float("nan")) for _, m in result.best_checkpoints}
    selection = select(kept, areas, config, run_dir, folder, _score_on_ray(config))
    print(f"checkpoint selection on validation members ({selection['how']}):")
    for e, s in zip(selection["epochs"], selection["scores"]):
        print(f"  epoch {e:>3}: {100 * s:6.2f}%{'  <- chosen' if e == selection['best_epoch'] else ''}")
    print(f"wrote {selection['path']}")
    if config["mlflow"]:
        log_selection(config, selection, config["mlflow_run_id"])
        selection["model_uri"] = log_model(config, selection["path"], config["mlflow_run_id"])
        print(f"mlflow: the chosen metanetwork is the MLflow model {selection['model_uri']} (store "
              f"{tracking_uri(config['out'])})")
    return {"selection": selection, "metrics": result.metrics, "run_dir": str(run_dir)}


# the errors a user's input can cause: one line and exit code 2 (distributed.cli)
KNOWN_ERRORS = (ZooFormatError, DatasetError, SettingsError, FileNotFoundError)


def cli(argv=None) -> None:
    run_cli(main, "meta_train", KNOWN_ERRORS, argv)


if __name__ == "__main__":
    cli()
