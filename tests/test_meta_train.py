"""Distributed meta-training: `ray job submit` on a local head end to end, and kill-and-resume."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distributed.job_snapshot import snapshot
from distributed.ray_env import NODE_ENV
from metanet.metanetwork import load_metanetwork

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
ENV = {**os.environ, **NODE_ENV}
ENV.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zoo")
    spec = yaml.safe_load((ROOT / "zoo/specs/digits.yaml").read_text())
    spec.update(members=4, output=str(tmp / "zoo"), val_members=0.25, seed=2)  # seed 2: 3 train, 1 val
    spec["families"] = [{"family": "resnet", "depths": [8], "stage_widths": [[4], [6], [8]], "shortcut": ["identity"]}]
    spec["train"]["epochs"], spec["finetune"]["epochs"] = 2, 1
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, str(ROOT / "pipelines/make_zoo.py"), "--spec", str(tmp / "spec.yaml"),
                          "--num-cpus", "2", "--no-mlflow"], env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return str(tmp / "zoo")


def _meta_args(zoo, out, epochs):
    return ["--zoo", zoo, "--out", out, "--workers", "2", "--epochs", str(epochs), "--keep", "2", "--hidden", "8",
            "--layers", "1", "--select-members", "1", "--batches-per-step", "1", "--batch-size", "64"]


def test_ray_job_submit_on_a_local_head(tiny_zoo, tmp_path):
    pidfile = str(tmp_path / "head.pid")
    start = subprocess.run([sys.executable, "-m", "distributed.local_head", "start", "--pidfile", pidfile,
                            "--num-cpus", "2", "--port", "6391", "--dashboard-port", "8266"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    pgid = int(Path(pidfile).read_text())
    try:
        # the job's code from a snapshot (as make meta-train and make demo submit it), while a log
        # grows inside the repository: with --working-dir . that made the upload fail (issue 12)
        code = snapshot(root=str(ROOT))
        log = ROOT / f"test-growing-{os.getpid()}.log"  # in the repository, not git-ignored: like demo.log
        writer = subprocess.Popen(["bash", "-c", f"while true; do date >> {log}; sleep 0.05; done"])
        try:
            job = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "submit", "--address",
                                  "http://127.0.0.1:8266", "--working-dir", code, "--", "python",
                                  "pipelines/meta_train.py", *_meta_args(tiny_zoo, str(tmp_path / "mt"), 2),
                                  "--selection", "auc"],
                                 cwd=ROOT, env={**ENV, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                                 timeout=900)
        finally:
            writer.kill()
            log.unlink(missing_ok=True)
            shutil.rmtree(code)
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        assert "succeeded" in job.stdout and "checkpoint selection on validation members" in job.stdout
    finally:
        subprocess.run([sys.executable, "-m", "distributed.local_head", "stop", "--pidfile", pidfile], cwd=ROOT,
                       env=ENV, timeout=120)
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # the head and everything it started are gone
    run_dir = tmp_path / "mt" / "metanet"
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == 2  # --keep 2
    net, extra = load_metanetwork(str(run_dir / "metanetwork.pt"))
    assert extra["epoch"] in (0, 1) and 0 <= extra["selection_score"] <= 1
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mt/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["meta-train"])
    assert len(runs) == 1
    run_id = runs.iloc[0]["run_id"]
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(run_id, "task_loss")) == 2
    assert len(client.get_metric_history(run_id, "selection_score")) == 2
    # the edit's diagnostics on the validation members, every epoch; --selection auc: by their curve area
    aucs = client.get_metric_history(run_id, "val_auc")
    assert len(aucs) == 2 and len(client.get_metric_history(run_id, "val_ratio_spread")) == 2
    assert extra["selection_score"] == pytest.approx(max(m.value for m in aucs))
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"metanetwork.pt", "selection_scores.png", "validation_diagnostics.png"} <= names




def _registered_epochs(run_dir) -> list[int]:
    """Epochs of the checkpoints Ray Train has registered (a checkpoint folder alone may not be, yet)."""
    import json

    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return sorted(int(c["metrics"]["epoch"]) for c in snapshot["checkpoint_results"])
    except (FileNotFoundError, ValueError, KeyError):
        return []


@pytest.mark.timeout(1800)
def test_a_killed_driver_or_worker_resumes_to_the_same_end(tiny_zoo, tmp_path):
    epochs = 6  # a checkpoint every epoch (--keep 6): the kill lands with epochs left to resume
    # --selection auc: the curve areas come with the per-epoch diagnostics; this test is about resuming
    args = _meta_args(tiny_zoo, str(tmp_path / "killed"), epochs) + ["--keep", str(epochs), "--no-mlflow",
                                                                     "--selection", "auc"]
    cmd = [sys.executable, str(ROOT / "pipelines/meta_train.py"), *args]
    proc = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "killed" / "metanet"
    deadline = time.time() + 600
    while time.time() < deadline and not _registered_epochs(run_dir):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray, once a checkpoint is registered
    proc.wait()
    last = _registered_epochs(run_dir)[-1]  # a resume starts after this checkpoint at least
    assert last < epochs - 1, f"the run had finished (epoch {last}) before the kill: nothing to resume"
    import torch  # every checkpoint written before the kill (Ray may register a later one than its snapshot said)
    written = sorted(torch.load(d / "state.pt", weights_only=True)["epoch"] for d in run_dir.glob("checkpoint_*")
                     if (d / "state.pt").exists())
    resumed = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the other run loses a Ray Train worker mid-epoch 3 (os._exit): FailureConfig restarts the
    # workers from the last checkpoint (epoch 2) and the run ends where an uninterrupted one would
    straight = subprocess.run([sys.executable, str(ROOT / "pipelines/meta_train.py"),
                               *_meta_args(tiny_zoo, str(tmp_path / "straight"), epochs), "--keep", str(epochs),
                               "--no-mlflow", "--selection", "auc"],
                              env={**ENV, "METAPRUNE_FAULT_INJECT": f"kill-worker:3:{tmp_path}"},
                              capture_output=True, text=True, timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert (tmp_path / "killed-worker-epoch3").exists()  # a worker really died
    assert "the last workers started from the checkpoint of epoch 2" in straight.stdout, straight.stdout[-2000:]

    def final(text):
        line = next(l for l in text.splitlines() if l.startswith("meta-training done"))
        return eval(line.split("final metrics ", 1)[1])  # a dict printed by the pipeline

    a, b = final(resumed.stdout), final(straight.stdout)
    # both really resumed: the killed driver's run after its last registered checkpoint, the
    # restarted workers after epoch 2; a run that started over would say 0
    seen = (f"resumed run {a}, restarted run {b}, last registered checkpoint before the kill: epoch {last}, "
            f"checkpoints written: {written}")
    assert a["epoch"] == b["epoch"] == epochs - 1, seen
    assert a["started_at_epoch"] - 1 in written and a["started_at_epoch"] >= last + 1, seen
    assert b["started_at_epoch"] == 3, seen
    assert a["task_loss"] == pytest.approx(b["task_loss"], rel=0.05)
    assert a["sparsity_loss"] == pytest.approx(b["sparsity_loss"], rel=0.05)


def test_a_finished_run_with_the_same_inputs_is_reused_without_ray(tmp_path):
    """The demo asks `completed` before it starts a head: a metanetwork made from the same zoo
    files and settings is reused; another setting or a changed training member means a new run."""
    from conftest import build_digits_zoo
    from metanet.metanetwork import MetaNetConfig, MetaNetwork, save_metanetwork

    sys.path.insert(0, str(ROOT / "pipelines"))
    import meta_train

    zoo = build_digits_zoo(tmp_path / "zoo")
    argv = ["--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "out"), "--epochs", "2"]
    config = meta_train.parse_args(argv)
    _, run_dir, digest = meta_train._prepare(config)
    assert meta_train.completed(argv) is None  # nothing there yet
    run_dir.mkdir(parents=True)
    save_metanetwork(MetaNetwork(MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=4, layers=1)),
                     str(run_dir / "metanetwork.pt"), inputs=digest)
    assert meta_train.completed(argv) == str(run_dir / "metanetwork.pt")
    assert meta_train.completed([*argv, "--no-mlflow", "--max-failures", "0"]) is not None  # not result settings
    assert meta_train.completed([*argv, "--lr", "0.01"]) is None
    train_file = next(p for (p, _), role in zip(zoo.index(), zoo.metadata().role) if role == "train")
    import pyarrow as pa

    with pa.OSFile(train_file, "rb") as source:  # the member's file rewritten with other bytes, still readable
        table = pa.ipc.open_file(source).read_all()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"touched": b"1"})
    with pa.OSFile(train_file + ".tmp", "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(train_file + ".tmp", train_file)  # a new file: readers' memory maps keep the old one
    assert meta_train.completed(argv) is None
