"""What a run shows: the summary (per method and run, paired differences with 95% intervals), the
plots, the MLflow metrics."""

from __future__ import annotations

import os
import re

from metanet.diagnostics import CURVE_SPEEDUPS
from metanet.files import atomic_write, atomic_write_text
from metanet.levels import Level
from metanet.methods import HAND_CRAFTED, baselines, leads, uses_metanet
from metanet.paired import mean_ci, paired_key_table, paired_table, target_label, with_best
from metanet.plotting import pyplot
from metanet.recipe import reads_labels, recipe_from_settings
from zoo.batch.inputs import run_label
from zoo.batch.plan import Plan, row_key
from zoo.store import Zoo, seen_members


def paired_summary(frame) -> str:
    """Markdown: paired differences (same model) with 95% intervals, per target, in final test
    accuracy and right after pruning (BatchNorm recalibrated): meta and curve against the best
    hand-crafted criterion of the run (chosen on validation accuracy, per target) and against each
    other method, or the methods against each other without meta; '' with one method."""
    ok = frame[(frame.status == "ok") & frame.floor.isna()]
    weights = ok.sparsity.notna() | ok.nm.notna()
    return "\n\n".join(filter(None, [_paired(ok[~weights], HAND_CRAFTED, Level.CHANNELS),
                                      _paired(ok[weights], baselines(Level.WEIGHTS), Level.WEIGHTS)]))


def _paired(ok, hand_crafted, level: Level) -> str:
    """``paired_summary`` of channel-pruning rows (the runs are their targets) or weight-level rows
    (the runs are their labels, ``sparsity0.8``, ``2of4``)."""
    methods = list(dict.fromkeys(ok.method))
    if len(methods) < 2:
        return ""
    if level is Level.WEIGHTS:
        ok = ok.assign(target=[run_label(r) for r in ok.to_dict("records")])
        text = "Weight-level pruning (sparsity, N:M). "
    else:
        text = ""
    criteria = [m for m in hand_crafted if m in methods]
    first = leads(methods)
    pairs = [(a, b) for i, a in enumerate(first) for b in methods if b != a and b not in first[:i]]
    if not first:
        pairs = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1:]]
    elif len(criteria) > 1:
        pairs = [(a, "best") for a in first] + pairs
    targets = sorted(set(ok.target), key=str) if level is Level.WEIGHTS else sorted(set(ok.target))
    rows = ok.to_dict("records")
    for label, key in (("final test accuracy", "acc"), ("test accuracy right after pruning (BatchNorm recalibrated, "
                                                        "no finetuning)", "acc_pruned")):
        both, chosen = with_best(rows, criteria, f"val_{key}", targets, unit="model")
        text += f"Paired by model, {label}, mean difference in points [95% interval over {ok.model.nunique()} models]"
        if len(criteria) > 1:
            text += ("; best hand-crafted criterion by validation accuracy: "
                     + ", ".join(f"{target_label(t)} {m}" for t, m in chosen.items()))
        text += ":\n\n" + paired_table(both, pairs, targets, f"test_{key}", unit="model") + "\n\n"
    if level is Level.CHANNELS and ok["auc"].notna().any():
        curve = [r for r in rows if r["target"] == targets[0]]
        keys = [f"curve_{s:g}x" for s in CURVE_SPEEDUPS]
        plain = [p for p in pairs if "best" not in p]
        text += ("Recalibrated pruning curve of the prepared models (no finetuning after pruning), "
                 "paired by model, points:\n\n" + paired_key_table(curve, plain, keys, unit="model") + "\n\n")
    return text.rstrip()


