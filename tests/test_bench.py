"""The quality benchmark end to end on digits (--smoke): the same code as the CIFAR-10 run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quality_smoke_runs_every_method_and_writes_its_outputs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench/quality.py"), "--smoke", "--out", str(tmp_path),
                          "--workers", "2"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for method in ("meta", "none", "depgraph"):
        assert f"\n{method} " in out.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    records = results["records"]
    assert {r["method"] for r in records} == {"meta", "none", "depgraph"}
    assert all(r["speedup"] >= r["target"] for r in records)
    assert len(records) == 3 * 2 * 2 * 2  # methods x targets x seeds x the two held-out networks
    assert results["chosen_epoch"] in [e for e, _ in results["selection"]]
    assert (tmp_path / "quality.png").stat().st_size > 10_000
