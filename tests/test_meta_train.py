"""Distributed meta-training: `ray job submit` on a local head end to end, and kill-and-resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed.ray_env import NODE_ENV
from metanet.metanetwork import load_metanetwork

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
ENV = {**os.environ, **NODE_ENV}
ENV.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    from conftest import build_digits_zoo

    path = tmp_path_factory.mktemp("zoo") / "zoo"
    zoo = build_digits_zoo(path, members=4, val=0.25, test=0.0, seed=4)  # seed 4: 3 train, 1 val
    assert sorted(zoo.metadata().role) == ["train", "train", "train", "val"]
    return str(path)


def _meta_args(zoo, out, epochs, objective="paper"):
    """Small settings; ``objective`` None: the default objective's own (layers, inputs, targets)."""
    small = ["--objective", objective, "--layers", "1"] if objective else ["--score-targets", "1"]
    return ["--zoo", zoo, "--out", out, "--workers", "2", "--epochs", str(epochs), "--keep", "2", "--hidden", "8",
            "--select-members", "1", "--batches-per-step", "1", "--batch-size", "64", *small]


def _registered_epochs(run_dir) -> list[int]:
    """Epochs of the checkpoints Ray Train has registered (a checkpoint folder alone may not be, yet)."""
    import json

    try:
        snapshot = json.loads(next(run_dir.glob("training-*/checkpoint_manager_snapshot.json")).read_text())
        return sorted(int(c["metrics"]["epoch"]) for c in snapshot["checkpoint_results"])
    except (StopIteration, FileNotFoundError, ValueError, KeyError):
        return []


def _wait_until_settled(run_dir, quiet: float = 2.0, limit: float = 60.0) -> None:
    """Waits until no checkpoint folder has appeared for ``quiet`` seconds."""
    seen, since, deadline = None, time.time(), time.time() + limit
    while time.time() < deadline:
        now = sorted(p.name for p in run_dir.glob("training-*/checkpoint_*"))
        if now != seen:
            seen, since = now, time.time()
        elif time.time() - since >= quiet:
            return
        time.sleep(0.2)


@pytest.mark.timeout(1800)
def test_a_killed_driver_or_worker_resumes_to_the_same_end(tiny_zoo, tmp_path, request):
    # a checkpoint every epoch (--keep 12), an epoch a third of a second: the kill lands with epochs
    # left to resume, also if the killed run's workers go on for a second before they die
    epochs = 12
    # --selection auc: the curve areas come with the per-epoch diagnostics; this test is about resuming
    args = _meta_args(tiny_zoo, str(tmp_path / "killed"), epochs) + ["--keep", str(epochs), "--selection", "auc"]
    cmd = [sys.executable, str(ROOT / "pipelines/meta_train.py"), *args]
    # the other run, beside this one (its own local Ray): it loses a Ray Train worker mid-epoch 3
    # (os._exit); FailureConfig restarts the workers from the last checkpoint (epoch 2) and the
    # run ends where an uninterrupted one would
    straight_log = open(tmp_path / "straight.log", "w+")
    straight = subprocess.Popen([sys.executable, str(ROOT / "pipelines/meta_train.py"),
                                 *_meta_args(tiny_zoo, str(tmp_path / "straight"), epochs), "--keep", str(epochs),
                                 "--no-mlflow", "--selection", "auc"],
                                env={**ENV, "METAPRUNE_FAULT_INJECT": f"kill-worker:3:{tmp_path}"},
                                stdout=straight_log, stderr=subprocess.STDOUT, text=True)
    request.addfinalizer(lambda: (straight.kill(), straight.wait(), straight_log.close()))  # also on a failure
    proc = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "killed" / "metanet"
    deadline = time.time() + 600
    while time.time() < deadline and not _registered_epochs(run_dir):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray, once a checkpoint is registered
    proc.wait()
    _wait_until_settled(run_dir)  # Ray's workers outlive their driver by a moment
    last = _registered_epochs(run_dir)[-1]  # a resume starts after this checkpoint at least
    assert last < epochs - 1, f"the run had finished (epoch {last}) before the kill: nothing to resume"
    import torch  # every checkpoint written before the kill (Ray may register a later one than its snapshot said)

    def epoch_of(path):  # None for a file the kill cut short while Ray copied it (never registered)
        try:
            return torch.load(path, weights_only=True)["epoch"]
        except (OSError, RuntimeError, EOFError):
            return None

    written = sorted(e for e in (epoch_of(d / "state.pt") for d in run_dir.glob("training-*/checkpoint_*")
                                 if (d / "state.pt").exists()) if e is not None)
    resumed = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert straight.wait(timeout=900) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    straight_out = (tmp_path / "straight.log").read_text()
    assert (tmp_path / "killed-worker-epoch3").exists()  # a worker really died
    assert "the last workers started from the checkpoint of epoch 2" in straight_out, straight_out[-2000:]

    def final(text):
        line = next(l for l in text.splitlines() if l.startswith("meta-training done"))
        return eval(line.split("final metrics ", 1)[1])  # a dict printed by the pipeline

    a, b = final(resumed.stdout), final(straight_out)
    # both really resumed: the killed driver's run after its last registered checkpoint, the
    # restarted workers after epoch 2; a run that started over would say 0
    seen = (f"resumed run {a}, restarted run {b}, last registered checkpoint before the kill: epoch {last}, "
            f"checkpoints written: {written}")
    assert a["epoch"] == b["epoch"] == epochs - 1, seen
    assert a["started_at_epoch"] - 1 in written and a["started_at_epoch"] >= last + 1, seen
    assert b["started_at_epoch"] == 3, seen
    assert a["task_loss"] == pytest.approx(b["task_loss"], rel=0.05)
    assert a["sparsity_loss"] == pytest.approx(b["sparsity_loss"], rel=0.05)
    # the resumed training logged into the MLflow run it started: one run, every epoch in it
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/killed/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["meta-train"])
    assert len(runs) == 1, runs
    history = mlflow.MlflowClient().get_metric_history(runs.iloc[0]["run_id"], "task_loss")
    assert {m.step for m in history} == set(range(epochs))
    assert runs.iloc[0]["params.lr"] and runs.iloc[0]["metrics.chosen_epoch"] >= 0  # params and the selection