def summary_table(frame) -> str:
    """Markdown: per method and target, the mean over models that finished."""
    ok = frame[frame.status == "ok"]
    timed = bool("latency_speedup" in ok and ok.latency_speedup.notna().any())
    batch = f"{ok.latency_batch.dropna().iloc[0]:.0f}" if timed else ""
    lines = ["| method | target | models | reached | test acc before | test acc pruned (BN recal, no ft) | "
             "test acc after | val acc after | s each |" + (f" measured speed-up, batch 1 / {batch} |" * timed),
             "|---|---|---|---|---|---|---|---|---|" + "---|" * timed]
    group = ok.assign(run=[run_label(r) for r in ok.to_dict("records")]).groupby(["run", "method"], sort=False)
    order = sorted(group.groups, key=lambda k: (k[0], k[1]))
    for run, method in order:
        g = group.get_group((run, method))
        reached = (f"{100 * g.sparsity_measured.mean():.1f}% zeros" if g.sparsity_measured.notna().any()
                   else f"{g.speedup.mean():.2f}x")
        lines.append(f"| {method} | {run} | {len(g)} | {reached} | {100 * g.test_acc_before.mean():.2f} | "
                     f"{100 * g.test_acc_pruned.mean():.2f} | {100 * g.test_acc.mean():.2f} | "
                     f"{100 * g.val_acc.mean():.2f} | {g.seconds.mean():.0f} |"
                     + (f" {g.latency_speedup.mean():.2f}x / {g.latency_speedup_batch.mean():.2f}x |" * timed))
    if timed:
        lines += ["", "Measured speed-ups: the pruned model's forward pass against the unpruned one's, medians of "
                  f"interleaved rounds ({ok.latency_device.dropna().iloc[0]}); the MAC speed-up is 'reached'."]
    failed = frame[frame.status != "ok"]
    if len(failed):
        lines += ["", f"{len(failed)} failed:", ""]
        lines += [f"- {r.model} / {r.method} / {run_label(r._asdict())}: {r.error}" for r in failed.itertuples()]
    paired = paired_summary(frame)
    return "\n".join(lines) + (f"\n\n{paired}" if paired else "")


