"""Hostile but fair inputs to the pipelines: each is refused with one line naming the thing that
is wrong (exit code 2, or 3 for an output in use), before anything is built, and every output
already there is byte-identical afterwards. The pipelines run in-process through their CLI
wrapper (``distributed.cli.run_cli``), without Ray: every case is refused before Ray starts."""

import copy
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distributed.locks import exclusive
from metanet.graph import GraphMismatchError, graph_to_network, network_to_graph
from metanet.metanetwork import MetaNetConfig, MetaNetwork, save_metanetwork
from zoo import batch
from zoo.arch import arch_spec, build_model, resnet_spec
from zoo.spec import load_spec, members
from zoo.store import Zoo, ZooRecord

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))

import make_zoo  # noqa: E402
import meta_train  # noqa: E402
import prune_batch  # noqa: E402
import tune  # noqa: E402

PROGRAMS = {"make_zoo": make_zoo, "prune_batch": prune_batch, "meta_train": meta_train, "tune": tune}


def _member(i: int, role: str) -> ZooRecord:
    torch.manual_seed(i)
    model = build_model(resnet_spec(8, (4, 6, 8), in_channels=1)).eval()
    graph = network_to_graph(model, torch.zeros(1, 1, 8, 8))
    return ZooRecord(f"resnet-{i:012d}", arch_spec(model), "digits", i, graph,
                     metrics={"val_acc": 0.5, "test_acc": 0.5}, role=role)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small zoo (untrained members: nothing here trains), a metanetwork file, broken copies of
    both, a finished prune_batch output, and a plain file to put outputs under."""
    tmp = tmp_path_factory.mktemp("hostile")
    spec = yaml.safe_load((ROOT / "zoo/specs/digits.yaml").read_text())
    spec.update(output=str(tmp / "zoo"), members=3)
    zoo = Zoo.create(str(tmp / "zoo"))
    zoo.write_spec(spec)
    for i, role in enumerate(("train", "val", "test")):
        zoo.write(f"resnet-{i:012d}", [_member(i, role)], manifest=False)
    zoo.write_manifest()
    broken = tmp / "broken-zoo"
    broken.mkdir()
    for path in (tmp / "zoo").rglob("*"):
        if path.is_file():
            (broken / path.relative_to(tmp / "zoo")).parent.mkdir(parents=True, exist_ok=True)
            (broken / path.relative_to(tmp / "zoo")).write_bytes(path.read_bytes())
    train_file = broken / "members" / "resnet-000000000000.arrow"
    train_file.write_bytes(train_file.read_bytes()[:200])  # the train member, truncated
    net = MetaNetwork(MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=8, layers=1))
    save_metanetwork(net, str(tmp / "metanet.pt"))
    (tmp / "truncated.pt").write_bytes((tmp / "metanet.pt").read_bytes()[:300])
    payload = torch.load(tmp / "metanet.pt", weights_only=True)
    payload["config"]["bogus_option"] = 1
    torch.save(payload, tmp / "foreign.pt")
    (tmp / "done").mkdir()
    (tmp / "done" / "results.csv").write_text("model,method\nx,none\n")  # stands for a finished run's output
    (tmp / "a-file").write_text("not a directory")
    (tmp / "random.pt").write_bytes(bytes(range(256)) * 8)
    for p in net.parameters():
        torch.nn.init.constant_(p, float("nan"))
        break
    save_metanetwork(net, str(tmp / "nan-metanet.pt"))
    (tmp / "empty-folder").mkdir()
    (tmp / "duplicate.yaml").write_text("name: dup\nmembers: 2\nmembers: 1\ndataset: {name: digits}\n")
    _broken_copies(tmp)
    return tmp


def _broken_copies(tmp: Path) -> None:
    """A prune_batch output whose results file is cut short, zoos whose spec.json is cut short, a
    list, or a FIFO (or whose member is one), a FIFO where a file is expected, and a folder of models
    holding one (reading a FIFO waits forever for a writer)."""
    import pandas as pd

    (tmp / "bad-results").mkdir()
    results = tmp / "bad-results" / "results.parquet"
    pd.DataFrame({"model": [f"m{i}" for i in range(50)], "method": "none"}).to_parquet(results)
    results.write_bytes(results.read_bytes()[:100])
    for name in ("bad-spec-zoo", "list-spec-zoo", "fifo-spec-zoo", "fifo-member-zoo"):
        shutil.copytree(tmp / "zoo", tmp / name)
    (tmp / "bad-spec-zoo" / "spec.json").write_text('{\n "dataset": {\n  "name": "digi')  # cut short
    (tmp / "list-spec-zoo" / "spec.json").write_text("[1, 2]")
    for fifo in ("fifo-spec-zoo/spec.json", "fifo-member-zoo/members/resnet-000000000000.arrow"):
        (tmp / fifo).unlink()
        os.mkfifo(tmp / fifo)
    os.mkfifo(tmp / "fifo")
    (tmp / "fifo-models").mkdir()
    os.mkfifo(tmp / "fifo-models" / "net.pt")


def _snapshot(root: Path) -> dict:
    """Every file's bytes, but the lock files a run leaves (``distributed.locks``: empty of results)."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


