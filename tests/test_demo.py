"""`make demo`'s terminal: the project's own lines and progress bars; Ray's, Ray Train's and DDP's
logs go to a log file per stage."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

RAY_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING|ERROR|SUCC)|\(\w+ pid=\d+|TrainingReport"
                      r"|reducer\.cpp|find_unused_parameters|core_worker\.cc|Token authentication")


def _demo(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(ROOT / "pipelines/demo.py"), "--quick", "--out", str(tmp_path / "demo")],
                          capture_output=True, env=env, timeout=900)  # bytes: text mode would turn \r into lines


def test_a_quick_demo_prints_its_own_lines_keeps_the_logs_and_reruns_without_work(tmp_path):
    out = _demo(tmp_path)
    terminal = (out.stdout + out.stderr).decode()
    assert out.returncode == 0, terminal[-3000:]
    lines = [line for line in terminal.split("\n") if line.strip()]  # a progress bar redraws one line with \r
    assert len(lines) < 60, "\n".join(lines)
    assert not [line for line in lines if RAY_LINE.search(line)], terminal
    assert "meta-training epoch 2/2" in terminal and "| meta | 2x |" in terminal  # progress and the results
    logs = tmp_path / "demo" / "logs"
    assert {p.name for p in logs.iterdir()} == {"zoo.log", "meta-train.log", "prune-batch.log"}
    assert "TrainingReport" in (logs / "meta-train.log").read_text()  # Ray Train's lines are kept, in the log
    assert (tmp_path / "demo" / "prune-batch" / "accuracy_vs_speedup.png").exists()
    # a re-run finds every stage complete and current: no training, no Ray head, no new MLflow run
    job_log = (logs / "meta-train.log").read_bytes()
    again = _demo(tmp_path)
    terminal = (again.stdout + again.stderr).decode()
    assert again.returncode == 0, terminal[-3000:]
    assert "9 already built, 0 to build" in terminal and "already done with this zoo and these settings" in terminal
    assert "9 already done" in terminal and terminal.count("no new run") == 2
    assert (logs / "meta-train.log").read_bytes() == job_log  # no job was submitted