def plot(frame, path: str) -> bool:
    """Test accuracy after finetuning against the speed-up reached: per method, each model's rows
    (faint markers) and the mean over models at each target with its 95% interval (error bars),
    and the unpruned networks' mean accuracy as a dashed reference line. False when no row pruned
    channels."""
    import matplotlib.ticker
    from matplotlib.lines import Line2D

    plt = pyplot()

    ok = frame[(frame.status == "ok") & frame.speedup.notna()]
    if ok.empty:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    handles = []
    for (method, g), marker, color in zip(ok.groupby("method"), "os^vD", plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        ax.scatter(g.speedup, 100 * g.test_acc, marker=marker, alpha=0.3, s=16, color=color)
        points = []
        for _, at in g.groupby(g.target.fillna(-1)):
            ci = mean_ci(list(100 * at.groupby("model").test_acc.mean()))
            points.append((at.speedup.mean(), ci.mean, (ci.high - ci.low) / 2 if ci.n > 1 else 0.0))
        points.sort()
        ax.errorbar([x for x, _, _ in points], [y for _, y, _ in points], yerr=[e for _, _, e in points],
                    marker=marker, color=color, capsize=3)
        handles.append(Line2D([], [], color=color, marker=marker, label=f"{method}: mean over models, 95% interval"))
    if "test_acc_before" in ok and ok.test_acc_before.notna().any():
        unpruned = 100 * ok.groupby("model").test_acc_before.first().mean()
        ax.axhline(unpruned, color="gray", ls="--")
        handles.append(Line2D([], [], color="gray", ls="--", label=f"unpruned (mean {unpruned:.1f}%)"))
    handles.append(Line2D([], [], color="gray", marker="o", ls="", alpha=0.4, label="one model at one target"))
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("MAC speed-up reached")
    ax.set_ylabel("test accuracy after finetuning (%)")
    ax.set_title(f"{ok.model.nunique()} models: accuracy vs speed-up")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return True


def plot_latency(frame, path: str) -> bool:
    """Measured against MAC speed-up (left: each row at batch 1 and at the larger batch, the line
    where they agree) and test accuracy against measured speed-up at batch 1 (right), per method.
    False when no row was timed (``--latency``)."""
    plt = pyplot()
    ok = frame[(frame.status == "ok")]
    if "latency_speedup" not in ok or ok.latency_speedup.isna().all():
        return False
    ok = ok[ok.latency_speedup.notna()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (method, g), color in zip(ok.groupby("method"), colors):
        macs = g.speedup.fillna(1.0)
        left.scatter(macs, g.latency_speedup, color=color, marker="o", s=18, label=f"{method}, batch 1")
        left.scatter(macs, g.latency_speedup_batch, color=color, marker="^", s=18, alpha=0.6,
                     label=f"{method}, batch {g.latency_batch.iloc[0]:.0f}")
        right.scatter(g.latency_speedup, 100 * g.test_acc, color=color, s=18, label=method)
    top = max(ok.speedup.fillna(1.0).max(), ok.latency_speedup.max(), ok.latency_speedup_batch.max())
    left.plot([1, top], [1, top], color="gray", ls="--", label="measured = MACs")
    left.set_xlabel("MAC speed-up")
    left.set_ylabel("measured speed-up")
    right.set_xlabel("measured speed-up, batch 1")
    right.set_ylabel("test accuracy after finetuning (%)")
    left.set_title(ok.latency_device.dropna().iloc[0], fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return True


def plot_sparsity(frame, path: str) -> bool:
    """Weight-level rows: test accuracy after finetuning (solid) and right after pruning (dotted)
    against the measured fraction of zero weights, per method the mean over models at each run
    with its 95% interval; N:M runs are labelled at their point. False when there are none."""
    import matplotlib.ticker

    plt = pyplot()
    ok = frame[(frame.status == "ok") & frame.sparsity_measured.notna()]
    if ok.empty:
        return False
    ok = ok.assign(run=[run_label(r) for r in ok.to_dict("records")])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (method, g), marker, color in zip(ok.groupby("method"), "os^vD", colors):
        for key, style, label in (("test_acc", "-", "after finetuning"), ("test_acc_pruned", ":", "right after pruning")):
            points = []
            for run, at in g.groupby("run"):
                ci = mean_ci(list(100 * at.groupby("model")[key].mean()))
                points.append((at.sparsity_measured.mean(), ci.mean, (ci.high - ci.low) / 2 if ci.n > 1 else 0.0, run))
            points.sort()
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker=marker,
                        color=color, ls=style, capsize=3, label=f"{method}, {label}")
            for x, y, _, run in points:
                if "of" in run and key == "test_acc":
                    ax.annotate(run.replace("of", ":"), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    unpruned = 100 * ok.groupby("model").test_acc_before.first().mean()
    ax.axhline(unpruned, color="gray", ls="--", label=f"unpruned (mean {unpruned:.1f}%)")
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_xlabel("zero weights in the pruned layers (measured)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{ok.model.nunique()} models: accuracy vs sparsity (95% interval)")
    return _save(fig, ax, path, 7)


def _save(fig, ax, path: str, legend_size: int) -> bool:
    """A figure's grid and legend, written atomically as PNG, closed."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    pyplot().close(fig)
    return True


def plot_curves(frame, path: str) -> bool:
    """With ``--diagnostics``: each method's recalibrated pruning curve (mean over models, 95%
    interval), the unedited networks' beside them. False when no row has diagnostics."""
    import matplotlib.ticker

    plt = pyplot()

    ok = frame[(frame.status == "ok") & frame["auc"].notna()]
    if ok.empty:
        return False
    first = ok[ok.target == ok.target.min()] if ok.target.notna().any() else ok
    keys = [f"curve_{s:g}x" for s in CURVE_SPEEDUPS]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (method, g), marker in zip(first.groupby("method"), "os^vD"):
        cis = [mean_ci(list(100 * g.groupby("model")[k].mean())) for k in keys]
        ax.errorbar(CURVE_SPEEDUPS, [c.mean for c in cis], yerr=[(c.high - c.low) / 2 if c.n > 1 else 0 for c in cis],
                    marker=marker, capsize=3, label=f"{method}: mean over models, 95% interval")
    unpruned = 100 * first.groupby("model").test_acc_before.first().mean()
    ax.axhline(unpruned, color="gray", ls="--", label=f"unpruned (mean {unpruned:.1f}%)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(CURVE_SPEEDUPS)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(0, 100)
    ax.set_xlabel("MAC speed-up")
    ax.set_ylabel("test accuracy right after pruning (%)")
    ax.set_title(f"recalibrated pruning curve, {first.model.nunique()} models (95% interval)")
    return _save(fig, ax, path, 8)


def write_summary(out: str, frame, todo: Plan, pending: set = frozenset()):
    """``summary.md`` for this run's rows (``todo.keys``) that are done: rows of other runs in the
    same output (other models, methods, targets) are counted, never tabulated or paired with these;
    while the run goes on, how many rows are still to come (``pending``: keys whose earlier rows,
    of other settings, stay in the results until replaced). Written with every write of the
    results, so that it is never older than them. Returns (this run's done rows, the summary)."""
    keys = [row_key(r) for r in frame.to_dict("records")]
    mine = frame[[k in todo.keys for k in keys]]
    done = mine[[k in todo.keys and k not in pending for k in keys if k in todo.keys]]
    waiting = len(todo.keys) - len(done)
    others = len(frame) - len(mine)
    notes = ([f"{waiting} of {len(todo.keys)} rows of this run are still being computed"
              + (f"; results.parquet keeps the earlier results of {len(pending)} of them (other settings) until they "
                 "are replaced" if pending else "") + "."] if waiting else []) + \
        ([f"{others} other row(s) in results.parquet come from earlier runs (other models, methods, targets): not in "
          "this summary."] if others else [])
    text = summary_table(done) + ("\n\n" + "\n".join(notes) if notes else "")
    atomic_write_text(os.path.join(out, "summary.md"), text + "\n")
    return done, text


def post_training_note(config: dict, metanet) -> str:
    """What a run with no training step reads: the reconstruction inputs only, and which methods
    also read labelled batches (``metanet.recipe.reads_labels``)."""
    cfg = recipe_from_settings(config)
    labelled = [m for m in config["methods"] if reads_labels(m, metanet, cfg)]
    return ("post-training (no finetuning): "
            + ("the reconstruction reads calibration inputs only; " if config["reconstruct"] else "")
            + (f"{', '.join(labelled)} also read labelled training batches (a task loss or its gradient)"
               if labelled else "no method reads labels (they are used only to report accuracy)"))


def seen_note(config: dict, sources: list) -> str | None:
    """A warning when zoo members pruned here are networks a shipped metanetwork of this run learned
    from or was chosen on (``zoo.store.seen_members``: the same spec built with its data in another
    folder gives them other ids and roles); pruning them is fine, calling their rows held-out
    results is not. None when there are none."""
    if not config["zoo"]:
        return None
    paths = [config["metanet"]] if config.get("metanet") and uses_metanet(config["methods"]) else []
    paths += [config["allocator"]] if config.get("allocator") else []  # set only for --allocation learned
    pruned = {s.name for s in sources if s.zoo}
    seen = sorted(set(seen_members(Zoo(config["zoo"], skip_unreadable=True), paths)) & pruned)
    if not seen:
        return None
    return (f"warning: {len(seen)} of the members pruned here ({', '.join(seen[:3])}{', ...' if len(seen) > 3 else ''}) "
            "are networks the shipped metanetwork learned from or was chosen on (its training zoo's train or val "
            "members, whatever folder the zoo was built from): their rows are not held-out results")


def mlflow_metrics(frame, wall: float) -> dict[str, float]:
    """A run's MLflow metrics: rows done and failed, wall time, and per method and run the mean
    accuracies and the speed-up (or, weight level, the zeros and the compressed size) reached."""
    ok = frame[frame.status == "ok"]
    metrics = {"rows_ok": float(len(ok)), "rows_failed": float((frame.status != "ok").sum()), "wall_seconds": wall}
    labelled = ok.assign(run=[run_label(r) for r in ok.to_dict("records")])
    for (method, run), g in labelled.groupby(["method", "run"]):
        tag = re.sub(r"[^0-9A-Za-z_.x-]", "_", f"{method}_{run}")
        metrics.update({f"test_acc_{tag}": g.test_acc.mean(), f"val_acc_{tag}": g.val_acc.mean()})
        if g.sparsity_measured.notna().any():  # weight-level rows: the zeros reached and what they save on disk
            metrics.update({f"sparsity_{tag}": g.sparsity_measured.mean(),
                            f"compressed_mb_{tag}": g.file_bytes_compressed.mean() / 1e6})
        else:
            metrics[f"speedup_{tag}"] = g.speedup.mean()
        if "latency_speedup" in g and g.latency_speedup.notna().any():
            metrics.update({f"latency_speedup_{tag}": g.latency_speedup.mean(),
                            f"latency_speedup_batch_{tag}": g.latency_speedup_batch.mean()})
    return metrics


def write_plots(out: str, frame) -> list[str]:
    """The plots of ``frame``'s finished rows (this run's) that apply: accuracy against speed-up,
    against sparsity, and the pruning curves; the names of those written."""
    if not (frame.status == "ok").any():
        return []
    plots = (("accuracy_vs_speedup.png", plot), ("accuracy_vs_sparsity.png", plot_sparsity),
             ("pruning_curve.png", plot_curves), ("latency.png", plot_latency))
    return [name for name, draw in plots if draw(frame, os.path.join(out, name))]
