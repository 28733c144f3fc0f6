"""prune_batch's results are never silently wrong (issue 37, cases 1, 2, 3 and 5): distinct runs
never share a row or a file, a row is reused only when everything that shaped it is unchanged, the
summary describes this run's rows and pairs nothing else, and a recompute replaces a row and its
model file only when the new ones exist. The driver's bookkeeping runs here in-process, without
Ray (the tasks are stood in for)."""

import sys
from pathlib import Path

import pandas as pd
import pytest

from metanet.metanetwork import MetaNetConfig, MetaNetwork
from metanet.recipe import prepare_reads_target
from zoo import batch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))

import prune_batch  # noqa: E402


# ------------------------------------------------------------------ case 1: canonical values
@pytest.mark.parametrize("flag, values, said", [
    ("--sparsity", ["0.5", "0.5000001"], "--sparsity 0.5 0.5000001: 0.5 and 0.5000001 are one value (0.5)"),
    ("--targets", ["2", "2.0000001"], "--targets 2.0 2.0000001: 2.0 and 2.0000001 are one value (2)"),
])
def test_values_that_would_share_a_row_and_a_file_are_refused_as_repeats(flag, values, said, capsys):
    """They passed the exact "each value once" check, then shared one file and one row key."""
    with pytest.raises(SystemExit) as exit_:
        prune_batch.cli(["--models", "x.pt", "--dataset", "digits", "--methods", "none", flag, *values])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and said in err and "\n" not in err, err


def test_a_runs_key_and_its_file_name_use_one_precision():
    """Values that are distinct runs have distinct keys and distinct file labels, and a value is
    keyed and named as it is pruned to (``canonical``)."""
    config = {**prune_batch.DEFAULTS, "targets": [2.0, 2.00001, 123.4567891], "sparsity": [], "nm": None}
    batch.check_runs_and_methods(config, targets_given=True)
    assert config["targets"] == [2.0, 2.00001, 123.457]
    runs = batch.runs_of(config)
    keys = [batch.row_key({"model": "a", "method": "none", **r}) for r in runs]
    labels = [batch.run_label(r) for r in runs]
    assert len(set(keys)) == len(set(labels)) == 3 and labels == ["2x", "2.00001x", "123.457x"]
    # a row read back from an older results file, its value unrounded, has the same key and name
    old = dict(runs[2], target=123.4567891)
    assert batch.row_key({"model": "a", "method": "none", **old}) == keys[2] and batch.run_label(old) == labels[2]
    sparse = {**prune_batch.DEFAULTS, "sparsity": [0.5, 0.500001], "nm": None}
    batch.check_runs_and_methods(sparse, targets_given=False)
    assert [batch.run_label(r) for r in batch.runs_of(sparse)] == ["sparsity0.5", "sparsity0.500001"]


# ------------------------------------------------- case 2: what a method's preparation reads
def test_gates_are_sized_for_the_runs_first_target_and_their_rows_are_keyed_on_it():
    """``--learned-as gates`` sizes the gates for the first target: a later run with other targets
    must recompute those rows, never reuse them (it reused the 3x row of ``--targets 2 3`` in a
    ``--targets 3`` run)."""
    scores = MetaNetwork(MetaNetConfig(edge_widths={"k3x3": 9}, hidden=4, layers=0, edit="scores"))
    edit = MetaNetwork(MetaNetConfig(edge_widths={"k3x3": 9}, hidden=4, layers=1))
    assert prepare_reads_target("meta", scores, "gates")
    assert not prepare_reads_target("meta", scores, "criterion") and not prepare_reads_target("meta", edit, "gates")
    assert not prepare_reads_target("none", scores, "gates")

    def fingerprints(targets):
        config = {**prune_batch.DEFAULTS, "targets": targets, "floor": None}
        per_method = batch.method_settings(config, ["meta", "none"], lambda m: m == "meta")
        return config, batch.settings_digest(config), per_method

    assert batch.preparation_target({"targets": [2.0, 3.0], "floor": None}) == 2.0
    assert batch.preparation_target({"targets": [3.0], "floor": 0.9}) == 2.0  # a floor run: the default amount
    sources = [batch.Source("a", "/a.pt", digest="m1")]
    _, settings, per_method = fingerprints([2.0, 3.0])
    runs = [{"target": t, "floor": None, "sparsity": None, "nm": None} for t in (2.0, 3.0)]
    first = batch.plan(sources, ["meta", "none"], runs, [], "n1", settings, per_method)
    done = [dict(r, model=s.name, method=m, status="ok") for s, m, todo in first.jobs for r in todo]
    _, settings3, per_method3 = fingerprints([3.0])
    again = batch.plan(sources, ["meta", "none"], runs[1:], done, "n1", settings3, per_method3)
    assert [(m, [r["target"] for r in todo]) for _, m, todo in again.jobs] == [("meta", [3.0])]
    assert again.reused == 1  # none's 3x row: its preparation reads no target
    assert again.notes == ["a / meta / 3x: recomputed (settings changed: prepared_for_target 2.0 -> 3.0)"]


