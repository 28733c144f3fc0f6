"""The prepared GPU check (bench/gpu_check.sh) runs end to end on the CPU at tiny sizes, every step,
so that a rare, short GPU lease is spent measuring, not debugging."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_every_step_of_the_gpu_check_runs_in_smoke_mode(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), "--smoke"], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text().splitlines()[2:]  # below the table's head
    assert [line.split("|")[1].strip() for line in summary] == ["cuda_tests", "backends", "ddp", "semi_structured",
                                                                  "realistic"]
    assert all(line.split("|")[2].strip() == "0" for line in summary)
    ddp = (tmp_path / "ddp.log").read_text()
    assert "gloo on cpu: 2 members, objective curve" in ddp and "ms per meta-training step" in ddp
    realistic = (tmp_path / "realistic.log").read_text()
    for row in ("| magnitude | ", "| fpgm | ", "| curve | ", "| meta | "):
        assert row in realistic, realistic[-2000:]
    assert "no CUDA GPU here" in (tmp_path / "semi_structured.log").read_text()  # says so, measures nothing
