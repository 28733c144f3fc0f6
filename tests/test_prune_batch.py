"""`python pipelines/prune_batch.py`: many models in Ray tasks, baselines, saved models that load
again, results table, resume, failed rows with their reason, safe loading, MLflow."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from conftest import build_digits_zoo
from metanet.metanetwork import MetaNetConfig, MetaNetwork, save_metanetwork
from zoo.arch import build_model, resnet_spec
from zoo.data import load_digits
from zoo.model_files import load_model, save_model
from zoo.store import Zoo
from metanet.train import TrainConfig, evaluate, train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 3-member digits zoo (one held out as 'test'), a metanetwork for it, and a folder of model
    files: a good one, a pickled module, a bare state dict, a corrupt file."""
    tmp = tmp_path_factory.mktemp("prune-batch")
    data = load_digits()
    zoo = build_digits_zoo(tmp / "zoo")
    assert sorted(zoo.metadata().role) == ["test", "train", "val"]
    metanet = MetaNetwork(MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=8, layers=1, residual=0.01))
    save_metanetwork(metanet, str(tmp / "metanet.pt"))
    allocator = MetaNetwork(MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=8, layers=1, edit="allocation"))
    save_metanetwork(allocator, str(tmp / "allocator.pt"))
    models = tmp / "models"
    models.mkdir()
    torch.manual_seed(0)
    good = build_model(resnet_spec(8, (4, 6, 8), in_channels=1, num_classes=10))
    train(good, data, TrainConfig(epochs=2, lr=0.05, batch_size=64, augment=False))
    save_model(good, str(models / "good.pt"))
    torch.save(good, models / "pickled.pt")
    torch.save(good.state_dict(), models / "bare.pt")
    (models / "corrupt.pt").write_bytes(b"not a torch file")
    return tmp


def _run(*args, timeout=600):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(ROOT / "pipelines/prune_batch.py"), "--num-cpus", "2", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_prunes_zoo_and_files_with_baselines_resumes_and_records_failures(inputs, tmp_path):
    out = tmp_path / "out"
    models = tmp_path / "models"  # a copy: this test rewrites files in it
    models.mkdir()
    for f in (inputs / "models").iterdir():
        (models / f.name).write_bytes(f.read_bytes())
    args = ["--zoo", inputs / "zoo", "--models", models, "--metanet", inputs / "metanet.pt",
            "--targets", "1.5", "2", "--baselines", "--before-steps", "10", "--after-steps", "10", "--out", out,
            "--diagnostics"]
    first = _run(*args)
    assert first.returncode == 1, first.stderr[-3000:]  # done, but some rows failed (the bad files)
    assert "18 of 30 rows failed" in first.stderr
    assert "5 models x 3 methods x 2 targets = 30 rows; 0 already done" in first.stdout
    frame = pd.read_parquet(out / "results.parquet")
    csv = pd.read_csv(out / "results.csv")
    assert len(frame) == 30 and list(csv.columns) == list(frame.columns)
    assert (csv.test_acc.fillna(-1) == frame.test_acc.fillna(-1)).all()
    ok = frame[frame.status == "ok"]
    test_member = Zoo(str(inputs / "zoo")).metadata().query("role == 'test'").id.item()
    assert set(ok.model) == {"good", test_member}  # only the held-out zoo member, and the loadable file
    assert len(ok) == 12 and set(ok.method) == {"meta", "none", "depgraph"}
    assert ((ok.speedup - ok.macs_before / ok.macs_after).abs() < 1e-9).all() and (ok.speedup >= ok.target).all()
    failed = frame[frame.status == "failed"].groupby("model").error.first()
    assert "--trust-pickle" in failed["pickled"] and "--arch" in failed["bare"]
    assert "not a readable PyTorch file" in failed["corrupt"]
    # every pruned model loads again (weights only) and scores what its row says
    data = load_digits()
    for row in ok.itertuples():
        model, meta = load_model(row.path)
        assert meta["method"] == row.method and meta["target"] == row.target
        assert evaluate(model, data, "test")[0] == pytest.approx(row.test_acc, abs=1e-9)
    assert (out / "summary.md").read_text().count("| meta |") == 2 and (out / "accuracy_vs_speedup.png").exists()
    assert "| depgraph | 1.5x | 2 |" in first.stdout
    # several methods: the paired summary (same model) with intervals, and the diagnostics per row
    assert "Paired by model, final test accuracy" in first.stdout and "| meta - none |" in first.stdout
    assert "| meta - depgraph |" in first.stdout and "Recalibrated pruning curve of the prepared" in first.stdout
    assert ok[["auc", "curve_2x", "ratio_spread", "share_below_0.1", "acc_recal"]].notna().all().all()
    assert (out / "pruning_curve.png").stat().st_size > 10_000
    # re-running skips the rows that are done, retries the failed ones; trusting pickles fixes one
    # model; a different file under the same name is recomputed, and the run says why
    other = build_model(resnet_spec(8, (4, 6, 8), in_channels=1, num_classes=10))
    save_model(other, str(models / "good.pt"))
    again = _run(*args, "--trust-pickle")
    assert again.returncode == 1, again.stderr[-3000:]
    assert "30 rows; 6 already done with the same model, metanetwork and settings" in again.stdout
    assert "good / meta / 1.5x: recomputed (the model file changed)" in again.stdout
    # the node count is this run's tasks' (one local Ray), not the reused rows' from the first run's Ray
    assert "tasks ran on 1 node(s)" in again.stdout
    frame2 = pd.read_parquet(out / "results.parquet").set_index(["model", "method", "target"])
    before = frame.set_index(["model", "method", "target"])
    kept = before[(before.status == "ok") & (before.index.get_level_values(0) == test_member)]
    assert frame2.loc[kept.index].equals(kept)  # the zoo member's rows, reused as they were
    assert not frame2.loc["good"].model_sha.eq(before.loc["good"].model_sha).any()
    assert (frame2.loc["pickled"].status == "ok").all() and (frame2.loc["bare"].status == "failed").all()
    # MLflow: one run per invocation, with the table and the plot
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["prune-batch"])
    assert len(runs) == 2 and runs["metrics.rows_ok"].max() == 18
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(runs.iloc[0]["run_id"])}
    assert {"results.parquet", "results.csv", "summary.md", "accuracy_vs_speedup.png"} <= names


