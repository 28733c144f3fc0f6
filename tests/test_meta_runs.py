"""The library side of a meta-training run, in-process and without Ray: checkpoint selection
(``zoo.meta_runs.select``), the validation diagnostics of an epoch
(``metanet.diagnostics.mean_diagnostics``), distillation on one of several workers
(``metanet.meta_training.distill_across_workers``), the selection and diagnostics figures, and the
settings checks that run before Ray starts (``zoo.meta_settings.check_settings``)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from metanet.metanetwork import MetaNetConfig, MetaNetwork, load_metanetwork


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from conftest import build_digits_zoo

    return build_digits_zoo(tmp_path_factory.mktemp("zoo"))


def _checkpoint(folder, net: MetaNetwork, epoch: int) -> str:
    os.makedirs(folder, exist_ok=True)
    torch.save({"metanet": net.state_dict(), "epoch": epoch}, os.path.join(folder, "state.pt"))
    return str(folder)


def test_select_keeps_the_best_scored_checkpoint_and_writes_both_copies(zoo, tmp_path):
    from zoo.meta_runs import select

    config = {"edge_widths": zoo.edge_widths(), "hidden": 4, "layers": 1}
    nets = {}
    for epoch in (0, 2, 4):
        torch.manual_seed(epoch)
        nets[epoch] = MetaNetwork(MetaNetConfig(**config))
    kept = {e: _checkpoint(tmp_path / f"ckpt{e}", n, e) for e, n in nets.items()}
    settings = {"selection": "recipe", "select_target": 2.0, "metanet": config, "zoo": "z", "inputs_digest": "abc"}
    asked = []

    def score_all(folders):
        asked.extend(folders)
        return [0.3, 0.9, 0.5]  # epoch 2 wins

    run_dir, training = tmp_path / "run", tmp_path / "run" / "training-abc"
    chosen = select(kept, {}, settings, run_dir, str(training), score_all)
    assert asked == [kept[0], kept[2], kept[4]] and chosen["best_epoch"] == 2 and chosen["best_score"] == 0.9
    for path in (run_dir / "metanetwork.pt", training / "metanetwork.pt"):
        net, meta = load_metanetwork(str(path))
        assert meta["epoch"] == 2 and meta["inputs"] == "abc"
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), nets[2].state_dict().values()))
    # by the logged curve areas: no scoring at all; a missing area falls back to the short recipe
    asked.clear()
    by_area = select(kept, {0: 0.7, 2: 0.1, 4: 0.2}, {**settings, "selection": "auc"}, run_dir, str(training),
                     score_all)
    assert by_area["best_epoch"] == 0 and not asked and "curve area" in by_area["how"]
    fallback = select(kept, {0: 0.7, 2: math.nan, 4: 0.2}, {**settings, "selection": "auc"}, run_dir, str(training),
                      score_all)
    assert fallback["best_epoch"] == 2 and asked


def test_mean_diagnostics_averages_members_and_keeps_the_mode(zoo, digits):
    from metanet.diagnostics import mean_diagnostics
    from metanet.recipe import RecipeConfig

    net = MetaNetwork(MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=4, layers=1))
    net.train()
    models = [r.network() for r in zoo.built()[:2]]
    both = mean_diagnostics(net, models, digits, RecipeConfig())
    alone = [mean_diagnostics(net, [m], digits, RecipeConfig()) for m in models]
    assert net.training  # put back as it was
    assert {"auc", "acc_recal", "ratio_spread"} <= set(both)
    for key in ("auc", "acc_recal"):
        assert both[key] == pytest.approx((alone[0][key] + alone[1][key]) / 2)
    assert mean_diagnostics(net, [], digits, RecipeConfig()) == {}


def test_distillation_on_one_worker_moves_the_gates_towards_their_targets(zoo, digits):
    from metanet.gates import gatable, gate_from_logit
    from metanet.meta_training import MetaTrainConfig, distill_across_workers, gate_targets, make_member
    from zoo.arch import build_model

    cfg = MetaTrainConfig(distill_epochs=6, gate_steps=4, lr=1e-2, batch_size=32)
    record = zoo.built("train")[0]
    member = make_member(record.id, build_model(record.arch), record.graph, cfg)
    torch.manual_seed(0)
    net = MetaNetwork(MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=8, layers=1, edit="gate"))
    target = gate_from_logit(gate_targets(member, digits, cfg))[gatable(member.graph)]

    def error():
        with torch.no_grad():
            return float(((gate_from_logit(net.gate_logits(member.graph))[gatable(member.graph)] - target) ** 2).mean())

    before = error()
    distill_across_workers(net, [member], digits, cfg, steps=3)  # no process group: one worker
    assert error() < before


def test_the_selection_and_diagnostics_figures():
    from metanet.plotting import DIAGNOSTIC_PANELS, diagnostics_figure, pyplot, selection_figure

    fig = selection_figure([0, 2, 4], [0.3, 0.9, 0.5], 2, "selection")
    assert len(fig.axes[0].lines) == 2  # the scores and the chosen epoch's marker
    assert diagnostics_figure({}) is None
    history = {k: [(0, 0.5), (1, 0.6)] for k, _, _ in DIAGNOSTIC_PANELS}
    fig2 = diagnostics_figure(history)
    assert len(fig2.axes) == len(DIAGNOSTIC_PANELS)
    for f in (fig, fig2):
        pyplot().close(f)


@pytest.mark.parametrize("changes, message", [
    ({"selection": "best"}, "--selection must be one of recipe, auc, not 'best'"),
    ({"bn_mode": "x"}, "--bn-mode must be one of eval, train"),
    ({"objective": "paper", "edit": "scores"}, "--edit scores with --objective paper: edit scores is trained with "
     "objective curve"),
    ({"objective": "paper", "edit": "weight_scores"}, "weight_scores is trained with objective weight_curve"),
    ({"edit": "additive"}, "--edit additive with --objective curve: objective curve trains edit scores"),
    ({"distill_epochs": 2}, "--distill-epochs needs a gate edit"),
    ({"objective": "paper", "gradient": True}, "--gradient is an input of a learned criterion"),
    ({"objective": "weight_curve", "edit": "additive"}, "--edit additive with --objective weight_curve"),
])
def test_settings_are_refused_before_ray_in_one_line(changes, message):
    from zoo.meta_settings import DEFAULTS, check_settings

    with pytest.raises(SystemExit) as refused:
        check_settings({**DEFAULTS, **changes})
    assert message in str(refused.value.code) and "\n" not in str(refused.value.code)
    curve = check_settings(dict(DEFAULTS))
    assert curve["edit"] == "scores" and os.path.isabs(curve["zoo"]) and os.path.isabs(curve["out"])
    # each objective's measured default checkpoint score (docs/method.md); a choice given is kept
    assert curve["selection"] == "auc" and check_settings({**DEFAULTS, "objective": "paper"})["selection"] == "recipe"
    assert check_settings({**DEFAULTS, "selection": "recipe"})["selection"] == "recipe"


def test_the_default_objective_trains_the_measured_best_criterion_and_paper_keeps_the_papers_metanetwork():
    """No flag: the curve objective with the best learned criterion's settings (a per-channel MLP
    reading evidence, statistics and the curve gradient, regressed on curve scores x10);
    ``--objective paper``: four message-passing layers and the additive edit; a setting given wins."""
    from zoo.meta_settings import DEFAULTS, check_settings

    keys = ("objective", "edit", "layers", "evidence", "calibration", "gradient", "score_targets", "lr", "batch_size")
    assert [check_settings(dict(DEFAULTS))[k] for k in keys] == ["curve", "scores", 0, True, True, True, 10.0, 3e-3, 128]
    paper = check_settings({**DEFAULTS, "objective": "paper"})
    assert [paper[k] for k in keys] == ["paper", "additive", 4, False, False, False, 0.0, 1e-3, 256]
    given = check_settings({**DEFAULTS, "layers": 4, "gradient": False, "calibration": False})
    assert (given["layers"], given["gradient"], given["calibration"]) == (4, False, False)
    assert check_settings({**DEFAULTS, "calibration": False})["calibration"]  # the gradient reads the batches
    assert check_settings({**DEFAULTS, "objective": "weight_curve"})["edit"] == "weight_scores"


@pytest.mark.parametrize("error, code, names", [
    (OSError(28, "No space left on device", "/out/results.parquet"), 4, "/out/results.parquet: No space left"),
    (OSError(30, "Read-only file system", "/ro/out"), 4, "/ro/out: Read-only file system"),
    (OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"), 4, "Errno 28"),
    (NotADirectoryError("/x/a-file: the output is an existing file, not a folder"), 2, "an existing file"),
    (FileExistsError(17, "File exists", "/x/a-file"), 2, "/x/a-file: File exists"),
])
def test_output_and_disk_errors_are_one_line_naming_the_path_with_their_own_exit_code(error, code, names, capsys):
    from distributed.cli import run_cli

    def main(argv):
        raise error

    with pytest.raises(SystemExit) as exit_:
        run_cli(main, "prog", (), [])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == code and names in err and "\n" not in err and err.startswith("prog: ")
    with pytest.raises(ConnectionResetError):  # an OSError that is neither: a bug's traceback, not hidden
        run_cli(lambda argv: (_ for _ in ()).throw(ConnectionResetError(104, "reset")), "prog", (), [])


def test_a_ray_train_failure_is_reduced_to_the_workers_error_line():
    from distributed.cli import training_error

    text = ("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
            '  File "x.py", line 3, in f\n    raise ValueError("lr is nan")\nValueError: loss is nan at epoch 2\n')
    assert training_error(RuntimeError(text)) == "ValueError: loss is nan at epoch 2"
    assert training_error(RuntimeError("controller died")) == "controller died"


def test_log_selection_writes_the_choice_and_figures_into_the_training_run(zoo, tmp_path):
    import mlflow

    from distributed.tracking import resumable_run
    from zoo.meta_runs import log_selection

    config = {"out": str(tmp_path), "name": "metanet", "selection": "recipe"}
    run_id = resumable_run("meta-train", str(tmp_path), str(tmp_path / "metanet" / "training-x"), "metanet", config)
    with mlflow.start_run(run_id=run_id):
        for epoch, auc in enumerate((0.4, 0.5)):
            mlflow.log_metric("val_auc", auc, step=epoch)
    chosen = tmp_path / "metanetwork.pt"
    chosen.write_bytes(b"stands for the chosen file")
    log_selection(config, {"epochs": [0, 1], "scores": [0.3, 0.6], "best_epoch": 1, "best_score": 0.6,
                           "path": str(chosen)}, run_id)
    run = mlflow.get_run(run_id)
    assert run.data.metrics["chosen_epoch"] == 1 and run.data.metrics["chosen_score"] == 0.6
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"selection_scores.png", "validation_diagnostics.png", "metanetwork.pt"} <= names