# ------------------------------------------------------------- cases 3 and 5: the driver
def _row(model, method, target, settings, acc, path=None, status="ok"):
    sha, text = settings
    return {"model": model, "source": f"/{model}.pt", "method": method, "target": target, "floor": None,
            "sparsity": None, "nm": None, "status": status, "speedup": target, "test_acc_before": 0.6,
            "val_acc_pruned": acc, "test_acc_pruned": acc, "val_acc": acc, "test_acc": acc, "seconds": 1.0,
            "model_sha": "m-" + model, "metanet_sha": "", "settings_sha": sha, "settings": text, "path": path}


def test_the_summary_holds_this_runs_rows_and_never_pairs_them_with_rows_of_other_settings(tmp_path):
    """``--methods none curve --after-steps 20``, then ``--methods curve --after-steps 1``: the
    second summary paired curve at 1 step with none at 20 (``curve - none -22.1``)."""
    long_, short = batch.settings_digest({"after_steps": 20}), batch.settings_digest({"after_steps": 1})
    models = ["a", "b", "c"]
    earlier = [_row(m, meth, 2.0, long_, 0.5 + i / 10) for i, m in enumerate(models) for meth in ("none", "curve")]
    sources = [batch.Source(m, f"/{m}.pt", digest="m-" + m) for m in models]
    runs = [{"target": 2.0, "floor": None, "sparsity": None, "nm": None}]
    todo = batch.plan(sources, ["curve"], runs, earlier, "", short)
    assert len(todo.jobs) == 3 and len(todo.stale) == 3
    now = [_row(m, "curve", 2.0, short, 0.2) for m in models]
    frame = batch.write_results(str(tmp_path), [r for r in earlier if r["method"] == "none"] + now)
    done, text = batch.write_summary(str(tmp_path), frame, todo)
    assert set(done.method) == {"curve"} and len(done) == 3
    assert "| none |" not in text and "curve - none" not in text and "Paired" not in text
    assert "3 other row(s) in results.parquet come from earlier runs" in text
    assert (tmp_path / "summary.md").read_text().strip() == text


def test_a_killed_recompute_keeps_every_earlier_row_and_file_until_replaced(tmp_path, monkeypatch):
    """24 rows done, ``--after-steps`` changed, the driver killed after the first task: the results
    went to 3 rows, the summary kept the old table, 21 old model files lost their rows. Now every
    earlier row stays (with its old fingerprint: the next run recomputes it), a replaced row and its
    file change together, and the summary is written with the results."""
    out = tmp_path / "out"
    (out / "models" / batch.PENDING).mkdir(parents=True)
    old, new = batch.settings_digest({"after_steps": 80}), batch.settings_digest({"after_steps": 20})
    models = ["a", "b", "c"]
    files = {m: out / "models" / f"{m}__none__2x.pt" for m in models}
    for m, f in files.items():
        f.write_text(f"old model {m}")
    earlier = [_row(m, "none", 2.0, old, 0.5, path=str(files[m])) for m in models]
    batch.write_results(str(out), earlier)
    sources = [batch.Source(m, f"/{m}.pt", digest="m-" + m) for m in models]
    runs = [{"target": 2.0, "floor": None, "sparsity": None, "nm": None}]
    todo = batch.plan(sources, ["none"], runs, batch.read_results(str(out)).to_dict("records"), "", new)
    assert len(todo.jobs) == 3 and not todo.rows and len(todo.stale) == 3

    class Killed(BaseException):
        pass

    def one_task_then_killed(fn, jobs, *, on_result, **_):
        (_, job) = jobs[0]
        pending = out / "models" / batch.PENDING / files[job[0].name].name
        pending.write_text("new model a")  # what the task wrote
        on_result(job, [_row("a", "none", 2.0, new, 0.7, path=str(pending))])
        raise Killed  # kill -9 of the driver: nothing after this runs

    class NoRay:
        put = staticmethod(lambda x: x)
        cluster_resources = staticmethod(lambda: {})

    monkeypatch.setattr(prune_batch, "fan_out", one_task_then_killed)
    monkeypatch.setattr(prune_batch, "ray", NoRay)
    config = {**prune_batch.DEFAULTS, "gpu": None, "metanet": None}
    with pytest.raises(Killed):
        prune_batch._run(todo, config, None, str(out), todo.rows + todo.stale)
    rows = pd.read_parquet(out / "results.parquet").set_index("model")
    assert list(rows.index) == models  # no earlier row was dropped
    assert rows.loc["a", "test_acc"] == 0.7 and rows.loc["a", "settings_sha"] == new[0]
    assert list(rows.loc[["b", "c"], "settings_sha"]) == [old[0]] * 2  # kept, and the next run recomputes them
    assert files["a"].read_text() == "new model a" and rows.loc["a", "path"] == str(files["a"])
    assert [files[m].read_text() for m in "bc"] == ["old model b", "old model c"]  # each row's own file
    summary = (out / "summary.md").read_text()
    assert "| none | 2x | 1 |" in summary and "2 of 3 rows of this run are still being computed" in summary
    assert "keeps the earlier results of 2 of them" in summary
    again = batch.plan(sources, ["none"], runs, batch.read_results(str(out)).to_dict("records"), "", new)
    assert [s.name for s, _, _ in again.jobs] == ["b", "c"] and again.reused == 1
