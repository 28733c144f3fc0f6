"""`pipelines/tune.py`: a Ray Tune search with ASHA over a tiny zoo; the default configuration is a
trial; the best configuration file is one that meta_train.py and prune_batch.py accept; MLflow
gets every trial; the test split is scored only for the best configuration."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import build_digits_zoo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))


def _run(*args, timeout=900):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(ROOT / "pipelines/tune.py"), "--num-cpus", "2", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_search_writes_a_best_config_the_pipelines_accept(tmp_path):
    zoo = build_digits_zoo(tmp_path / "zoo")
    search = yaml.safe_load((ROOT / "pipelines/searches/digits.yaml").read_text())
    search.update(zoo=str(tmp_path / "zoo"), num_samples=2, max_epochs=2, grace_period=1, val_members=1)
    # the sampled trial differs from the default in its metanetwork only (a criterion drawn worse
    # than magnitude would decide which trial wins, not the bookkeeping checked here)
    search["space"].update(hidden={"choice": [8]}, layers={"choice": [1, 2]}, criterion={"choice": ["magnitude"]})
    search["fixed"].update(before_steps=10)
    search["space"].pop("before_steps")
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    out = _run("--search", tmp_path / "search.yaml", "--out", tmp_path / "out")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(default)" in out.stdout and "test accuracy of the best configuration on 1 held-out member(s): 4x" in out.stdout
    best = yaml.safe_load((tmp_path / "out/best_config.yaml").read_text())
    assert set(best) == {"meta_train", "prune_batch", "tune"}
    # the best trial's settings: the sampled one's or the default's (the learned criterion, an MLP)
    sampled = (best["meta_train"]["hidden"], best["meta_train"]["layers"] in (1, 2)) == (8, True)
    assert sampled or (best["meta_train"]["hidden"], best["meta_train"]["layers"]) == (32, 0), best["meta_train"]
    assert best["tune"]["val_score"] >= best["tune"]["default_val_score"]
    assert 1 <= best["meta_train"]["epochs"] <= 2 and best["prune_batch"]["before_steps"] == 10
    assert best["prune_batch"]["criterion"] == "magnitude"  # the pruning criterion is a tuned setting
    assert best["tune"]["default_val_score"] is not None  # the default configuration was a trial
    import meta_train
    import prune_batch

    config = meta_train.parse_args(["--config", str(tmp_path / "out/best_config.yaml")])
    assert config["lr"] == best["meta_train"]["lr"] and config["reg"] == best["meta_train"]["reg"]
    config = prune_batch.parse_args(["--config", str(tmp_path / "out/best_config.yaml"), "--methods", "none"])
    assert config["after_lr"] == best["prune_batch"]["after_lr"] and config["targets"] == [4.0]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/out/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["tune-digits"])
    assert len(runs) == 2 + 1  # every trial, and the summary
    trials = runs[runs["tags.mlflow.runName"] != "tune-digits-summary"]
    assert trials["metrics.score"].notna().all() and (trials["metrics.training_iteration"] <= 2).all()
    # the chosen configuration is the trial with the highest score any trial reported (read from MLflow)
    client = mlflow.MlflowClient()
    best_logged = max(m.value for r in trials.run_id for m in client.get_metric_history(r, "score"))
    assert best["tune"]["val_score"] == pytest.approx(best_logged, abs=1e-12)
    assert (tmp_path / "out/tune_scores.png").exists()
    assert len(zoo.metadata()) == 3
    # the same search again resumes the experiment: every trial is finished, none runs again
    again = _run("--search", tmp_path / "search.yaml", "--out", tmp_path / "out")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the search in" in again.stdout
    runs = mlflow.search_runs(experiment_names=["tune-digits"])
    assert len(runs) == 2 + 1  # nothing ran: no run added (no second run per trial, no second summary)
    assert "no new run" in again.stdout
    assert yaml.safe_load((tmp_path / "out/best_config.yaml").read_text())["tune"] == best["tune"]
    # another search into the same output is refused, naming what differs
    other = _run("--search", tmp_path / "search.yaml", "--out", tmp_path / "out", "--set", "num_samples=4")
    assert other.returncode == 2 and "holds another search (different num_samples)" in other.stderr


@pytest.mark.slow
def test_a_weight_level_search_writes_sparsities_prune_batch_accepts(tmp_path):
    """objective weight_curve scored at fractions of zeros: the trials' score is the validation
    weight-level curve, best_config.yaml's prune_batch section asks for those sparsities, and the
    held-out members' test accuracy is reported per sparsity."""
    build_digits_zoo(tmp_path / "zoo")
    search = yaml.safe_load((ROOT / "pipelines/searches/digits.yaml").read_text())
    search.update(zoo=str(tmp_path / "zoo"), num_samples=1, max_epochs=1, grace_period=1, val_members=1,
                  targets=None, sparsities=[0.8, 0.9], space={"lr": {"choice": [0.001]}},
                  fixed={"objective": "weight_curve", "hidden": 8, "layers": 1, "before_steps": 5, "after_steps": 5})
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    out = _run("--search", tmp_path / "search.yaml", "--out", tmp_path / "out")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on 1 held-out member(s): 80% zeros" in out.stdout
    best = yaml.safe_load((tmp_path / "out/best_config.yaml").read_text())
    assert best["meta_train"]["objective"] == "weight_curve" and best["prune_batch"]["sparsity"] == [0.8, 0.9]
    import prune_batch

    config = prune_batch.parse_args(["--config", str(tmp_path / "out/best_config.yaml"), "--methods", "none"])
    assert config["sparsity"] == [0.8, 0.9] and config["after_steps"] == 5