def test_an_unsupported_layer_fails_only_the_metanetwork_rows(inputs, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    learned_activation = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.PReLU(8),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    torch.save(learned_activation, models / "prelu.pt")
    out = _run("--models", models, "--dataset", "digits", "--metanet", inputs / "metanet.pt", "--methods", "meta",
               "none", "--targets", "1.5", "--trust-pickle", "--before-steps", "0", "--after-steps", "10",
               "--out", tmp_path / "out", "--no-mlflow")
    assert out.returncode == 1, out.stderr[-3000:]  # the metanetwork row failed
    frame = pd.read_parquet(tmp_path / "out/results.parquet").set_index("method")
    assert frame.loc["none", "status"] == "ok" and frame.loc["meta", "status"] == "failed"
    assert "UnsupportedNetworkError" in frame.loc["meta", "error"] and "PReLU" in frame.loc["meta", "error"]
    pruned, _ = load_model(frame.loc["none", "path"], trust_pickle=True)  # not a zoo architecture: kept pickled
    assert isinstance(pruned, nn.Sequential)


def test_a_resumed_run_counts_only_its_own_tasks_nodes(inputs, tmp_path):
    """Each run starts its own local Ray (a new node id): the second run reuses the first run's row
    and runs one task, on one node, and must say 1 node, not the 2 ids its results file holds."""
    args = ["--models", inputs / "models/good.pt", "--dataset", "digits", "--methods", "none", "--before-steps", "0",
            "--after-steps", "2", "--out", tmp_path / "out", "--no-mlflow", "--targets", "1.5"]
    first = _run(*args)
    assert first.returncode == 0 and "tasks ran on 1 node(s)" in first.stdout, first.stderr[-3000:]
    again = _run(*args, "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 rows; 1 already done" in again.stdout
    assert pd.read_parquet(tmp_path / "out/results.parquet").node.nunique() == 2  # two Ray starts, two ids
    assert "tasks ran on 1 node(s)" in again.stdout


def test_sparsity_and_two_four_write_finetuned_models_with_their_zeros(inputs, tmp_path):
    """--sparsity 0.8 0.9 --nm 2:4: the saved files (weights only) hold at least the asked zeros in
    the pruned layers and, for 2:4, the pattern in every pruned layer; first layer and classifier
    dense; the rows, the summary, the sparsity plot say what was reached."""
    from metanet.weight_pruning import nm_violations, prunable_layers, zero_fraction

    out = tmp_path / "out"
    run = _run("--models", inputs / "models/good.pt", "--dataset", "digits", "--metanet", inputs / "metanet.pt",
               "--methods", "meta", "none", "wanda", "--sparsity", "0.8", "0.9", "--nm", "2:4", "--before-steps", "0",
               "--after-steps", "10",
               "--out", out, "--no-mlflow")
    assert run.returncode == 0, run.stderr[-3000:]
    frame = pd.read_parquet(out / "results.parquet")
    assert len(frame) == 9 and (frame.status == "ok").all() and set(frame.method) == {"meta", "none", "wanda"}
    assert set(frame.criterion) == {"magnitude", "wanda"}  # meta: the paper's edit, then magnitude
    assert frame.speedup.isna().all() and (frame.macs_after == frame.macs_before).all()
    for row in frame.itertuples():
        model, meta = load_model(row.path)  # weights only, no masks left in the state dict
        layers = list(prunable_layers(model))
        assert row.layers_pruned == len(layers)
        first, *_, last = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert first not in layers and last not in layers
        assert all(torch.count_nonzero(dict(model.named_modules())[n].weight) > 0.99 * dict(model.named_modules())[n].weight.numel()
                   for n in (first, last))  # finetuned, not pruned
        assert zero_fraction(model, layers) == pytest.approx(row.sparsity_measured)
        if pd.notna(row.sparsity):
            assert meta["sparsity"] == row.sparsity and row.sparsity_measured >= row.sparsity - 1e-3
            assert row.path.endswith(f"good__{row.method}__sparsity{row.sparsity:g}.pt")
        else:
            assert row.nm == "2:4" and meta["nm"] == "2:4" and row.path.endswith("__2of4.pt")
            assert not nm_violations(model, layers, 2, 4) and row.sparsity_measured >= 0.45  # short groups keep more
        assert row.params_nonzero < row.params_before and row.file_bytes_compressed < row.file_bytes
    from zoo.batch import file_sizes

    dense = file_sizes(str(inputs / "models/good.pt"))  # the unpruned file, saved the same way
    sparse = frame.set_index(["method", "sparsity"]).loc[("none", 0.9)]
    assert sparse.file_bytes == pytest.approx(dense["file_bytes"], rel=0.15)  # same shapes (and a few more meta keys)
    assert sparse.file_bytes_compressed < 0.6 * dense["file_bytes_compressed"]  # but zeros compress
    assert "% zeros" in run.stdout and "| none | sparsity0.9 |" in run.stdout and "| wanda | 2of4 |" in run.stdout
    assert "1 models x 3 methods x 3 sparsities = 9 rows" in run.stdout
    assert "Weight-level pruning" in run.stdout and "| meta - best |" in run.stdout and "| meta - wanda |" in run.stdout
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 10_000 and not (out / "accuracy_vs_speedup.png").exists()


def test_a_channel_scores_metanetwork_is_refused_for_weight_level_runs(inputs, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "pipelines"))
    import prune_batch

    zoo = Zoo(str(inputs / "zoo"))
    scores = MetaNetwork(MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=8, layers=1, edit="scores"))
    save_metanetwork(scores, str(tmp_path / "scores.pt"))
    with pytest.raises(SystemExit) as exit_:
        prune_batch.cli(["--zoo", str(inputs / "zoo"), "--metanet", str(tmp_path / "scores.pt"), "--nm", "2:4",
                         "--out", str(tmp_path / "out"), "--no-mlflow"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "a channel-scores metanetwork" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    weights = MetaNetwork(MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=8, layers=1, edit="weight_scores"))
    save_metanetwork(weights, str(tmp_path / "weights.pt"))
    with pytest.raises(SystemExit) as exit_:
        prune_batch.cli(["--zoo", str(inputs / "zoo"), "--metanet", str(tmp_path / "weights.pt"), "--targets", "2",
                         "--out", str(tmp_path / "out"), "--no-mlflow"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "a weight-scores metanetwork" in err and "--sparsity or --nm" in err, err
    assert not (tmp_path / "out").exists()


def test_a_weight_scores_metanetwork_and_per_network_weight_scores_prune_weights(inputs, tmp_path):
    """meta with a weight-scores metanetwork (untrained: it ranks as global magnitude does, so its
    masks are none's) and curve (per-weight scores optimised on the network) at 80% zeros."""
    zoo = Zoo(str(inputs / "zoo"))
    weights = MetaNetwork(MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=8, layers=1, edit="weight_scores"))
    save_metanetwork(weights, str(tmp_path / "weights.pt"))
    run = _run("--models", inputs / "models/good.pt", "--dataset", "digits", "--metanet", tmp_path / "weights.pt",
               "--methods", "meta", "none", "curve", "--sparsity", "0.8", "--before-steps", "5", "--after-steps", "0",
               "--out", tmp_path / "out", "--no-mlflow")
    assert run.returncode == 0, run.stderr[-3000:]
    frame = pd.read_parquet(tmp_path / "out/results.parquet").set_index("method")
    assert dict(frame.criterion) == {"meta": "learned", "none": "magnitude", "curve": "curve"}
    assert (frame.sparsity_measured >= 0.8 - 1e-3).all()
    zeros = {m: [p == 0 for p in load_model(frame.loc[m, "path"])[0].parameters()] for m in ("meta", "none", "curve")}
    assert all(torch.equal(a, b) for a, b in zip(zeros["meta"], zeros["none"]))
    assert not all(torch.equal(a, b) for a, b in zip(zeros["curve"], zeros["none"]))


def test_adaptive_mode_prunes_while_validation_accuracy_holds(inputs, tmp_path):
    out = _run("--models", inputs / "models/good.pt", "--dataset", "digits", "--methods", "none", "--floor", "0.5",
               "--before-steps", "0", "--after-steps", "10", "--out", tmp_path / "out", "--no-mlflow")
    assert out.returncode == 0, out.stderr[-3000:]
    row = pd.read_parquet(tmp_path / "out/results.parquet").iloc[0]
    assert row.status == "ok" and row.floor == 0.5 and pd.isna(row.target)
    assert row.val_acc_pruned >= 0.5 and row.speedup > 1 and row.path.endswith("good__none__floor0.5.pt")
    assert "| none | floor0.5 | 1 |" in out.stdout


def test_an_imported_architecture_from_a_state_dict(inputs, tmp_path):
    """--arch MODULE:NAME,key=value: a torchvision MobileNetV2's bare state dict, on an image folder,
    pruned with the metanetwork (trained for its edge types) and the baseline; the pruned files load
    without pickles."""
    import torchvision
    from PIL import Image

    from metanet import network_to_graph
    from metanet.metanetwork import edge_widths_of

    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", 12), ("test", 4)):
        for label in range(3):
            folder = tmp_path / "images" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):  # a class is a colour, so there is something to learn
                pixels = (torch.rand(16, 16, 3, generator=gen) * 60 + 60 * label).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    arch = "torchvision.models:mobilenet_v2,num_classes=3,width_mult=0.25"
    model = torchvision.models.mobilenet_v2(num_classes=3, width_mult=0.25).eval()
    models = tmp_path / "models"
    models.mkdir()
    torch.save(model.state_dict(), models / "mobilenet.pt")
    graph = network_to_graph(model, torch.zeros(1, 3, 16, 16))
    save_metanetwork(MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([graph]), hidden=8, layers=1,
                                               residual=0.01)), str(tmp_path / "metanet.pt"))
    out = _run("--models", models, "--dataset", "imagefolder", "--data-root", tmp_path / "images", "--arch", arch,
               "--metanet", tmp_path / "metanet.pt", "--methods", "meta", "none", "--targets", "1.5",
               "--before-steps", "2", "--after-steps", "2", "--batch-size", "8", "--out", tmp_path / "out",
               "--no-mlflow")
    assert out.returncode == 0, out.stderr[-3000:]
    frame = pd.read_parquet(tmp_path / "out/results.parquet")
    assert sorted(frame.method) == ["meta", "none"] and set(frame.status) == {"ok"}, frame.error.tolist()
    assert (frame.family == "mobilenet_v2").all() and (frame.speedup >= 1.5).all()
    for path in frame.path:
        pruned, meta = load_model(path)  # weights only: the import spec rebuilds the architecture
        assert meta["format"] == "metaprune.pruned/1" and pruned(torch.zeros(1, 3, 16, 16)).shape == (1, 3)