def test_a_finished_run_with_the_same_inputs_is_reused_without_ray(tmp_path, capsys):
    """The demo asks `completed` before it starts a head: a metanetwork made from the same zoo
    files and settings is reused; another setting or a changed training member means a new run."""
    from conftest import build_digits_zoo
    from metanet.metanetwork import MetaNetConfig, MetaNetwork, save_metanetwork

    from zoo.meta_runs import prepare, training_name

    sys.path.insert(0, str(ROOT / "pipelines"))
    import meta_train

    zoo = build_digits_zoo(tmp_path / "zoo")
    argv = ["--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "out"), "--epochs", "2"]
    config = meta_train.parse_args(argv)
    _, run_dir, digest = prepare(config)
    assert meta_train.completed(argv) is None  # nothing there yet
    run_dir.mkdir(parents=True)
    save_metanetwork(MetaNetwork(MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=4, layers=1)),
                     str(run_dir / "metanetwork.pt"), inputs=digest)
    assert meta_train.completed(argv) == str(run_dir / "metanetwork.pt")
    for flags, code in (([], 0), (["--lr", "0.01"], 1)):  # make meta-train asks this before it starts a head
        with pytest.raises(SystemExit) as stopped:
            meta_train.main([*argv, *flags, "--check"])
        assert stopped.value.code == code
    assert meta_train.completed([*argv, "--no-mlflow", "--max-failures", "0"]) is not None  # not result settings
    assert meta_train.completed([*argv, "--register", "x"]) is not None
    assert meta_train.completed([*argv, "--lr", "0.01"]) is None
    # other settings trained since: the current file is theirs, this training's folder kept its copy
    other = meta_train.parse_args([*argv, "--lr", "0.01"])
    other_digest = prepare(other)[2]
    assert training_name(other, other_digest) != training_name(config, digest)
    current = run_dir / "metanetwork.pt"
    kept = run_dir / training_name(config, digest) / "metanetwork.pt"
    kept.parent.mkdir()
    os.replace(current, kept)
    save_metanetwork(MetaNetwork(MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=4, layers=1)), str(current),
                     inputs=other_digest)
    assert meta_train.completed(argv) == str(current)  # switched back, without training
    assert load_metanetwork(str(current))[1]["inputs"] == digest
    assert meta_train.completed([*argv, "--lr", "0.01"]) is None  # its own copy was never kept
    # a reused training is registered when asked, without Ray
    meta_train.main([*argv, "--register", "reused"])
    assert "registered as models:/reused/1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="registers in MLflow: drop --no-mlflow"):
        meta_train.parse_args([*argv, "--register", "reused", "--no-mlflow"])
    uri = meta_train.parse_args(["--zoo", str(tmp_path / "zoo"), "--out", f"file://{tmp_path}/remote/"])
    assert prepare(uri)[1] == f"file://{tmp_path}/remote/metanet"  # a URI stays a URI
    assert meta_train.completed(["--zoo", str(tmp_path / "zoo"), "--out", f"file://{tmp_path}/remote"]) is None
    train_file = next(p for (p, _), role in zip(zoo.index(), zoo.metadata().role) if role == "train")
    import pyarrow as pa

    with pa.OSFile(train_file, "rb") as source:  # the member's file rewritten with other bytes, still readable
        table = pa.ipc.open_file(source).read_all()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"touched": b"1"})
    with pa.OSFile(train_file + ".tmp", "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(train_file + ".tmp", train_file)  # a new file: readers' memory maps keep the old one
    from zoo.store import Zoo

    Zoo(str(tmp_path / "zoo")).write_manifest()  # a rebuilt member: make_zoo records its new digest
    assert meta_train.completed(argv) is None


def test_a_training_logs_into_one_mlflow_run_however_often_it_restarts(tmp_path, monkeypatch):
    """The driver notes the training's MLflow run in its folder before any worker starts: a
    resumed training (killed before its first checkpoint, too) logs into its own run."""
    import mlflow

    from distributed.tracking import resumable_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = {"out": str(tmp_path), "name": "metanet", "lr": 0.1}

    def run_of(folder):
        return resumable_run("meta-train", str(tmp_path), folder, "metanet", config)

    folder = str(tmp_path / "metanet" / "training-a")
    first = run_of(folder)
    assert run_of(folder) == first
    assert mlflow.get_run(first).data.params["lr"] == "0.1"
    other = run_of(str(tmp_path / "metanet" / "training-b"))  # other inputs
    assert other != first
    mlflow.delete_run(first)  # a user deleted it in the UI: a new run, noted instead
    again = run_of(folder)
    assert again not in (first, other) and run_of(folder) == again


def test_the_curve_objective_trains_a_criterion_with_ray_train(tiny_zoo, tmp_path):
    """The default objective (curve; the per-channel MLP reading calibration statistics and the curve
    gradient, regressed on each member's curve scores) on 2 Ray Train workers (DDP: the scores go
    through the wrapper's forward): a ``scores`` metanetwork comes out, and it prunes a member by
    its scores."""
    import torch

    from metanet.recipe import prune_with_method, recipe_from_settings
    from zoo.store import Zoo

    out = subprocess.run([sys.executable, str(ROOT / "pipelines/meta_train.py"),
                          *_meta_args(tiny_zoo, str(tmp_path / "out"), 2, objective=None),
                          "--register", "criterion"], env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'epoch': 1, " in out.stdout and "'sparsity_loss': 0.0," in out.stdout, out.stdout[-2000:]
    # registered in the run's MLflow store: read back by its URI, the same weights
    assert "the chosen metanetwork is the MLflow model models:/criterion/1" in out.stdout, out.stdout[-2000:]
    from distributed.model_registry import local_file

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/out/mlflow.db"
    registered = load_metanetwork(local_file("models:/criterion/1"))[0]
    net, extra = load_metanetwork(str(tmp_path / "out" / "metanet" / "metanetwork.pt"))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), registered.state_dict().values()))
    assert net.config.edit == "scores" and net.config.calibration and net.config.gradient and net.config.evidence
    assert net.config.layers == 0 and "curve area" in extra["selection"]
    zoo = Zoo(tiny_zoo)
    data = zoo.dataset()
    member = zoo.built("val")[0].network()
    cfg = recipe_from_settings({"before_steps": 2, "before_lr": 0.01, "after_steps": 2, "after_lr": 0.01},
                               batch_size=64, target=2.0)
    torch.manual_seed(0)
    _, record = prune_with_method(member, data, "meta", cfg, net)
    assert record["criterion"] == "scores" and record["speedup"] >= 2.0


