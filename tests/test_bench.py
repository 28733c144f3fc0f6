"""The quality benchmark end to end on digits (--smoke): the same code and design as the CIFAR-10 run."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"meta", "none", "fpgm", "curve"}  # a hand-crafted criterion besides magnitude: "best" has a choice


@pytest.mark.slow
def test_quality_smoke_pairs_every_method_and_reports_the_sensitivity_check(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench/quality.py"), "--smoke", "--out", str(tmp_path),
                          "--workers", "2", "--no-mlflow", "--methods", *sorted(METHODS)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for line in ("| meta - best |", "| meta - none |", "| curve - best |", "| fpgm - none |",
                 "Sensitivity check: curve - none", "| unedited |", "| after the edit |",
                 "right after pruning (BatchNorm recalibrated, 0 finetuning steps)", "after 5 finetuning steps",
                 "after 10 finetuning steps", "best hand-crafted criterion", "Seconds per pruned network"):
        assert line in out.stdout, line
    results = json.loads((tmp_path / "results.json").read_text())
    records = results["records"]
    assert {r["method"] for r in records} == METHODS
    assert len(records) == 4 * 2 * 1 * 4  # methods x targets x seeds x networks (2 zoo test + 2 held-out)
    assert {r["origin"] for r in records} == {"zoo test split", "unlike the zoo (digits-heldout)"}
    # paired: every network and seed has every method
    units = {(r["network"], r["seed"], r["target"]) for r in records}
    assert all({r["method"] for r in records if (r["network"], r["seed"], r["target"]) == u} == METHODS for u in units)
    assert all({"test_acc_pruned", "test_acc_ft5", "test_acc", "val_acc_ft5", "ratio_spread"} <= set(r)
               for r in records)
    assert {r["criterion"] for r in records} == {"magnitude", "fpgm", "scores"}
    assert all("raw_auc" in r for r in records if r["method"] == "none")
    assert all("edit_auc" in r for r in records if r["method"] == "meta")
    # recalibration: right after pruning to 2x (no finetuning) the networks are far above chance
    assert statistics.mean(r["test_acc_pruned"] for r in records if r["target"] == 2.0) > 0.4
    # the best criterion is one of the hand-crafted ones, per budget and target
    assert set(results["best"]) == {"acc_pruned", "acc_ft5", "acc"}
    assert all(m in ("none", "fpgm") for by_t in results["best"].values() for m in by_t.values())
    history = results["meta_history"]
    assert history["epochs"][0]["epoch"] == -1 and all("auc" in e and "score" in e for e in history["epochs"])
    chosen = max(history["epochs"], key=lambda e: (e["score"], e["epoch"]))  # the short recipe's score; ties: later
    assert history["chosen_epoch"] == chosen["epoch"] and history["chosen_score"] == chosen["score"]
    assert set(results["paired"]["acc_pruned"]) >= {"meta-best", "meta-none", "curve-best", "curve-none", "fpgm-none"}
    assert isinstance(results["separates"], bool)
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    assert (tmp_path / "meta_training.png").stat().st_size > 10_000
    assert (tmp_path / "metanetwork.pt").exists()  # the chosen checkpoint, for prune_batch --metanet
    # a rerun (after a kill: a half-written last line) reuses the metanetwork and every finished job
    with open(tmp_path / "jobs.jsonl", "a") as f:
        f.write('{"key": "half a li')
    again = subprocess.run([sys.executable, str(ROOT / "bench/quality.py"), "--smoke", "--out", str(tmp_path),
                            "--workers", "2", "--no-mlflow", "--methods", *sorted(METHODS)],
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "metanetwork: reusing" in again.stdout and "reused 16 finished jobs" in again.stdout, again.stdout[-2000:]
    order = lambda rows: sorted(rows, key=lambda r: (r["network"], r["method"], r["target"]))  # noqa: E731
    assert order(json.loads((tmp_path / "results.json").read_text())["records"]) == order(records)


def _learned_criterion_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("learned_criterion_bench", ROOT / "bench/learned_criterion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_finetune_table_averages_seeds_and_splits_the_spread_into_seed_and_network():
    """bench/learned_criterion.py's finetune table on made-up accuracies: per-network means over the
    finetuning seeds, and the seed and network parts of a difference's spread."""
    bench = _learned_criterion_bench()
    # (val, test) per seed at 4x; method "a" is 2 points above fpgm on network 0, 4 on network 1,
    # with seed differences of +-1 around each
    fpgm = [{4.0: [(0.5, 0.30), (0.5, 0.30)]}, {4.0: [(0.5, 0.40), (0.5, 0.40)]}]
    a = [{4.0: [(0.4, 0.31), (0.4, 0.33)]}, {4.0: [(0.4, 0.43), (0.4, 0.45)]}]
    magnitude = [{4.0: [(0.1, 0.2), (0.1, 0.2)]}, {4.0: [(0.1, 0.2), (0.1, 0.2)]}]
    split = bench.noise_split(a, fpgm, 4.0)
    # per seed: network 0 +1, +3 (sd 1.41), network 1 +3, +5 (sd 1.41); means +2, +4 (sd 1.41)
    # (2 * 1.41 / 3)^2 = 0.9 networks by the normal approximation, but an interval needs 2 at least
    assert split.startswith("mean +3.0, seed sd 1.4, network sd 1.4; an interval above 0 needs about 2 networks")
    wide = [{4.0: [(0.4, 0.31), (0.4, 0.31)]}, {4.0: [(0.4, 0.45), (0.4, 0.45)]}]  # means +1, +5: sd 2.83
    assert "needs about 4 networks" in bench.noise_split(wide, fpgm, 4.0)  # (2 * 2.83 / 3)^2 = 3.6
    assert "not above 0" in bench.noise_split(fpgm, a, 4.0)
    lines = []
    bench.finetune_table({"magnitude": magnitude, "fpgm": fpgm, "a": a}, 20, [4.0], lines.append)
    text = "\n".join(lines)
    assert "(2 data-order seeds, averaged per network)" in text and "best hand-crafted by validation accuracy: 4x fpgm" in text
    assert "| a | 38.0 |" in text  # the mean over networks of the seed means: (32 + 44) / 2
    assert "a - fpgm at 4x: mean +3.0, seed sd 1.4, network sd 1.4" in text


