"""`make demo`'s terminal: the project's own lines and progress bars; Ray's, Ray Train's and DDP's
logs go to a log file per stage."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from metanet.metanetwork import load_metanetwork

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))
pytestmark = pytest.mark.slow

RAY_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING|ERROR|SUCC)|\(\w+ pid=\d+|TrainingReport"
                      r"|reducer\.cpp|find_unused_parameters|core_worker\.cc|Token authentication")


def _demo(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(ROOT / "pipelines/demo.py"), "--quick", "--out", str(tmp_path / "demo")],
                          capture_output=True, env=env, timeout=900)  # bytes: text mode would turn \r into lines


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_quick_demo_prints_its_own_lines_keeps_the_logs_and_reruns_without_work(tmp_path):
    """Also the end-to-end test of ``ray job submit`` on a local head: the demo submits
    meta-training as a job from a snapshot of the code while a log grows inside the repository
    (with ``--working-dir .`` that made the upload fail, issue 12), and stops the head after."""
    log = ROOT / f"test-growing-{os.getpid()}.log"  # in the repository, not git-ignored: like demo.log
    writer = subprocess.Popen(["bash", "-c", f"while true; do date >> {log}; sleep 0.05; done"])
    try:
        out = _demo(tmp_path)
    finally:
        writer.kill()
        log.unlink(missing_ok=True)
    terminal = (out.stdout + out.stderr).decode()
    assert out.returncode == 0, terminal[-3000:]
    lines = [line for line in terminal.split("\n") if line.strip()]  # a progress bar redraws one line with \r
    # not a terminal: a progress line per 10% of each stage (9 zoo members, 9 pruning tasks)
    assert len(lines) < 90, "\n".join(lines)
    assert "\r" not in terminal  # not a terminal: progress lines, no redrawn bars (make demo > demo.log)
    assert not [line for line in lines if RAY_LINE.search(line)], terminal
    assert "meta-training epoch 2/2" in terminal and "| meta | 2x |" in terminal  # progress and the results
    logs = tmp_path / "demo" / "logs"
    assert {p.name for p in logs.iterdir()} == {"zoo.log", "meta-train.log", "prune-batch.log"}
    assert "TrainingReport" in (logs / "meta-train.log").read_text()  # Ray Train's lines are kept, in the log
    assert (tmp_path / "demo" / "prune-batch" / "accuracy_vs_speedup.png").exists()
    from demo import DASHBOARD_PORT, HEAD_PORT

    assert not _listening(HEAD_PORT) and not _listening(DASHBOARD_PORT)  # the head is stopped
    assert not (tmp_path / "demo" / "ray-head.pid").exists()
    trainings = list((tmp_path / "demo" / "meta-train" / "metanet").glob("training-*"))
    assert len(trainings) == 1 and len([p for p in trainings[0].glob("checkpoint_*") if p.is_dir()]) == 2  # --keep 2
    net, extra = load_metanetwork(str(tmp_path / "demo" / "meta-train" / "metanet" / "metanetwork.pt"))
    assert extra["epoch"] in (0, 1) and 0 <= extra["selection_score"] <= 1
    assert net.config.edit == "scores" and net.config.gradient  # meta is the default objective's learned criterion
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/demo/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["meta-train"])
    assert len(runs) == 1  # the job's workers (rank 0) and its driver log into one run
    run_id = runs.iloc[0]["run_id"]
    client = mlflow.MlflowClient()
    for metric in ("task_loss", "selection_score", "val_auc", "val_ratio_spread"):  # every epoch, every checkpoint
        assert len(client.get_metric_history(run_id, metric)) == 2, metric
    assert {"metanetwork.pt", "selection_scores.png", "validation_diagnostics.png"} <= \
        {a.path for a in client.list_artifacts(run_id)}
    # a re-run finds every stage complete and current: no training, no Ray head, no new MLflow run
    job_log = (logs / "meta-train.log").read_bytes()
    again = _demo(tmp_path)
    terminal = (again.stdout + again.stderr).decode()
    assert again.returncode == 0, terminal[-3000:]
    assert "9 already built, 0 to build" in terminal and "already done with this zoo and these settings" in terminal
    assert "9 already done" in terminal and terminal.count("no new run") == 2
    assert (logs / "meta-train.log").read_bytes() == job_log  # no job was submitted
    assert len(mlflow.search_runs(experiment_names=["meta-train"])) == 1