def test_the_weight_curve_objective_trains_a_weight_level_criterion_with_ray_train(tiny_zoo, tmp_path):
    """``--objective weight_curve`` on 2 Ray Train workers (DDP: the per-weight corrections go
    through the wrapper's forward): a ``weight_scores`` metanetwork, its checkpoint chosen by the
    weight-level curve area, and it prunes a member's weights."""
    import torch

    from metanet.recipe import prepare, prune_and_finetune, recipe_from_settings
    from metanet.weight_pruning import WeightPruning
    from zoo.store import Zoo

    out = subprocess.run([sys.executable, str(ROOT / "pipelines/meta_train.py"),
                          *_meta_args(tiny_zoo, str(tmp_path / "out"), 2), "--objective", "weight_curve",
                          "--no-mlflow"], env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    net, extra = load_metanetwork(str(tmp_path / "out" / "metanet" / "metanetwork.pt"))
    assert net.config.edit == "weight_scores" and "weight-level curve area" in extra["selection"]
    zoo = Zoo(tiny_zoo)
    data = zoo.dataset()
    cfg = recipe_from_settings({"before_steps": 0, "before_lr": 0.01, "after_steps": 2, "after_lr": 0.01},
                               batch_size=64)
    torch.manual_seed(0)
    prepared = prepare(zoo.built("val")[0].network(), data, "meta", cfg, net, level="weights")
    _, record = prune_and_finetune(prepared, data, cfg, weights=WeightPruning(sparsity=0.8), metanet=net)
    assert record["criterion"] == "learned" and record["sparsity_measured"] >= 0.8 - 1e-3