CASES = [
    # (program, arguments, exit code, what the one line must name)
    ("make_zoo", ["--set", "memberz=4"], 2, "memberz: unknown key"),
    ("make_zoo", ["--set", "nonexistent.key=1"], 2, "nonexistent: unknown key"),
    ("make_zoo", ["--set", "train.epochz=1"], 2, "train.epochz: unknown key (allowed: epochs"),
    ("make_zoo", ["--set", "train.epochs=-5"], 2, "train.epochs = -5: must be greater than or equal to 1"),
    ("make_zoo", ["--set", "train=3"], 2, "train = 3: must be a valid dictionary"),
    ("make_zoo", ["--set", "families=[{family: resnet, depths: [9], stage_widths: [[4]]}]"], 2, "6n+2"),
    ("make_zoo", ["--set", "dataset.name=cifar10", "--set", "dataset.root={tmp}/no-data"], 2,
     "cifar10: expected {tmp}/no-data/cifar-10-batches-py"),
    ("make_zoo", ["--set", "dataset.name=svhn", "--set", "dataset.root={tmp}"], 2, "svhn: expected"),
    ("make_zoo", ["--out", "{tmp}/a-file/zoo"], 2, "{tmp}/a-file/zoo"),
    ("make_zoo", ["--out", "{tmp}/zoo", "--set", "dataset.seed=3"], 2, "another spec (different dataset"),
    ("prune_batch", ["--zoo", "{tmp}/zoo", "--metanet", "{tmp}/truncated.pt", "--out", "{tmp}/done"], 2,
     "{tmp}/truncated.pt: not a readable metanetwork file"),
    ("prune_batch", ["--zoo", "{tmp}/zoo", "--metanet", "{tmp}/foreign.pt", "--out", "{tmp}/done"], 2,
     "unknown metanetwork config key(s) bogus_option"),
    ("prune_batch", ["--zoo", "{tmp}/zoo", "--methods", "none", "--targets", "nan", "--out", "{tmp}/done"], 2,
     "--targets item 1 nan: must be a finite number"),
    ("prune_batch", ["--zoo", "{tmp}/zoo", "--methods", "none", "--targets", "inf", "--out", "{tmp}/done"], 2,
     "--targets item 1 inf: must be a finite number"),
    # values no run can use are refused before anything starts, naming the flag and the value
    ("prune_batch", ["--zoo", "{tmp}/zoo", "--methods", "none", "--targets", "2", "2", "--out", "{tmp}/done"], 2,
     "--targets 2.0 2.0: each value at most once; 2.0 is given twice"),
    ("prune_batch", ["--zoo", "{tmp}/zoo", "--methods", "none", "--before-steps", "-5", "--out", "{tmp}/done"], 2,
     "--before-steps -5: must be greater than or equal to 0"),
    ("prune_batch", ["--zoo", "{tmp}/zoo", "--methods", "none", "--batch-size", "0", "--out", "{tmp}/done"], 2,
     "--batch-size 0: must be greater than or equal to 1"),
    ("meta_train", ["--zoo", "{tmp}/zoo", "--out", "{tmp}/mt", "--epochs", "0"], 2,
     "--epochs 0: must be greater than or equal to 1"),
    ("meta_train", ["--zoo", "{tmp}/zoo", "--out", "{tmp}/mt", "--workers", "0"], 2,
     "--workers 0: must be greater than or equal to 1"),
    ("meta_train", ["--zoo", "{tmp}/zoo", "--out", "{tmp}/mt", "--lr", "nan"], 2, "--lr nan: must be a finite number"),
    ("meta_train", ["--zoo", "{tmp}/zoo", "--out", "{tmp}/mt", "--lr", "inf"], 2, "--lr inf: must be a finite number"),
    ("tune", ["--set", "zoo={tmp}/zoo", "--set", "space={hidden: {choice: [-5, 0]}}", "--out", "{tmp}/done"], 2,
     "space.hidden.choice: -5: must be greater than or equal to 1"),
    ("tune", ["--set", "zoo={tmp}/zoo", "--set", "fixed={layers: -1}", "--out", "{tmp}/done"], 2,
     "fixed.layers: -1: must be greater than or equal to 0"),
    ("tune", ["--set", "zoo={tmp}/zoo", "--set", "fixed={objective: paper, edit: scores}", "--out", "{tmp}/done"], 2,
     "fixed.edit: 'scores' with fixed.objective 'paper': edit scores is trained with objective curve"),
    # an output that is an existing file
    ("make_zoo", ["--out", "{tmp}/a-file"], 2, "{tmp}/a-file: the output is an existing file, not a folder"),
    ("prune_batch", ["--zoo", "{tmp}/zoo", "--methods", "none", "--out", "{tmp}/a-file"], 2,
     "{tmp}/a-file: the output is an existing file, not a folder"),
    ("meta_train", ["--zoo", "{tmp}/zoo", "--out", "{tmp}/a-file"], 2, "--out {tmp}/a-file: an existing file"),
    # unclear messages, made clear
    ("prune_batch", ["--zoo", "{tmp}/zoo", "--metanet", "{tmp}/random.pt", "--out", "{tmp}/new-out"], 2,
     "{tmp}/random.pt: not a readable metanetwork file"),
    ("prune_batch", ["--zoo", "{tmp}/zoo", "--metanet", "{tmp}/nan-metanet.pt", "--out", "{tmp}/new-out"], 2,
     "has non-finite values (NaN or inf): a diverged or damaged metanetwork"),
    ("prune_batch", ["--models", "{tmp}/empty-folder", "--dataset", "digits", "--methods", "none", "--out",
                     "{tmp}/new-out"], 2, "the folder holds no .pt or .pth files"),
    # resources no node can give: refused before a Ray starts or anything is written
    ("make_zoo", ["--num-cpus", "1", "--cpus-per-member", "2"], 2,
     "make_zoo: --cpus-per-member 2: a task asks for 2 CPU(s), but the local Ray has 1"),
    ("prune_batch", ["--zoo", "{tmp}/zoo", "--methods", "none", "--num-cpus", "1", "--cpus-per-task", "2", "--out",
                     "{tmp}/new-out"], 2, "--cpus-per-task 2: a task asks for 2 CPU(s), but the local Ray has 1"),
    ("meta_train", ["--zoo", "{tmp}/zoo", "--out", "{tmp}/mt", "--workers", "4096", "--no-mlflow"], 2,
     "--workers 4096: a task asks for 4096 CPU(s)"),
    ("prune_batch", ["--zoo", "{tmp}/zoo", "--methods", "none", "--num-cpus", "0", "--out", "{tmp}/new-out"], 2,
     "prune_batch: --num-cpus 0: must be at least 1"),
    # YAML that says a key twice; options a dataset does not take; another spec into a built zoo
    ("make_zoo", ["--spec", "{tmp}/duplicate.yaml"], 2, "duplicate key 'members' (line 3"),
    ("make_zoo", ["--set", "dataset.root={tmp}/nonexistent"], 2, "digits: root does not apply"),
    ("make_zoo", ["--out", "{tmp}/zoo", "--set", "name=another"], 2, "another spec (different name)"),
    ("make_zoo", ["--out", "{tmp}/zoo", "--set", "test_members=0.5"], 2,
     "other test_members: built members would change role"),
    ("prune_batch", ["--zoo", "{tmp}/zoo", "--methods", "none", "--floor", "nan", "--out", "{tmp}/done"], 2,
     "--floor nan: must be a finite number"),
    ("prune_batch", ["--zoo", "{tmp}/zoo", "--methods", "none", "--out", "{tmp}/a-file/out"], 2, "{tmp}/a-file/out"),
    ("prune_batch", ["--models", "{tmp}/metanet.pt", "--methods", "none", "--dataset", "cifar10", "--data-root",
                     "{tmp}/no-data", "--out", "{tmp}/done", "--before-steps", "1"], 2, "cifar10: expected"),
    ("meta_train", ["--zoo", "{tmp}/broken-zoo", "--out", "{tmp}/mt"], 2,
     "{tmp}/broken-zoo/members/resnet-000000000000.arrow: not a readable Arrow IPC file"),
    ("meta_train", ["--zoo", "{tmp}/no-zoo", "--out", "{tmp}/mt"], 2, "zoo directory not found"),
    ("tune", ["--set", "zoo={tmp}/zoo", "--set", "num_samplez=3", "--out", "{tmp}/done"], 2,
     "num_samplez: unknown key"),
    ("tune", ["--set", "zoo={tmp}/zoo", "--set", "targets=[.nan]", "--out", "{tmp}/done"], 2,
     "targets.0 = nan: must be a finite number"),
    ("tune", ["--set", "zoo={tmp}/zoo", "--set", "space={lr: {gaussian: [0, 1]}}", "--out", "{tmp}/done"], 2,
     "space.lr.gaussian: unknown key (allowed: uniform, loguniform, randint, choice)"),
    # issue 37, case 6: a damaged results file or zoo spec is named, before Ray or any output
    ("prune_batch", ["--out", "{tmp}/bad-results", "--zoo", "{tmp}/zoo", "--methods", "none"], 2,
     "{tmp}/bad-results/results.parquet: not a readable Parquet file"),
    ("meta_train", ["--zoo", "{tmp}/bad-spec-zoo", "--out", "{tmp}/new-out"], 2,
     "{tmp}/bad-spec-zoo/spec.json: not valid JSON (Unterminated string starting at: line 3 column 11 (char 26))"),
    ("meta_train", ["--zoo", "{tmp}/list-spec-zoo", "--out", "{tmp}/new-out"], 2,
     "{tmp}/list-spec-zoo/spec.json: not a JSON mapping"),
    ("prune_batch", ["--zoo", "{tmp}/bad-spec-zoo", "--methods", "none", "--out", "{tmp}/new-out"], 2,
     "{tmp}/bad-spec-zoo/spec.json: not valid JSON"),
    ("prune_batch", ["--batch-size", "8", "--no-augment", "--zoo", "{tmp}/bad-spec-zoo", "--methods", "none",
                     "--out", "{tmp}/new-out"], 2, "{tmp}/bad-spec-zoo/spec.json: not valid JSON"),  # read up front
    ("tune", ["--set", "zoo={tmp}/bad-spec-zoo", "--out", "{tmp}/new-out"], 2,
     "{tmp}/bad-spec-zoo/spec.json: not valid JSON"),
    ("tune", ["--set", "zoo={tmp}/list-spec-zoo", "--out", "{tmp}/new-out"], 2,
     "{tmp}/list-spec-zoo/spec.json: not a JSON mapping"),
    ("make_zoo", ["--out", "{tmp}/bad-spec-zoo"], 2, "{tmp}/bad-spec-zoo/spec.json: not valid JSON"),
    # case 8: an N:M pattern no layer could hold
    ("prune_batch", ["--nm", "1:1000000000000", "--zoo", "{tmp}/zoo", "--methods", "none", "--out", "{tmp}/new-out"],
     2, "--nm: N:M 1:1000000000000: M must be at most 64"),
    # case 10: a device, FIFO or socket where a file is expected is never read (it would never end)
    ("prune_batch", ["--models", "/dev/zero", "--dataset", "digits", "--methods", "none", "--out", "{tmp}/new-out"],
     2, "--models /dev/zero: not a regular file (a character device)"),
    ("prune_batch", ["--models", "{tmp}/fifo-models", "--dataset", "digits", "--methods", "none", "--out",
                     "{tmp}/new-out"], 2, "--models {tmp}/fifo-models/net.pt: not a regular file (a FIFO)"),
    ("prune_batch", ["--metanet", "/dev/zero", "--zoo", "{tmp}/zoo", "--out", "{tmp}/new-out"], 2,
     "--metanet /dev/zero: not a regular file"),
    ("prune_batch", ["--arch", "{tmp}/fifo", "--zoo", "{tmp}/zoo", "--methods", "none", "--out", "{tmp}/new-out"],
     2, "--arch {tmp}/fifo: not a regular file"),
    ("make_zoo", ["--spec", "{tmp}/fifo"], 2, "{tmp}/fifo: not a regular file"),
    ("tune", ["--search", "{tmp}/fifo", "--out", "{tmp}/new-out"], 2, "{tmp}/fifo: not a regular file"),
    ("tune", ["--set", "zoo={tmp}/fifo-spec-zoo", "--out", "{tmp}/new-out"], 2,
     "{tmp}/fifo-spec-zoo/spec.json: not a regular file"),
    ("meta_train", ["--zoo", "{tmp}/fifo-member-zoo", "--out", "{tmp}/new-out"], 2,
     "{tmp}/fifo-member-zoo/members/resnet-000000000000.arrow: not a regular file"),
]


