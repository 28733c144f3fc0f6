"""`make zoo`: Ray tasks build the zoo; retries, permanent failures, resume after a killed driver,
read-back accuracy, MLflow. Each run is a subprocess with its own local Ray on 127.0.0.1."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from zoo.arch import build_model
from zoo.data import load_digits
from zoo.store import Zoo
from metanet.train import evaluate
from metanet import graph_to_network

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _spec(tmp_path, members=3):
    spec = yaml.safe_load((ROOT / "zoo/specs/digits.yaml").read_text())
    spec.update(members=members, output=str(tmp_path / "zoo"), seed=4)  # seed 4: roles train, val, train
    spec["families"] = [{"family": "resnet", "depths": [8], "stage_widths": [[4, 6], [6, 8], [8]],
                         "shortcut": ["identity", "projection"]},
                        {"family": "vgg", "depths": [11], "width_mult": [0.0625], "classifier": [[]]}]
    spec["train"]["epochs"] = 2
    spec["finetune"]["epochs"] = 1
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(spec, *extra, env=None, **kw):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(ROOT / "pipelines/make_zoo.py"), "--spec", str(spec), "--num-cpus", "2", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kw)


def test_build_read_back_resume_and_mlflow(tmp_path):
    spec = _spec(tmp_path)
    out = _run(spec)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "0 already built, 3 to build" in out.stdout and "3 members ok, 0 failed" in out.stdout
    zoo = Zoo(str(tmp_path / "zoo"))
    manifest = json.loads((tmp_path / "zoo/manifest.json").read_text())
    assert manifest["counts"] == {"total": 3, "ok": 3, "failed": 0}
    assert len({m["id"] for m in manifest["members"]}) == 3
    # a member's recorded accuracy is the accuracy of the network rebuilt from its graph
    data = load_digits()
    for rec in zoo:
        net = graph_to_network(rec.graph, build_model(rec.arch))
        assert evaluate(net, data, "test")[0] == pytest.approx(rec.metrics["test_acc"], abs=1e-9)
        assert rec.metrics["speedup"] >= 1.3 and rec.role in ("train", "val")
    before = {p: Path(p).read_bytes() for p in zoo.files()}
    again = _run(spec)
    assert again.returncode == 0 and "3 already built, 0 to build" in again.stdout
    assert {p: Path(p).read_bytes() for p in zoo.files()} == before
    # a spec whose split changed re-labels the built members instead of retraining them, when asked
    refused = _run(spec, "--set", "test_members=0.34")
    assert refused.returncode == 2 and "other test_members: built members would change role" in refused.stderr
    assert {p: Path(p).read_bytes() for p in zoo.files()} == before
    other = _run(spec, "--set", "name=another", "--set", "train.epochs=1")
    assert other.returncode == 2 and "another spec (different name, train)" in other.stderr
    split = _run(spec, "--set", "test_members=0.34", "--move-roles")
    assert split.returncode == 0 and "3 already built, 0 to build" in split.stdout
    assert "fractions changed: 1 built member(s) move" in split.stdout and ": train -> test" in split.stdout
    assert sorted(zoo.metadata()["role"]) == ["test", "train", "val"]
    # MLflow: one run per build that built or moved something (the re-run with nothing to do adds
    # none), with the manifest and histogram as artifacts
    assert "no new run" in again.stdout
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/zoo/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["zoo-digits"])
    assert len(runs) == 2 and set(runs["metrics.members_ok"]) == {3.0}
    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(runs.iloc[-1]["run_id"])}
    assert {"manifest.json", "accuracy_histogram.png", "members.json"} <= names


def test_dead_workers_are_retried_and_lasting_failures_recorded(tmp_path):
    spec = _spec(tmp_path)
    fault = f"crash-once:0:{tmp_path},error:1"
    out = _run(spec, env={"METAPRUNE_FAULT_INJECT": fault})
    assert out.returncode == 1, out.stderr[-3000:]  # done, but a member failed
    assert (tmp_path / "crashed-0").exists()  # member 0's worker really died once
    meta = Zoo(str(tmp_path / "zoo")).metadata().set_index("id")
    statuses = sorted(meta.status)
    assert statuses == ["failed", "ok", "ok"]
    failed = meta[meta.status == "failed"].iloc[0]
    assert "injected failure for member 1" in failed.error
    # a re-run retries the failed member (now without the fault) and keeps the others
    again = _run(spec)
    assert "2 already built, 1 to build" in again.stdout and "3 members ok" in again.stdout


def test_a_killed_driver_resumes_without_losing_or_duplicating(tmp_path):
    spec = _spec(tmp_path, members=4)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "pipelines/make_zoo.py"), "--spec", str(spec),
                             "--num-cpus", "1", "--no-mlflow"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    members = tmp_path / "zoo" / "members"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(members.glob("*.arrow"))) < 1:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and every process it started
    proc.wait()
    time.sleep(2)
    written = {p.name: p.read_bytes() for p in members.glob("*.arrow")}
    assert 1 <= len(written) < 4
    out = _run(spec, "--no-mlflow")
    assert out.returncode == 0, out.stderr[-3000:]
    built, todo = map(int, re.search(r"(\d+) already built, (\d+) to build", out.stdout).groups())
    assert built >= len(written) and built + todo == 4
    after = {p.name: p.read_bytes() for p in members.glob("*.arrow")}
    assert len(after) == 4 and all(after[k] == v for k, v in written.items())  # nothing lost or rewritten
    assert Zoo(str(tmp_path / "zoo")).metadata().status.tolist() == ["ok"] * 4


@pytest.mark.parametrize("spec_text, args, message", [
    ("name: x\nmembers: 3\n", [], "dataset: missing (required)"),
    (None, ["--set", "members=0"], "members = 0: must be greater than or equal to 1"),
    (None, ["--address", "127.0.0.1:1"], "would be a path on each node"),
    (None, ["--set", "families=[{family: import, target: 'torchvision.models:mobilenet_v2'}]"],
     "initial_speedup must be 1 for 'import' families"),
    (None, ["--set", "families=[{family: import, target: mobilenet_v2}]"], "families.0.target = 'mobilenet_v2'"),
])
def test_bad_specs_and_cluster_paths_are_refused(spec_text, args, message, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "pipelines"))
    import make_zoo

    spec = _spec(tmp_path)
    if spec_text is not None:
        spec.write_text(spec_text)
    with pytest.raises(SystemExit) as exit_:  # in-process: refused before Ray starts
        make_zoo.cli(["--spec", str(spec), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err, err


def test_import_families_draw_their_choices_per_member():
    from zoo.spec import members, validate

    spec = yaml.safe_load((ROOT / "zoo/specs/digits.yaml").read_text())
    spec.update(members=6, initial_speedup=1.0)
    spec["families"] = [{"family": "import", "target": "torchvision.models:mobilenet_v2",
                         "kwargs": {"inverted_residual_setting": [[1, 8, 1, 1]]},
                         "choices": {"width_mult": [0.25, 0.5]}}]
    validate(spec)
    drawn = members(spec, in_channels=3, num_classes=7, image_size=32)
    assert drawn == members(spec, in_channels=3, num_classes=7, image_size=32)  # deterministic
    assert {m.arch["kwargs"]["width_mult"] for m in drawn} == {0.25, 0.5}
    assert all(m.arch["kwargs"]["num_classes"] == 7 and m.id.startswith("mobilenet_v2-") for m in drawn)
    model = build_model(drawn[0].arch)
    assert model.classifier[-1].out_features == 7