def test_the_learned_criterion_bench_runs_every_method_with_and_without_the_reconstruction(tmp_path, capsys):
    """bench/learned_criterion.py on a tiny digits zoo, one epoch: each method's row and its
    reconstructed row (``+ LS``) right after pruning and after two finetuning budgets, the table of
    what the reconstruction adds, and the rows of other reconstruction settings."""
    from conftest import build_digits_zoo

    build_digits_zoo(tmp_path / "zoo", members=3)
    bench = _learned_criterion_bench()
    bench.main(["--zoo", str(tmp_path / "zoo"), "--variants", "layers=0,epochs=1", "--no-curve", "--reconstruct",
                "--finetune", "2", "4", "--finetune-speedups", "2", "--ls-variants", "batches=1", "recalibrate=1",
                "--criteria", "fpgm", "random"])
    out = capsys.readouterr().out
    for row in ("| magnitude |", "| magnitude + LS |", "| fpgm + LS |", "| random + LS |",
                "| MLP (no message passing) + evidence, lr 0.003, 1 ep + LS |", "| magnitude + LS (batches=1) |",
                "| magnitude + LS (recalibrate=1) |"):
        assert row in out, row
    assert out.count("What the reconstruction adds") == 3  # right after pruning, after 2 and after 4 steps
    assert "after pruning and 2 finetuning steps" in out and "after pruning and 4 finetuning steps" in out