@pytest.mark.parametrize("program, args, code, message", CASES,
                         ids=[f"{c[0]}:{' '.join(c[1])[:40]}" for c in CASES])
def test_bad_input_is_one_line_and_nothing_changes(program, args, code, message, world, capsys):
    fill = lambda s: s.replace("{tmp}", str(world))  # noqa: E731
    argv = [fill(a) for a in args]
    if program == "make_zoo":
        argv = ["--spec", str(ROOT / "zoo/specs/digits.yaml"), "--no-mlflow",
                *(["--out", str(world / "new-zoo")] if "--out" not in argv else []), *argv]
    before = _snapshot(world)
    with pytest.raises(SystemExit) as exit_:
        PROGRAMS[program].cli(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == code, err
    assert fill(message) in err and "\n" not in err and "Traceback" not in err, err
    assert _snapshot(world) == before  # nothing already written changed
    assert not (world / "new-zoo").exists() and not (world / "new-out").exists()  # nothing written when refused
    assert "weights_only=False" not in err  # torch's advice to run the file's code is not repeated


UNREACHABLE = {
    "make_zoo": ["--spec", str(ROOT / "zoo/specs/digits.yaml"), "--out", "{tmp}/unreachable", "--shared-output"],
    "prune_batch": ["--zoo", "{tmp}/zoo", "--methods", "none", "--out", "{tmp}/unreachable"],
    "meta_train": ["--zoo", "{tmp}/zoo", "--out", "{tmp}/unreachable"],
    "tune": ["--set", "zoo={tmp}/zoo", "--out", "{tmp}/unreachable"],
}


@pytest.mark.parametrize("variable, names", [("RAY_ADDRESS", "Ray cluster at 127.0.0.1:1 does not answer"),
                                              ("MLFLOW_TRACKING_URI", "MLflow tracking server")])
@pytest.mark.parametrize("program", UNREACHABLE)
def test_a_cluster_or_server_that_does_not_answer_is_one_line_within_seconds(program, variable, names, world,
                                                                            capsys, monkeypatch):
    """Ray retries a GCS address and MLflow an HTTP request for minutes, silently: each pipeline
    asks first, with a bounded wait, and writes nothing."""
    import time

    monkeypatch.setenv(variable, "127.0.0.1:1" if variable == "RAY_ADDRESS" else "http://127.0.0.1:1")
    argv = [a.replace("{tmp}", str(world)) for a in UNREACHABLE[program]]
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        PROGRAMS[program].cli(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and names in err and "\n" not in err, err
    assert err.startswith(f"{program}: ") and time.perf_counter() - started < 30
    assert not (world / "unreachable").exists()


@pytest.mark.parametrize("program", ["make_zoo", "prune_batch", "tune"])
def test_an_output_in_use_is_refused_with_the_holder_named(program, world, capsys):
    busy = str(world / f"busy-{program}")
    argv = {"make_zoo": ["--spec", str(ROOT / "zoo/specs/digits.yaml"), "--out", busy, "--no-mlflow"],
            "prune_batch": ["--zoo", str(world / "zoo"), "--methods", "none", "--out", busy],
            "tune": ["--set", f"zoo={world / 'zoo'}", "--out", busy]}[program]
    with exclusive(busy, f"another {program}"):
        with pytest.raises(SystemExit) as exit_:
            PROGRAMS[program].cli(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 3 and f"is in use by another run (another {program}, pid" in err
    assert sorted(p.name for p in Path(busy).iterdir()) == [".lock"]  # the second run wrote nothing
    with exclusive(busy, "the next run"):  # released when the holder is done
        pass


def test_an_unreadable_member_fails_only_what_needs_it(world):
    config = {**prune_batch.DEFAULTS, "zoo": str(world / "broken-zoo"), "split": "test"}
    sources = batch.find_sources(config)  # the truncated file is a train member: not needed here
    assert [s.name for s in sources] == ["resnet-000000000002"] and sources[0].error is None
    sources = batch.find_sources(dict(config, split="train"))
    assert len(sources) == 1 and "not a readable Arrow IPC file" in sources[0].error  # its rows fail, with why
    with pytest.raises(Exception, match="resnet-000000000000.arrow: not a readable"):
        Zoo(str(world / "broken-zoo")).metadata()  # without skip_unreadable nothing is skipped silently


def test_nan_weights_fail_the_row_naming_the_tensor(world):
    from zoo.data import load_digits
    from zoo.model_files import save_model

    model = build_model(resnet_spec(8, (4, 6, 8), in_channels=1)).eval()
    with torch.no_grad():
        model.layers[1].conv2.weight[0, 0, 0, 0] = float("nan")
    save_model(model, str(world / "nan.pt"))
    source = batch.Source("nan", str(world / "nan.pt"))
    config = {**prune_batch.DEFAULTS, "arch": None, "batch_size": 64, "augment": False}
    rows = batch.prune_model(source, "none", [{"target": 2.0, "floor": None}], config, load_digits(), None,
                                   str(world / "nan-out"))
    assert rows[0]["status"] == "failed" and "layers.1.conv2.weight has non-finite values" in rows[0]["error"]


def test_a_model_for_another_input_fails_its_row_in_one_line_naming_the_shape(world):
    from zoo.data import load_digits
    from zoo.model_files import save_model

    save_model(build_model(resnet_spec(8, (4, 6, 8), in_channels=3)).eval(), str(world / "rgb.pt"))  # 3 channels
    config = {**prune_batch.DEFAULTS, "arch": None, "batch_size": 64, "augment": False}
    rows = batch.prune_model(batch.Source("rgb", str(world / "rgb.pt")), "none", [{"target": 2.0, "floor": None}],
                             config, load_digits(), None, str(world / "rgb-out"))
    assert rows[0]["status"] == "failed" and "does not take the dataset's input of shape (1, 1, 8, 8)" in rows[0]["error"]
    assert "\n" not in rows[0]["error"] and len(rows[0]["error"]) < 400


def test_a_model_for_another_class_count_fails_its_row_naming_both_counts(world):
    """Issue 37, case 9: a 2-class model on digits (10 classes) failed as ``IndexError: Target 2 is
    out of bounds`` from the loss, naming neither count."""
    from zoo.data import load_digits
    from zoo.model_files import save_model

    save_model(build_model(resnet_spec(8, (4, 6, 8), in_channels=1, num_classes=2)).eval(), str(world / "two.pt"))
    config = {**prune_batch.DEFAULTS, "arch": None, "batch_size": 64, "augment": False}
    rows = batch.prune_model(batch.Source("two", str(world / "two.pt")), "none", [{"target": 2.0, "floor": None}],
                             config, load_digits(), None, str(world / "two-out"))
    assert rows[0]["status"] == "failed" and "\n" not in rows[0]["error"], rows[0]["error"]
    assert f"{world / 'two.pt'}: the model has 2 outputs, the dataset digits has 10 classes" in rows[0]["error"]


# what Ray Tune keeps as a failed trial's error (``Result.error``, also its error.txt): the worker's
# header in ANSI colours, then the trial function's traceback
RAY_TRIAL_ERROR = (
    "\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=51234, ip=127.0.0.1, actor_id=4f3c2a, "
    "repr=trial)\n  File \"/venv/lib/python3.11/site-packages/ray/tune/trainable/trainable.py\", line 331, "
    "in train\n    raise skipped from exception_cause(skipped)\n"
    "  File \"/venv/lib/python3.11/site-packages/ray/air/_internal/util.py\", line 107, in run\n"
    "    self._ret = self._target(*self._args, **self._kwargs)\n"
    "  File \"/work/main/zoo/tuning.py\", line 38, in trial\n"
    "    members = [make_member(r.id, build_model(r.arch), r.graph, cfg) for r in records]\n"
    "  File \"/work/main/zoo/arch.py\", line 201, in build_model\n"
    "    raise ValueError(f\"unknown architecture family {family!r}\")\n"
    "\x1b[31mValueError\x1b[39m: unknown architecture family 'resnex'")


def test_a_search_whose_every_trial_failed_names_the_first_failure_in_one_line(tmp_path):
    """Issue 37, case 7: no trial reported a score; the line names the first failed trial, its
    exception (ANSI colours stripped) and its log, not two 300-character pieces of Ray's headers."""
    from types import SimpleNamespace

    from zoo.tuning import no_score_message

    folders = [tmp_path / f"trial_8a1f2_0000{i}_{i}_lr=0.01" for i in range(3)]
    for folder in folders:
        folder.mkdir()
        (folder / "error.txt").write_text(f"Failure # 1\n{RAY_TRIAL_ERROR}\n")
    results = [SimpleNamespace(error=RuntimeError(RAY_TRIAL_ERROR), path=str(f), metrics={}) for f in folders]
    line = no_score_message(results)
    assert line == (f"no trial reported a score; trial 0 failed: ValueError: unknown architecture family 'resnex' "
                    f"(log: {folders[0] / 'error.txt'}); 2 other trial(s) failed too"), line
    assert "\x1b" not in line and "\n" not in line
    from ray.exceptions import RayTaskError  # the class only: no Ray starts

    wrapped = RayTaskError("train", RAY_TRIAL_ERROR, ValueError("unknown architecture family 'resnex'"),
                           proctitle="ray::ImplicitFunc.train", pid=1, ip="127.0.0.1").as_instanceof_cause()
    assert no_score_message([SimpleNamespace(error=wrapped, path=None, metrics={})]) == \
        "no trial reported a score; trial 0 failed: ValueError: unknown architecture family 'resnex'"


def test_model_paths_with_brackets_are_files_not_patterns(tmp_path):
    from zoo.model_files import save_model

    folder = tmp_path / "run [2]"
    folder.mkdir()
    save_model(build_model(resnet_spec(8, (4, 6, 8), in_channels=1)).eval(), str(folder / "net[a].pt"))
    config = {**prune_batch.DEFAULTS, "models": [str(folder / "net[a].pt")]}
    assert [s.name for s in batch.find_sources(config)] == ["net[a]"]
    assert [s.name for s in batch.find_sources(dict(config, models=[str(folder)]))] == ["net[a]"]


def test_a_member_whose_accuracy_is_not_its_recorded_one_is_flagged_in_its_rows(world):
    """A member file altered after the build (still valid Arrow) prunes, but its rows say so."""
    from zoo.data import load_digits

    config = {**prune_batch.DEFAULTS, "zoo": str(world / "zoo"), "split": "test", "arch": None, "batch_size": 64,
              "augment": False, "before_steps": 0, "after_steps": 0}
    (source,) = batch.find_sources(config)
    assert source.recorded_val_acc == 0.5  # what the world's member records
    data = load_digits()
    rows = batch.prune_model(source, "none", [{"target": 2.0, "floor": None}], config, data, None,
                             str(world / "drift-out"))
    assert rows[0]["status"] == "ok" and abs(rows[0]["val_acc_before"] - 0.5) > batch.ACCURACY_DRIFT
    assert f"{source.ref}: validation accuracy" in rows[0]["warning"] and "50.0% recorded" in rows[0]["warning"]
    honest = batch.Source(source.name, source.ref, source.zoo, source.digest, recorded_val_acc=rows[0]["val_acc_before"])
    assert batch.prune_model(honest, "none", [{"target": 2.0, "floor": None}], config, data, None,
                             str(world / "drift-out"))[0]["warning"] is None


def test_results_are_reused_only_when_what_produced_them_is_unchanged():
    settings = {"before_steps": 10, "seed": 0}
    sha, text = batch.settings_digest(settings)
    current = {"model_sha": "m1", "metanet_sha": "n1", "settings_sha": sha, "settings": text}
    assert batch.why_recompute(dict(current), current) is None
    assert batch.why_recompute(dict(current, model_sha="m0"), current) == "the model file changed"
    assert batch.why_recompute(dict(current, metanet_sha="n0"), current) == "the metanetwork file changed"
    old_sha, old_text = batch.settings_digest(dict(settings, before_steps=5))
    assert batch.why_recompute(dict(current, settings_sha=old_sha, settings=old_text), current) == \
        "settings changed: before_steps 5 -> 10"
    assert "no fingerprint" in batch.why_recompute({"model_sha": float("nan")}, current)
    # an allocation metanetwork's content is in the fingerprint of the rows it allocated, not its path
    learned = dict(settings, allocation="learned", allocator="/a/allocator.pt", allocator_sha="a1")
    sha, text = batch.settings_digest(learned)
    current = {"model_sha": "m1", "metanet_sha": "", "settings_sha": sha, "settings": text}
    assert batch.settings_digest(dict(learned, allocator="/elsewhere/allocator.pt"))[0] == sha
    old_sha, old_text = batch.settings_digest(dict(learned, allocator_sha="a0"))
    assert batch.why_recompute(dict(current, settings_sha=old_sha, settings=old_text), current) == \
        "settings changed: allocator_sha 'a0' -> 'a1'"
    assert batch.settings_digest(settings) == batch.settings_digest(dict(settings, allocator=None))


def test_growing_a_zoo_never_moves_a_member_between_roles():
    spec = load_spec(None)
    small = {m.id: m.role for m in members(spec, 1, 10, 8)}
    grown = {m.id: m.role for m in members(dict(spec, members=spec["members"] + 9), 1, 10, 8)}
    shrunk = {m.id: m.role for m in members(dict(spec, members=6), 1, 10, 8)}
    assert {i: grown[i] for i in small} == small and {i: small[i] for i in shrunk} == shrunk
    assert set(small.values()) == {"train", "val", "test"}
    # raising the test fraction only moves members into 'test'
    more_test = {m.id: m.role for m in members(dict(spec, test_members=0.3), 1, 10, 8)}
    moved = {i for i in small if more_test[i] != small[i]}
    assert moved and all(more_test[i] == "test" for i in moved)


def test_graph_with_missing_or_extra_edge_rows_names_the_layer():
    model = build_model(resnet_spec(8, (4, 6, 8), in_channels=1)).eval()
    graph = network_to_graph(model, torch.zeros(1, 1, 8, 8))
    short = copy.copy(graph)
    short.edge_feat = dict(graph.edge_feat, k3x3=graph.edge_feat["k3x3"][:-20])
    with pytest.raises(GraphMismatchError, match=r"must be \[208, 9\], got \(188, 9\) \(layer weight "
                                                 r"'layers.2.conv2.weight' needs rows 144..207\)"):
        graph_to_network(short, model)
    long = copy.copy(graph)
    long.edge_feat = dict(graph.edge_feat, k3x3=torch.cat([graph.edge_feat["k3x3"], graph.edge_feat["k3x3"][:2]]))
    with pytest.raises(GraphMismatchError, match=r"'k3x3' must be \[208, 9\], got \(210, 9\)"):
        graph_to_network(long, model)
    extra = copy.copy(graph)
    extra.edge_feat = dict(graph.edge_feat, k5x5=torch.zeros(3, 25))
    with pytest.raises(GraphMismatchError, match=r"type\(s\) \['k5x5'\]"):
        graph_to_network(extra, model)


def test_plan_reuses_only_rows_made_by_the_same_inputs():
    sources = [batch.Source("a", "/a.pt", digest="m1"), batch.Source("b", "/b.pt", digest="m2")]
    runs = [{"target": 2.0, "floor": None}]
    settings = batch.settings_digest({"before_steps": 10})
    first = batch.plan(sources, ["none"], runs, [], "", settings)
    assert first.reused == 0 and [(s.name, m) for s, m, _ in first.jobs] == [("a", "none"), ("b", "none")]
    done = [dict(r, model=s.name, method=m, status="ok") for s, m, todo in first.jobs for r in todo]
    again = batch.plan(sources, ["none"], runs, done, "", settings)
    assert again.reused == 2 and not again.jobs and len(again.rows) == 2
    third = batch.plan([batch.Source("a", "/a.pt", digest="m9"), sources[1]], ["none"], runs, done, "", settings)
    assert [s.name for s, _, _ in third.jobs] == ["a"] and len(third.rows) == 1  # b's row kept as it was
    assert third.notes == ["a / none / 2x: recomputed (the model file changed)"]
    other = batch.plan(sources, ["none"], runs, done, "", batch.settings_digest({"before_steps": 5}))
    assert len(other.jobs) == 2 and "settings changed: before_steps 10 -> 5" in other.notes[0]


def test_built_members_of_a_role_are_read_from_their_own_files(world):
    zoo = Zoo(str(world / "broken-zoo"), skip_unreadable=True)  # the train member's file is truncated
    assert [r.id for r in zoo.built("test")] == ["resnet-000000000002"] and zoo.built("test")[0].graph is not None
    assert [r.id for r in zoo.built()] == ["resnet-000000000001", "resnet-000000000002"]


def _tree(pid: int) -> set[int]:
    """``pid`` and every process descended from it (from /proc)."""
    import os

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        todo += children.get(p, [])
    return found


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its entry waits for a parent to reap it


@pytest.mark.slow
def test_a_killed_drivers_ray_processes_exit_on_their_own(tmp_path):
    """Case 14: after ``kill -9`` of a driver that started a local Ray, every process it started
    (GCS, raylet, and the dashboard and runtime-env agents that outlive it, re-parented to init)
    is gone within 90 s (measured: about 62 s; Ray's agents wait out a 60 s report to the dead GCS).
    Whatever is left at the end is killed by its process id."""
    import os
    import signal
    import subprocess
    import time

    script = tmp_path / "driver.py"
    script.write_text(f"import sys, time\nsys.path.insert(0, {str(ROOT)!r})\n"
                      "from distributed.ray_env import init_ray\ninit_ray(num_cpus=1)\n"
                      "print('ready', flush=True)\ntime.sleep(600)\n")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    started: set[int] = set()
    try:
        assert driver.stdout.readline().strip() == "ready"
        time.sleep(2)  # the agents start just after the raylet
        started = _tree(driver.pid) - {driver.pid}
        assert len(started) >= 4, started  # gcs_server, raylet, its agents, the monitors
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and any(_alive(p) for p in started):
            time.sleep(2)
        left = sorted(p for p in started if _alive(p))
        assert not left, f"still running 90 s after the driver's kill -9: {left}"
    finally:
        driver.kill()
        for p in started:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