@pytest.mark.parametrize("args, message", [
    (["--models", "nowhere/*.pt", "--dataset", "digits", "--methods", "none"], "no such file"),
    (["--models", ".", "--dataset", "digits", "--metanet", "missing.pt"], "metanetwork file not found"),
    (["--models", ".", "--dataset", "digits", "--methods", "magic"], "unknown method(s) ['magic']"),
    (["--models", ".", "--methods", "none", "--targets", "1"], "--targets item 1 1.0: must be greater than 1"),
    (["--zoo", "no-zoo", "--methods", "none"], "zoo directory not found"),
    (["--models", ".", "--methods", "none", "--arch", "os:system,command=ls"], "only constructors from"),
    (["--models", ".", "--methods", "none", "--arch", "torchvision.models:no_such_net"], "has no constructor"),
    # weight-level pruning: bad fractions and patterns, methods without a weight-level form, mixed kinds
    *[(["--models", ".", "--methods", "none", "--sparsity", v], f"--sparsity item 1 {shown}: must be")
      for v, shown in (("0", "0.0"), ("1", "1.0"), ("-0.2", "-0.2"), ("nan", "nan"))],
    (["--models", ".", "--methods", "none", "--sparsity", "0.8", "0.8"], "--sparsity 0.8 0.8: each value at most once"),
    *[(["--models", ".", "--methods", "none", "--nm", v], f"--nm: N:M {v!r}" if ":" not in v or v.count(":") > 1
       else "--nm: N:M") for v in ("text", "2:4:8")],
    (["--models", ".", "--methods", "none", "--nm", "3:2"], "--nm: N:M 3:2 needs 0 < N < M"),
    (["--models", ".", "--methods", "none", "--nm", "0:4"], "--nm: N:M 0:4 needs 0 < N < M"),
    (["--models", ".", "--methods", "depgraph", "--sparsity", "0.5"], "['depgraph'] prune channels only"),
    (["--models", ".", "--methods", "wanda"], "wanda prunes weights: with --sparsity or --nm"),
    (["--models", ".", "--methods", "none", "--sparsity", "0.5", "--targets", "2"], "one kind per run"),
    (["--models", ".", "--methods", "none", "--sparsity-scope", "layer"], "apply to --sparsity/--nm runs only"),
    (["--models", ".", "--methods", "none", "--nm", "2:4", "--criterion", "fpgm"], "the method chooses the weight"),
    (["--models", ".", "--methods", "none", "--nm", "2:4", "--sparsity-scope", "row"], "--sparsity-scope 'row'"),
    # allocations: a known name, at the channel level, to a target
    (["--models", ".", "--methods", "none", "--allocation", "greedy"], "--allocation must be one of uniform, global"),
    (["--models", ".", "--methods", "none", "--floor", "0.5", "--allocation", "eagleeye"], "--floor prunes the same"),
    (["--models", ".", "--methods", "none", "--nm", "2:4", "--allocation", "lamp"], "a channel-pruning setting"),
    (["--models", ".", "--methods", "none", "--allocation-candidates", "0"], "--allocation-candidates"),
    (["--models", ".", "--methods", "none", "--allocation", "learned", "--allocator", "models:/alloc/1"],
     "--allocator models:/alloc/1: models:/alloc/1: set MLFLOW_TRACKING_URI"),
    (["--models", ".", "--dataset", "digits", "--metanet", "runs:/0123/metanetwork"], "set MLFLOW_TRACKING_URI"),
    (["--models", ".", "--methods", "none", "--latency", "--latency-repeats", "2"], "--latency-repeats"),
    (["--models", ".", "--methods", "none", "--latency", "--latency-batch", "1"], "--latency-batch"),
    (["--models", ".", "--methods", "none", "--allocator", "a.pt"], "--allocator is read by --allocation learned only"),
    (["--models", ".", "--methods", "none", "--allocation", "learned", "--allocator", "missing.pt"],
     "allocation metanetwork file not found: missing.pt"),
])
def test_bad_inputs_are_named(args, message, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "pipelines"))
    import prune_batch

    with pytest.raises(SystemExit) as exit_:  # in-process: refused before Ray starts
        prune_batch.cli([*args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err, err


def test_an_allocation_decides_the_widths_and_each_criterion_the_channels(inputs, tmp_path):
    """``--allocation eagleeye --methods none fpgm``: every method prunes to the target under the
    widths the allocation chose for the network (the same for both criteria: EagleEye's candidates
    are drawn with the run's seed), other widths than uniform's, and the setting is in each row."""
    common = ["--zoo", inputs / "zoo", "--before-steps", "0", "--after-steps", "0", "--no-mlflow", "--methods", "none",
              "fpgm", "--targets", "2"]
    found = {}
    for name, extra in (("uniform", []), ("eagleeye", []), ("learned", ["--allocator", inputs / "allocator.pt"])):
        done = _run(*common, "--allocation", name, "--allocation-candidates", "3", "--out", tmp_path / name, *extra)
        assert done.returncode == 0, done.stderr[-2000:]
        rows = pd.read_parquet(tmp_path / name / "results.parquet")
        assert len(rows) == 2 and (rows.status == "ok").all(), rows.error.tolist()
        assert (rows.speedup >= 2.0 * 0.98).all()
        found[name] = rows.set_index("method")
    eagle = found["eagleeye"]
    assert all('"allocation": "eagleeye"' in s for s in eagle.settings)
    assert eagle.params_after["none"] == eagle.params_after["fpgm"]  # the same widths for both criteria
    assert eagle.params_after["none"] != found["uniform"].params_after["none"]  # not uniform's
    learned = found["learned"]  # an untrained allocation metanetwork: the same fraction of every group
    assert all('"allocator_sha": ' in s for s in learned.settings)
    assert learned.params_after["none"] == learned.params_after["fpgm"]


def test_an_allocator_that_is_not_one_is_refused_in_one_line(inputs, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "pipelines"))
    import prune_batch

    with pytest.raises(SystemExit):
        prune_batch.cli(["--zoo", str(inputs / "zoo"), "--methods", "none", "--no-mlflow", "--allocation", "learned",
                         "--allocator", str(inputs / "metanet.pt"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "edit 'additive' is not an allocation metanetwork" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_the_shipped_criterion_with_no_metanet_and_measured_latency(inputs, tmp_path):
    """``--methods none meta`` with no ``--metanet``: the shipped learned criterion, said so; with
    ``--latency`` every row has its measured time beside the MAC speed-up, the summary a column,
    the run a plot."""
    out = tmp_path / "out"
    done = _run("--zoo", inputs / "zoo", "--methods", "none", "meta", "--targets", "2", "4", "--before-steps", "0",
                "--after-steps", "0", "--no-mlflow", "--latency", "--latency-repeats", "5", "--latency-warmup", "1",
                "--latency-batch", "16", "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no metanetwork given: using the shipped criterion metanetwork (criterion-cifar10.pt, trained on" \
        in done.stdout
    rows = pd.read_parquet(out / "results.parquet")
    assert len(rows) == 4 and (rows.status == "ok").all(), rows.error.tolist()
    assert (rows.latency_ms > 0).all() and (rows.latency_ms_before > 0).all() and (rows.latency_batch == 16).all()
    ratio = rows.latency_ms_before / rows.latency_ms
    assert ((rows.latency_speedup - ratio).abs() < 1e-9).all()  # the speed-up is of the pair timed together
    assert rows.latency_device.str.startswith("cpu: ").all()
    assert "measured speed-up, batch 1 / 16" in (out / "summary.md").read_text()
    assert (out / "latency.png").stat().st_size > 0


def test_post_training_pruning_with_the_reconstruction_needs_no_training_step(inputs, tmp_path):
    """The README's post-training example: no finetuning before or after (``--before-steps 0
    --after-steps 0``), the layers that read pruned channels re-fitted on calibration inputs; at
    channel level and at weight level (2:4, each layer re-fitted with its mask fixed). Each row says
    what the reconstruction did, and the accuracy after is the accuracy right after pruning."""
    out = tmp_path / "post"
    common = ["--zoo", inputs / "zoo", "--before-steps", "0", "--after-steps", "0", "--reconstruct", "--no-mlflow"]
    done = _run(*common, "--methods", "none", "fpgm", "--targets", "2", "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "post-training (no finetuning): the reconstruction reads calibration inputs only; no method reads labels" \
        in done.stdout
    rows = pd.read_parquet(out / "results.parquet")
    assert len(rows) == 2 and (rows.status == "ok").all()
    assert (rows.reconstructed_layers > 0).all() and (rows.reconstruct_seconds > 0).all()
    assert (rows.reconstruct_error_after < rows.reconstruct_error_before).all()
    assert (rows.test_acc == rows.test_acc_pruned).all()  # nothing trained after the cut
    assert all('"reconstruct": true' in s for s in rows.settings)
    weights = tmp_path / "post-weights"
    done = _run(*common, "--methods", "none", "wanda", "--nm", "2:4", "--out", weights)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = pd.read_parquet(weights / "results.parquet")
    assert (rows.status == "ok").all() and (rows.reconstructed_layers > 0).all()
    from metanet.weight_pruning import nm_violations, prunable_layers

    for row in rows.itertuples():
        model, _ = load_model(row.path)
        assert nm_violations(model, list(prunable_layers(model)), 2, 4) == []  # the masks survived the re-fit
        assert 0.45 < row.sparsity_measured <= 0.5  # rows not a multiple of 4 end in a shorter group