def test_the_allocation_bench_pairs_every_allocation_against_uniform(tmp_path, capsys):
    """bench/allocation.py on a tiny digits zoo: a row per allocation and its paired difference to
    uniform right after pruning and after a finetune, the unpruned reference, seconds, the widths plot."""
    import importlib.util

    from conftest import build_digits_zoo

    from metanet.metanetwork import MetaNetConfig, MetaNetwork, save_metanetwork
    from zoo.store import Zoo

    build_digits_zoo(tmp_path / "zoo", members=3)
    widths = Zoo(str(tmp_path / "zoo")).edge_widths()
    save_metanetwork(MetaNetwork(MetaNetConfig(edge_widths=widths, edit="allocation", hidden=8, layers=1)),
                     str(tmp_path / "allocator.pt"))
    spec = importlib.util.spec_from_file_location("allocation_bench", ROOT / "bench/allocation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--zoo", str(tmp_path / "zoo"), "--allocations", "global", "eagleeye", "fitted", "--targets", "2",
                "--finetune", "0", "2", "--candidates", "2", "--plot", str(tmp_path / "widths.png"),
                "--allocators", f"gnn={tmp_path / 'allocator.pt'}", "--compare", "learned:gnn", "fitted",
                "--rows", "uniform+fpgm", "learned:gnn+meta", "learned:gnn+fpgm", "--best",
                "--compare", "learned:gnn + meta", "uniform + best",
                "--save", str(tmp_path / "per-network.json")])
    out = capsys.readouterr().out
    assert "uniform + best, by mean validation accuracy: 2x/0 steps " in out
    assert "learned:gnn + best, by mean validation accuracy: 2x/0 steps " in out
    for row in ("| uniform |", "| global - uniform |", "| eagleeye - uniform |", "| fitted - uniform |",
                "| learned:gnn - uniform |", "| learned:gnn - fitted |", "| unpruned, finetuned as long |",
                "| uniform + fpgm - uniform |", "| uniform + best - uniform |",
                "| learned:gnn + meta - uniform + best |",
                "| learned:gnn + best - uniform |", "| learned:gnn + fpgm - uniform |",
                "| allocation | 2x, 0 steps | 2x, 2 steps | seconds per network |"):
        assert row in out, out
    assert (tmp_path / "widths.png").stat().st_size > 0
    import json

    saved = json.loads((tmp_path / "per-network.json").read_text())
    assert saved and all("learned:gnn|2x|2" in per and "uniform|2x|0" in per for per in saved.values())
    # a second run paired with the first, network by network: with the re-fit, on the first two networks;
    # with the pruned networks timed and the learned allocation compared at uniform's measured speed-ups
    bench.main(["--zoo", str(tmp_path / "zoo"), "--allocations", "uniform", "--targets", "1.5", "2", "3",
                "--finetune", "0", "2", "--networks", "2", "--reconstruct", "--pair-with",
                str(tmp_path / "per-network.json"), "--allocators", f"gnn={tmp_path / 'allocator.pt'}",
                "--latency", "--latency-batch", "8", "--equal-speed", "learned:gnn", "uniform"])
    out = capsys.readouterr().out
    paired = out.split("This run minus")[1]
    assert "| uniform | not in the paired run | not in the paired run | " in paired, out  # the first run: 2x only
    assert "learned:gnn - uniform at the speed-up uniform measured" in out, out
    assert "| batch | uniform at 1.5x, 0 steps |" in out and "| 8 | " in out and "| 1 | " in out, out
    assert "measured speed-up at batch 8: learned:gnn " in out, out
    with pytest.raises(SystemExit, match="--equal-speed compares at measured speed-ups: it needs --latency"):
        bench.main(["--zoo", str(tmp_path / "zoo"), "--equal-speed", "uniform", "uniform"])
    with pytest.raises(SystemExit, match=r"--pair-with .*nothing.json: not a file --save wrote"):
        bench.main(["--zoo", str(tmp_path / "zoo"), "--pair-with", str(tmp_path / "nothing.json")])
    with pytest.raises(SystemExit, match="holds no network .*--pair-with needs a run over the same"):
        (tmp_path / "one.json").write_text(json.dumps({"someone-else": {}}))
        bench.main(["--zoo", str(tmp_path / "zoo"), "--allocations", "uniform", "--targets", "2", "--finetune", "0",
                    "--networks", "1", "--pair-with", str(tmp_path / "one.json")])


def test_equal_speed_interpolates_each_network_at_the_other_rows_measured_speed_up():
    """Row a's accuracy read off its own (measured speed-up, accuracy) points at the speed-up row b
    measured, per network; a network whose b speed-up is outside a's range is left out and counted."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("allocation_bench", ROOT / "bench/allocation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def network(a_acc, b_speed, b_acc):
        speeds = {2.0: 1.5, 3.0: 2.0, 4.0: 3.0}  # a's measured speed-up at its MAC targets
        return {"speed": {**{("a", t): {1: v} for t, v in speeds.items()},
                          **{("b", t): {1: b_speed} for t in speeds}},
                "acc": {**{("a", t, 0): acc for t, acc in zip(speeds, a_acc)},
                        **{("b", t, 0): b_acc for t in speeds}}}

    results = [network((0.6, 0.5, 0.4), 2.5, 0.40),   # a at 2.5x measured: 0.45, +5 points
               network((0.6, 0.5, 0.4), 1.75, 0.50),  # a at 1.75x: 0.55, +5 points
               network((0.6, 0.5, 0.4), 3.5, 0.10)]   # beyond a's fastest: left out
    lines = []
    bench.at_equal_speed(results, "a", "b", [2, 3, 4], [0], lines.append)
    row = next(line for line in lines if line.startswith("| 1 | "))
    assert row.count("+5.0 [+5.0, +5.0], 2/3") == 3, row


def test_the_latency_bench_times_each_allocation_against_the_unpruned_network(tmp_path, capsys):
    """bench/latency.py on a tiny digits zoo: MAC and measured speed-ups per allocation and target."""
    import importlib.util

    from conftest import build_digits_zoo

    build_digits_zoo(tmp_path / "zoo", members=3)
    spec = importlib.util.spec_from_file_location("latency_bench", ROOT / "bench/latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--zoo", str(tmp_path / "zoo"), "--targets", "2", "--repeats", "3", "--batch", "8"])
    out = capsys.readouterr().out
    assert "| allocation | target | MAC speed-up | measured, batch 1 | measured, batch 8 |" in out
    for allocation in bench.DEFAULT_ROWS:
        assert f"| {allocation} | 2x | " in out, out