@pytest.mark.parametrize("change, message", [
    ({"space": {"learning_rate": {"uniform": [0, 1]}}}, "space.learning_rate: not an allowed key; must be 'lr'"),
    ({"space": {"lr": {"gaussian": [0, 1]}}}, "space.lr.gaussian: unknown key (allowed: uniform"),
    ({"zoo": "no/such/zoo"}, "zoo directory not found"),
    ({"sparsities": [0.8]}, "give exactly one of targets"),
    ({"targets": None, "sparsities": [0.8]}, "sparsities: a weight-level search needs objective weight_curve"),
    ({"fixed": {"objective": "paper_l1"}}, "targets: objectives weight_curve and paper_l1"),
    ({"targets": None, "sparsities": [1.0], "fixed": {"objective": "weight_curve"}}, "less than 1"),
])
def test_bad_search_files_are_named(change, message, tmp_path, capsys):
    import tune

    search = yaml.safe_load((ROOT / "pipelines/searches/digits.yaml").read_text())
    search.update(change)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(search))
    with pytest.raises(SystemExit) as exit_:  # in-process: refused before Ray starts
        tune.cli(["--search", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err, err


def test_a_resumed_trial_logs_into_the_run_it_started(tmp_path, monkeypatch):
    """After a restart (a new callback, as a restored search has) a trial finds its run by its id."""
    import mlflow
    from types import SimpleNamespace

    from distributed.trial_runs import MLflowTrialRuns

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trial = SimpleNamespace(trial_id="abc_00001", config={"lr": 0.01, "space": {"hidden": 8}})
    first = MLflowTrialRuns("tune-x", str(tmp_path), tags={"search": "x"})
    first.setup()
    first.on_trial_start(0, [trial], trial)
    first.on_trial_result(0, [trial], trial, {"training_iteration": 1, "score": 0.5, "done": False,
                                               "config": {"lr": 0.01}, "trial_id": "abc_00001"})
    again = MLflowTrialRuns("tune-x", str(tmp_path))  # the search restarted
    again.setup()
    again.on_trial_start(0, [trial], trial)
    again.on_trial_result(0, [trial], trial, {"training_iteration": 2, "score": 0.75})
    again.on_trial_complete(0, [trial], trial)
    other = SimpleNamespace(trial_id="abc_00002", config={"lr": 0.1})
    again.on_trial_start(0, [other], other)
    again.on_trial_error(0, [other], other)
    runs = mlflow.search_runs(experiment_names=["tune-x"])
    assert len(runs) == 2
    run = runs[runs["tags.trial_id"] == "abc_00001"].iloc[0]
    assert run["status"] == "FINISHED" and run["params.lr"] == "0.01" and run["params.space.hidden"] == "8"
    history = mlflow.MlflowClient().get_metric_history(run["run_id"], "score")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
    assert "metrics.config.lr" not in runs and "metrics.done" not in runs  # config in params; booleans left out
    assert runs[runs["tags.trial_id"] == "abc_00002"].iloc[0]["status"] == "FAILED"


def test_a_search_may_draw_every_allocation_the_learned_one_from_the_shipped_file(tmp_path, capsys):
    import tune
    from zoo.tuning import trial_allocator

    assert trial_allocator({"allocation": "uniform"}) is None and trial_allocator({}) is None
    assert trial_allocator({"allocation": "learned"}).head.allocates  # the shipped allocation metanetwork
    search = yaml.safe_load((ROOT / "pipelines/searches/digits.yaml").read_text())
    search["space"]["allocation"] = {"choice": ["learned", "nope"]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(search))
    with pytest.raises(SystemExit):  # refused before Ray starts, naming the value and every allocation
        tune.cli(["--search", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "space.allocation.choice: 'nope' is not one of" in err and "learned" in err and "'learned'" not in err, err


@pytest.mark.slow
def test_a_search_that_fixes_the_learned_allocation_hands_its_allocation_metanetwork_to_prune_batch(tmp_path):
    build_digits_zoo(tmp_path / "zoo")
    search = yaml.safe_load((ROOT / "pipelines/searches/digits.yaml").read_text())
    search.update(zoo=str(tmp_path / "zoo"), num_samples=1, max_epochs=1, grace_period=1, val_members=1)
    search["space"] = {"lr": {"choice": [0.003]}}
    search["fixed"].update(allocation="learned", before_steps=5, after_steps=5)
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    out = _run("--search", tmp_path / "search.yaml", "--out", tmp_path / "out")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tune: no metanetwork given: using the shipped allocation metanetwork" in out.stdout
    best = yaml.safe_load((tmp_path / "out/best_config.yaml").read_text())["prune_batch"]
    assert best["allocation"] == "learned" and best["allocator"].startswith(str(tmp_path / "out/metanetworks/"))
    assert os.path.isfile(best["allocator"])


def test_the_default_trial_is_the_default_objective_and_a_trial_follows_its_objective():
    from zoo.search import default_trial, param_space, with_objective_defaults

    trial = default_trial()
    assert (trial["objective"], trial["edit"], trial["layers"], trial["gradient"], trial["score_targets"]) == \
        ("curve", "scores", 0, True, 10.0)
    space = param_space({"space": {"objective": {"choice": ["paper", "curve"]}}, "fixed": {}})
    assert "objective" in space
    # a trial that draws the paper's objective trains the paper's metanetwork, except what the search sets
    search = {"fixed": {"layers": 2}, "space": {"lr": {"choice": [0.01]}}}
    paper = with_objective_defaults({**trial, "objective": "paper", "lr": 0.01, "layers": 2}, search)
    assert (paper["edit"], paper["gradient"], paper["calibration"], paper["layers"], paper["lr"]) == \
        ("additive", False, False, 2, 0.01)
    assert with_objective_defaults(trial, search) == trial
    # a search over objectives and edits: the curve objective trains scores whatever edit was drawn
    both = {"fixed": {}, "space": {"objective": {"choice": ["paper", "curve"]}, "edit": {"choice": ["gate"]}}}
    assert with_objective_defaults({**trial, "edit": "gate"}, both)["edit"] == "scores"
    assert with_objective_defaults({**trial, "objective": "paper", "edit": "gate"}, both)["edit"] == "gate"


def test_the_report_prints_every_trial_best_first_and_plots_the_scores(tmp_path, capsys):
    """``zoo.tuning.print_report`` in-process: trials best first, the default labelled, failed
    trials as errors, the test scores of the best configuration; the scores figure is written."""
    import pandas as pd

    from zoo.tuning import print_report

    history = [pd.DataFrame({"epoch": [0, 1], "score": [0.4, s], "trial": [i, i]}) for i, s in ((0, 0.6), (1, 0.7))]
    report = {"trials": [{"trial": 0, "config": {"lr": 0.003}, "best": 0.6, "epoch": 1},
                         {"trial": 1, "config": {"lr": 0.01}, "best": 0.7, "epoch": 1},
                         {"trial": 2, "config": {"lr": 1.0}, "best": None, "error": "boom"}],
              "best": {"trial": 1, "best": 0.7}, "default": {"trial": 0, "best": 0.6, "iterations": 2},
              "test_score": {2.0: 0.55, "members": 3}, "history": history, "seconds": 12.0}
    print_report(report, tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    rows = [line.split()[0] for line in lines[1:4]]
    assert rows == ["1", "0", "2"] and "(default)" in lines[2] and "error" in lines[3]
    assert any("best: trial 1, validation score 70.00% (default configuration: 60.00%" in line for line in lines)
    assert any("3 held-out member(s): 2x 55.00%" in line for line in lines)
    assert (tmp_path / "tune_scores.png").stat().st_size > 1000


@pytest.mark.parametrize("overrides, message", [
    # a fixed edit the default objective (curve) cannot train: refused, not silently replaced
    (["fixed={edit: gate}"], "fixed.edit: 'gate' with the default objective 'curve': objective curve trains edit scores"),
    # a sampled edit the fixed paper objective cannot train
    (["fixed={objective: paper}", "space={edit: {choice: [additive, scores]}}"],
     "space.edit.choice: 'scores' with fixed.objective 'paper': edit scores is trained with objective curve"),
    # sampled objectives: the paper's trials would get the curve objective's edit
    (["fixed={edit: scores}", "space={objective: {choice: [paper, curve]}}"],
     "fixed.edit: 'scores' with space.objective 'paper': edit scores is trained with objective curve"),
])
def test_a_search_that_gives_a_trial_an_edit_its_objective_cannot_train_is_refused(overrides, message):
    from zoo.search import SearchError, load_search

    with pytest.raises(SearchError, match=re.escape(message)):
        load_search(str(ROOT / "pipelines/searches/digits.yaml"), overrides)
    # objectives and edits sampled together: a trial of an objective with one edit gets it (accepted)
    both = load_search(str(ROOT / "pipelines/searches/digits.yaml"),
                       ["space={objective: {choice: [paper, curve]}, edit: {choice: [additive, gate]}}"])
    assert both["space"]["edit"] == {"choice": ["additive", "gate"]}
