"""The quality benchmark end to end on digits (--smoke): the same code and design as the CIFAR-10 run."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"meta", "none", "depgraph", "gate", "oracle"}


@pytest.mark.slow
def test_quality_smoke_pairs_every_method_and_reports_the_sensitivity_check(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench/quality.py"), "--smoke", "--out", str(tmp_path),
                          "--workers", "2", "--no-mlflow", "--set", "targets=[2.0]"],  # one target: half the pruning jobs
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for line in ("| meta - none |", "| meta - depgraph |", "| oracle - none |", "Sensitivity check: oracle - none",
                 "| unedited |", "| after the edit |"):
        assert line in out.stdout, line
    results = json.loads((tmp_path / "results.json").read_text())
    records = results["records"]
    assert {r["method"] for r in records} == METHODS
    assert len(records) == 5 * 1 * 1 * 4  # methods x targets x seeds x networks (2 zoo test + 2 held-out)
    assert {r["origin"] for r in records} == {"zoo test split", "unlike the zoo (digits-heldout)"}
    # paired: every network and seed has every method
    units = {(r["network"], r["seed"], r["target"]) for r in records}
    assert all({r["method"] for r in records if (r["network"], r["seed"], r["target"]) == u} == METHODS for u in units)
    assert all("curve_2x" in r and "auc" in r for r in records)
    assert all("raw_auc" in r for r in records if r["method"] == "none")
    assert all("edit_auc" in r for r in records if r["method"] == "meta")
    # recalibration: right after pruning to 2x (no finetuning) the networks are far above chance
    assert statistics.mean(r["test_acc_pruned"] for r in records if r["target"] == 2.0) > 0.4
    # strong sparse learning shrinks the network; plain finetuning does not
    ratio = {m: statistics.mean(r["mean_ratio"] for r in records if r["method"] == m) for m in ("oracle", "none")}
    assert ratio["oracle"] < 0.97 < ratio["none"], ratio
    history = results["meta_history"]
    assert history["epochs"][0]["epoch"] == -1 and all("auc" in e and "score" in e for e in history["epochs"])
    chosen = max(history["epochs"], key=lambda e: (e["score"], e["epoch"]))  # the short recipe's score; ties: later
    assert history["chosen_epoch"] == chosen["epoch"] and history["chosen_score"] == chosen["score"]
    assert set(results["paired"]) >= {"meta-none", "meta-depgraph", "oracle-none"}
    assert isinstance(results["separates"], bool)
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    assert (tmp_path / "meta_training.png").stat().st_size > 10_000
    assert (tmp_path / "metanetwork.pt").exists()  # the chosen checkpoint, for prune_batch --metanet
