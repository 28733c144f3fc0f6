"""Batch pruning as a library: which models to prune, one model's rows (the work of one Ray task
in ``pipelines/prune_batch.py``), the results store with its resume key, and the summary.

A row is one model, method and target (or accuracy floor). Every row records what produced it:
content hashes of the model file (or zoo member file) and of the metanetwork file, and the
settings that change its result (``RESULT_SETTINGS``); ``plan`` reuses a finished row only when
all of them match, and says why it recomputes one otherwise.
"""

from __future__ import annotations

import glob
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from distributed.schema import load_yaml, require_regular_file
from metanet.criteria import CRITERIA
from metanet.diagnostics import CURVE_SPEEDUPS, diagnose
from metanet.files import atomic_write, atomic_write_text
from metanet.metanetwork import load_metanetwork
from metanet.paired import mean_ci, paired_key_table, paired_table, target_label, with_best
from metanet.plotting import pyplot
from metanet.prune import count
from metanet.recipe import (
    ALL_METHODS, HAND_CRAFTED, LEARNED_AS, WEIGHT_BASELINES, WEIGHT_METHODS, prepare, prune_and_finetune, reads_labels,
    recipe_from_settings, sparsify_and_finetune)
from metanet.reconstruct import TARGETS
from metanet.train import evaluate
from metanet.weight_pruning import SCOPES, WeightPruning, parse_nm
from zoo.arch import arch_spec, build_model, parse_import_arch
from zoo.data import load_dataset
from zoo.integrity import DAMAGED_MEMBERS, checked
from zoo.model_files import load_model, save_model
from zoo.store import Zoo, file_sha256


class BatchInputError(ValueError):
    """Models, a zoo split or a dataset that cannot be pruned as asked."""


DIAGNOSTICS = ["ratio_spread", "mean_ratio", "share_below_0.1", "acc_recal",
               *(f"curve_{s:g}x" for s in CURVE_SPEEDUPS), "auc"]
# weight-level rows (--sparsity, --nm): what was asked, the zeros measured in the saved weights, the
# nonzero parameters, and the saved file's size raw and compressed (zeros compress)
WEIGHT_COLUMNS = ["sparsity", "nm", "sparsity_measured", "layers_pruned", "params_nonzero", "file_bytes",
                  "file_bytes_compressed"]
# and, when the run reconstructs (only then: rows of runs without it keep their digests)
RECONSTRUCT_SETTINGS = ("reconstruct", "reconstruct_batches", "reconstruct_ridge", "reconstruct_targets")
RECONSTRUCT_HELP = {
    "reconstruct": "after pruning, re-fit every layer that reads pruned channels by least squares to the unpruned "
                   "network's outputs on calibration inputs (metanet.reconstruct; no labels; BatchNorm statistics kept); "
                   "with --before-steps 0 --after-steps 0: post-training pruning",
    "reconstruct_batches": "calibration batches (of --batch-size training inputs) the reconstruction fits on",
    "reconstruct_ridge": "ridge strength of the reconstruction, relative to the mean diagonal of its normal equations",
    "reconstruct_targets": "reconstruction inputs: sequential (each layer reads the already re-fitted pruned network) or "
                           "local (the unpruned network's inputs on the kept channels)",
}
# what a reconstructed row records (metanet.reconstruct.ReconstructReport.summary)
RECONSTRUCT_COLUMNS = ["reconstructed_layers", "reconstruct_error_before", "reconstruct_error_after",
                       "reconstruct_seconds", "reconstruct_peak_mb"]
COLUMNS = ["model", "source", "family", "method", "criterion", "target", "floor", "sparsity", "nm", "status", "error",
           "warning", "speedup", "macs_before", "macs_after", "params_before", "params_after", "val_acc_before",
           "test_acc_before", "val_acc_pruned", "test_acc_pruned", "val_acc", "test_acc", "seconds", "path",
           *DIAGNOSTICS, *WEIGHT_COLUMNS[2:], *RECONSTRUCT_COLUMNS, "model_sha", "metanet_sha", "settings_sha",
           "settings", "node"]
KEY = ["model", "method", "target", "floor", "sparsity", "nm"]
# the settings a row's result depends on (besides its model, method, target/floor and metanetwork)
RESULT_SETTINGS = ("arch", "dataset", "data_root", "before_steps", "before_lr", "after_steps", "after_lr",
                   "batch_size", "augment", "sparse_reg", "seed", "diagnostics", "criterion", "learned_as")
# and, in a weight-level run (only: channel-pruning rows of earlier runs keep their digests)
WEIGHT_SETTINGS = ("sparsity_scope", "prune_ends")


@dataclass(frozen=True)
class Source:
    """Where one model comes from: a zoo member (``zoo`` + ``row``) or a file."""

    name: str
    ref: str  # the file path, or "<zoo>#<member id>"
    zoo: str | None = None
    digest: str = ""  # content hash of the file the model is read from
    error: str | None = None  # set when the source cannot be read at all (its rows fail without a task)
    recorded_val_acc: float | None = None  # a zoo member's validation accuracy when it was built


# a member whose validation accuracy now differs from its recorded one by more than this (a
# fraction) is flagged in its rows: the same network on the same split gives the same accuracy,
# up to float differences between devices, so a gap means the file or the dataset changed
ACCURACY_DRIFT = 0.01


# ------------------------------------------------------------------------------- the task
def _load(source: Source, arch: dict | None, trust_pickle: bool):
    if source.zoo is not None:
        return Zoo(source.zoo, skip_unreadable=True).record(source.name).network()
    return load_model(source.ref, arch=arch, trust_pickle=trust_pickle)[0]


def check_finite(model, where: str) -> None:
    """A model with NaN or inf weights cannot be pruned meaningfully: say which tensor."""
    import itertools

    import torch

    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {name} has non-finite values (NaN or inf); the model file is broken")


def check_input(model, x, where: str):
    """A model that cannot take the dataset's input (another image size or channel count): one
    line naming the file and the shape, not the tracer's multi-line dump later. Returns the output."""
    import torch

    try:
        with torch.no_grad():
            return model.eval()(x)
    except Exception as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ValueError(f"{where}: does not take the dataset's input of shape {tuple(x.shape)}: "
                         f"{first[:200]}") from None


def check_classes(output, data, where: str) -> None:
    """A classifier with another class count than the dataset's: fewer outputs fail in the loss as
    ``Target 2 is out of bounds`` naming neither count, more would train and prune silently with
    outputs no label ever asks for. ``output``: the model's output for one input."""
    shape = tuple(getattr(output, "shape", ()))
    if len(shape) != 2 or shape[0] != 1:
        raise ValueError(f"{where}: the model's output has shape {shape}, not (1, classes): not a classifier")
    if shape[1] != data.num_classes:
        raise ValueError(f"{where}: the model has {shape[1]} outputs, the dataset {data.name} has "
                         f"{data.num_classes} classes")


def _error(err: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(err)).strip()
    return f"{type(err).__name__}: {text[:400]}"


def prune_model(source: Source, method: str, runs: list[dict], config: dict, data, metanet_path: str | None,
                out: str) -> list[dict]:
    """One Ray task: the rows of one model and method, one per run in ``runs`` (each a dict with
    ``target`` and ``floor``, or ``sparsity`` or ``nm``: weight-level pruning with the settings'
    ``sparsity_scope`` and ``prune_ends``). Never raises for a bad model: its rows say ``failed``."""
    import torch

    torch.set_num_threads(max(1, int(config["cpus_per_task"])))
    torch.manual_seed(config["seed"])
    base = {"model": source.name, "source": source.ref, "method": method, "status": "failed"}
    rows = [dict(base, **r) for r in runs]
    started = time.perf_counter()
    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU when the task was given one
        model = _load(source, config["arch"], config["trust_pickle"]).to(device)
        check_finite(model, source.ref)
        family = _family(model)
        x = torch.zeros(data.input_shape, device=device)
        check_classes(check_input(model, x, source.ref), data, source.ref)
        macs, params = count(model, x)
        val_acc = evaluate(model, data, "val")[0]
        before = {"family": family, "val_acc_before": val_acc, "test_acc_before": evaluate(model, data, "test")[0],
                  "macs_before": macs, "params_before": params, "warning": drift_warning(source, val_acc)}
        # DGL's wheel is a CPU build: on a GPU the metanetwork runs on the plain-PyTorch backend
        metanet = load_metanetwork(metanet_path, None if device == "cpu" else "torch")[0] if method == "meta" else None
        cfg = recipe_from_settings(config, batch_size=config["batch_size"], augment=config["augment"],
                                   seed=config["seed"], sparse_reg=config["sparse_reg"],
                                   target=preparation_target(config))  # the gates' amount
        prepared = prepare(model, data, method, cfg, metanet,
                           level="weights" if any(is_weight_level(r) for r in runs) else "channels")
        if config["diagnostics"]:  # on the test split: a report, nothing is selected with it
            before.update(diagnose(model, prepared.model, data, cfg, CURVE_SPEEDUPS, split="test",
                                   criterion=prepared.criterion))
    except Exception as err:  # the model could not be loaded, converted or trained: every row says why
        return [dict(r, error=_error(err), seconds=time.perf_counter() - started) for r in rows]
    shared = prepared.record.pop("seconds_before_prune")
    for row in rows:
        began = time.perf_counter()
        row.update(before)
        try:
            if is_weight_level(row):
                nm = parse_nm(row["nm"]) if _given(row.get("nm")) else None
                pruning = WeightPruning(sparsity=None if nm else row["sparsity"], nm=nm,
                                        scope=config["sparsity_scope"], dense_ends=not config["prune_ends"])
                pruned, result = sparsify_and_finetune(prepared, data, cfg, pruning, metanet=metanet)
                kept = ("criterion", "sparsity_measured", "layers_pruned", "params_nonzero",
                        "macs_after", "params_after",
                        "val_acc_pruned", "test_acc_pruned", "val_acc", "test_acc",
                        *(c for c in RECONSTRUCT_COLUMNS if c in result))
                result.update(macs_after=macs, params_after=params)  # zeros leave the dense shapes and MACs as they were
            else:
                cfg.target = row["target"] if row["target"] is not None else cfg.target
                cfg.floor = row["floor"]
                pruned, result = prune_and_finetune(prepared, data, cfg)
                kept = ("criterion", "speedup", "macs_after", "params_after", "val_acc_pruned", "test_acc_pruned",
                        "val_acc", "test_acc", *(c for c in RECONSTRUCT_COLUMNS if c in result))
            # under models/.pending until the driver records the row (``publish``): the file a
            # finished row points to is replaced only together with the row
            path = os.path.join(out, "models", PENDING, f"{source.name}__{method}__{run_label(row)}.pt")
            labels = {"target": row["target"], "floor": row["floor"],
                      **{k: row[k] for k in ("sparsity", "nm") if _given(row.get(k))}}
            try:
                save_model(pruned, path, model=source.name, method=method, source=source.ref, **labels)
            except ValueError:  # not a zoo architecture (a trusted pickled module): keep it as one
                atomic_write(path, lambda tmp: torch.save(pruned.cpu(), tmp))
            row.update({k: result[k] for k in kept}, status="ok", error=None, path=path, **file_sizes(path))
        except Exception as err:
            row.update(error=_error(err))
        row["seconds"] = shared + time.perf_counter() - began
    return rows


PENDING = ".pending"  # models/.pending/: pruned models whose rows are not recorded yet


def publish(row: dict, out: str) -> dict:
    """``row`` with its pruned model moved from ``models/.pending`` into ``models/`` (replacing the
    file of the row it replaces): the driver calls it right before it records the row, so that a
    row and its file change together; a row recorded earlier never points at a newer model."""
    path = row.get("path")
    if not isinstance(path, str) or os.path.basename(os.path.dirname(path)) != PENDING:
        return row
    final = os.path.join(out, "models", os.path.basename(path))
    os.replace(path, final)
    return dict(row, path=final)


def file_sizes(path: str) -> dict:
    """A saved model's size in bytes, raw and zlib-compressed (level 6): zeros compress, so this is
    what unstructured sparsity saves on disk or on the wire without a sparse format."""
    import zlib

    with open(path, "rb") as f:
        raw = f.read()
    return {"file_bytes": len(raw), "file_bytes_compressed": len(zlib.compress(raw, 6))}


def drift_warning(source: Source, val_acc: float) -> str | None:
    """A note for a zoo member whose validation accuracy is not the one recorded when it was built
    (``ACCURACY_DRIFT``): its file was altered, or the dataset is not the one it was built on."""
    recorded = source.recorded_val_acc
    if recorded is None or recorded != recorded or abs(val_acc - recorded) <= ACCURACY_DRIFT:
        return None
    return (f"{source.ref}: validation accuracy {100 * val_acc:.1f}% now, {100 * recorded:.1f}% recorded when the "
            "member was built: its file was changed, or the dataset differs from the one it was built on")


def _family(model) -> str:
    try:
        spec = arch_spec(model)
        return spec["target"].split(":")[1] if spec["family"] == "import" else spec["family"]
    except ValueError:
        return type(model).__name__


RUN_KEYS = ("target", "floor", "sparsity", "nm")  # what a run is: one of them set
DEFAULT_TARGETS = [2.0]
# a run's value (target, floor, sparsity) names its rows and files at this many significant digits:
# values are rounded to it when given, so that two values are one run exactly when they name one
PRECISION = 6


def canonical(value: float) -> float:
    """``value`` at ``PRECISION`` significant digits: the value a run prunes to, keys and names."""
    return float(f"{float(value):.{PRECISION}g}")


def _canonical_values(config: dict, key: str, flag: str) -> None:
    """``config[key]`` (a list) rounded to ``PRECISION`` digits, in place; values that round to one
    are refused as repeats (``BatchInputError``), naming both."""
    seen: dict[float, float] = {}
    for value in config[key]:
        c = canonical(value)
        if c in seen:
            given = " ".join(f"{v!r}" for v in config[key])
            raise BatchInputError(f"{flag} {given}: {seen[c]!r} and {value!r} are one value ({c:g}) at the "
                                  f"{PRECISION} significant digits that name rows and files; give each value once")
        seen[c] = value
    config[key] = list(seen)


def check_runs_and_methods(config: dict, targets_given: bool) -> None:
    """prune_batch's runs and methods, checked (``BatchInputError``, one line) and completed in
    place: N:M normalised to ``N:M``, ``--baselines`` added. One kind of pruning per run: channels
    (targets or floor) or weights (sparsity or N:M), each with the methods that have that form."""
    _canonical_values(config, "targets", "--targets")
    _canonical_values(config, "sparsity", "--sparsity")
    if config["floor"] is not None:
        config["floor"] = canonical(config["floor"])
    if config["nm"] is not None:
        try:
            config["nm"] = "{}:{}".format(*parse_nm(config["nm"]))
        except ValueError as err:
            raise BatchInputError(f"--nm: {err}") from None
    if config["sparsity_scope"] not in SCOPES:
        raise BatchInputError(f"--sparsity-scope {config['sparsity_scope']!r}: must be one of {', '.join(SCOPES)}")
    weights = bool(config["sparsity"]) or config["nm"] is not None
    if weights and (config["floor"] is not None or targets_given or config["targets"] != DEFAULT_TARGETS):
        raise BatchInputError("--targets/--floor prune channels, --sparsity/--nm weights: one kind per run")
    if weights and (config["learned_as"] != "criterion" or config["criterion"] != "magnitude"):
        raise BatchInputError("--learned-as and --criterion choose how channels are pruned; with --sparsity/--nm "
                              "the method chooses the weight criterion")
    if not weights and (config["sparsity_scope"] != "global" or config["prune_ends"]):
        raise BatchInputError("--sparsity-scope and --prune-ends apply to --sparsity/--nm runs only")
    if config["baselines"]:
        added = WEIGHT_BASELINES if weights else ("none", "depgraph")
        config["methods"] = list(dict.fromkeys([*config["methods"], *added]))
    bad = [m for m in config["methods"] if m not in (WEIGHT_METHODS if weights else ALL_METHODS)]
    if bad and weights:
        raise BatchInputError(f"method(s) {bad} prune channels only; with --sparsity/--nm use {', '.join(WEIGHT_METHODS)}")
    if bad:
        raise BatchInputError(f"unknown method(s) {bad}; known: {', '.join(ALL_METHODS)}"
                              + ("; wanda prunes weights: with --sparsity or --nm" if "wanda" in bad else ""))


def runs_of(config: dict) -> list[dict]:
    """prune_batch's runs: one per ``sparsity`` and one for ``nm`` (weight-level), else one for
    ``floor`` (adaptive), else one per target."""
    none = dict.fromkeys(RUN_KEYS)
    if config.get("sparsity") or config.get("nm"):
        return ([dict(none, sparsity=float(s)) for s in config.get("sparsity") or []]
                + ([dict(none, nm=config["nm"])] if config.get("nm") else []))
    if config["floor"] is not None:
        return [dict(none, floor=config["floor"])]
    return [dict(none, target=float(t)) for t in config["targets"]]


def preparation_target(config: dict) -> float:
    """The speed-up a method's preparation reads (``metanet.recipe.prepare_reads_target``: learned
    gates are sized for it): the run's first target, or 2 for a floor or weight-level run. Taken from
    the run's settings, never from the rows a task happens to recompute, and in the fingerprint of
    the rows it shapes (``method_settings``)."""
    targets = config.get("targets") or []
    return canonical(targets[0]) if targets and config.get("floor") is None else 2.0


def method_settings(config: dict, methods, reads_target) -> dict[str, tuple[str, str]]:
    """Per method whose preparation reads the target (``reads_target(method)``): the settings'
    digest with that target in it (``preparation_target``), so that a row is reused only when its
    method was prepared for the same target."""
    return {m: settings_digest(config, {"prepared_for_target": preparation_target(config)})
            for m in methods if reads_target(m)}


def check_choices(config: dict) -> None:
    """Each setting that names one of a fixed set of choices is one of them (``BatchInputError``)."""
    for key, allowed in (("learned_as", LEARNED_AS), ("damaged_members", DAMAGED_MEMBERS),
                         ("reconstruct_targets", TARGETS), ("criterion", tuple(CRITERIA))):
        if config[key] not in allowed:
            raise BatchInputError(f"--{key.replace('_', '-')} must be one of {', '.join(allowed)}, not {config[key]!r}")


def check_metanet_level(metanet, config: dict) -> None:
    """A learned criterion prunes at its own level: a channel-scores metanetwork (objective curve)
    channels, a weight-scores one (weight_curve) weights; the paper's edit either."""
    weights = bool(config["sparsity"] or config["nm"])
    if weights and metanet.config.edit == "scores":
        raise BatchInputError(f"--metanet {config['metanet']}: a channel-scores metanetwork (--objective curve) "
                              "ranks channels; --sparsity/--nm need an edit or weight-scores one")
    if not weights and metanet.config.edit == "weight_scores":
        raise BatchInputError(f"--metanet {config['metanet']}: a weight-scores metanetwork (--objective "
                              "weight_curve) ranks weights: prune with --sparsity or --nm")


def _given(value) -> bool:
    return value is not None and value == value  # NaN (a missing number in a frame) is not given


def run_label(row: dict) -> str:
    """A row's run in names and tables: ``2x``, ``floor0.9``, ``sparsity0.8``, ``2of4``: its value
    at ``PRECISION`` digits, as in its key (``row_key``), so that two runs never share a file."""
    def text(v) -> str:
        return f"{canonical(v):.{PRECISION}g}"

    if _given(row.get("nm")):
        return "{}of{}".format(*str(row["nm"]).split(":"))
    if _given(row.get("sparsity")):
        return f"sparsity{text(row['sparsity'])}"
    floor = row.get("floor")
    return f"floor{text(floor)}" if _given(floor) else f"{text(row['target'])}x"


def is_weight_level(row: dict) -> bool:
    return _given(row.get("sparsity")) or _given(row.get("nm"))


# ---------------------------------------------------------------------------- the inputs
def find_sources(config: dict) -> list[Source]:
    """Every model to prune: the zoo split's members, then the files the ``models`` patterns match."""
    sources: list[Source] = []
    if config["zoo"]:
        if config["split"] not in ("train", "val", "test", "all"):
            raise BatchInputError(f"--split must be train, val, test or all, not {config['split']!r}")
        roles = {"train", "val", "test"} if config["split"] == "all" else {config["split"]}
        try:  # an unreadable member fails only its own rows; a damaged one as --damaged-members says
            zoo = checked(config["zoo"], config.get("damaged_members"), roles=roles, who="prune_batch",
                          skip_unreadable=True, override="--damaged-members ")
            meta = zoo.metadata()
        except FileNotFoundError as err:
            raise BatchInputError(f"{err}")
        _check_spec(zoo)
        files = {m.id: f for m, f in zip(meta.itertuples(), _member_files(zoo))}
        for m in meta.itertuples():
            if m.status == "ok" and m.role in roles:
                sources.append(Source(m.id, f"{config['zoo']}#{m.id}", config["zoo"], file_digest(files[m.id]),
                                      recorded_val_acc=float(m.val_acc)))
        for path, error in zoo.unreadable.items():
            if zoo.expected_role(path) in roles:
                name = Path(path).stem
                sources.append(Source(name, f"{config['zoo']}#{name}", config["zoo"], error=error))
        if not sources:
            raise BatchInputError(f"{config['zoo']} has no built members in split {config['split']!r} "
                             f"(roles there: {sorted(set(meta.role))})")
    for pattern in config["models"]:
        if os.path.isdir(pattern):
            inside = os.path.join(glob.escape(pattern), "")
            matches = sorted(glob.glob(inside + "*.pt") + glob.glob(inside + "*.pth"))
            if not matches:
                raise BatchInputError(f"--models {pattern!r}: the folder holds no .pt or .pth files")
        elif os.path.exists(pattern):  # a file named literally, brackets and all: not a pattern
            matches = [pattern]
        else:
            matches = sorted(glob.glob(pattern))
        if not matches:
            raise BatchInputError(f"--models {pattern!r}: no such file, and no .pt/.pth files match it")
        for path in matches:
            require_regular_file(path, f"--models {path}", BatchInputError)  # before hashing it: /dev/zero never ends
            sources.append(Source(Path(path).stem, os.path.abspath(path), digest=file_digest(path)))
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BatchInputError(f"two models share the name(s) {dupes}; rename the files")
    if not sources:
        raise BatchInputError("nothing to prune: give --zoo (and --split) and/or --models")
    return sources


def _check_spec(zoo) -> None:
    """The zoo's spec.json, read now: the dataset and the finetuning settings come from it once the
    output exists, so a damaged one (``ZooFormatError``) is named before anything is written. A
    missing one is said where it is needed (``--dataset`` and the finetuning flags do without it)."""
    try:
        zoo.spec()
    except FileNotFoundError:
        pass


def _member_files(zoo) -> list[str]:
    """The file of each row of ``zoo.metadata()``, in order."""
    return [path for path, _ in zoo.index()]


def file_digest(path: str) -> str:
    """Content hash of a local file (the first 16 hex digits of its SHA-256): ``zoo.store.file_sha256``,
    the digest zoo manifests record."""
    import pyarrow.fs as pafs

    return file_sha256(pafs.LocalFileSystem(), os.path.abspath(path))


def settings_digest(config: dict, extra: dict | None = None) -> tuple[str, str]:
    """The settings that change a row's result (and ``extra``: what one method's rows also depend
    on), as JSON, and their hash."""
    import hashlib
    import json

    keys = (RESULT_SETTINGS + (WEIGHT_SETTINGS if config.get("sparsity") or config.get("nm") else ())
            + (RECONSTRUCT_SETTINGS if config.get("reconstruct") else ()))
    text = json.dumps({**{k: config.get(k) for k in keys}, **(extra or {})}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], text


def why_recompute(previous: dict, current: dict) -> str | None:
    """None when ``previous`` (a finished row) was produced by what ``current`` describes; else
    what changed, in words."""
    import json

    def text(key):  # a missing value reads back from parquet as None or NaN
        value = previous.get(key)
        return value if isinstance(value, str) else ""

    if not text("settings_sha"):
        return "the row records no fingerprint (written by an older version)"
    reasons = []
    if text("model_sha") != current["model_sha"]:
        reasons.append("the model file changed")
    if text("metanet_sha") != current["metanet_sha"]:
        reasons.append("the metanetwork file changed")
    if previous.get("settings_sha") != current["settings_sha"]:
        old, new = json.loads(text("settings") or "{}"), json.loads(current["settings"])
        changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
        reasons.append("settings changed: " + (", ".join(changed) or "(unknown)"))
    return "; ".join(reasons) or None


def load_data(config: dict):
    try:
        if config["dataset"]:
            return load_dataset(config["dataset"], config["data_root"])
        if config["zoo"]:
            return Zoo(config["zoo"]).dataset(config["data_root"])
    except FileNotFoundError as err:
        raise BatchInputError(str(err)) from None
    raise BatchInputError("--dataset is needed when the models do not come from a zoo")


def finetune_defaults(config: dict) -> dict:
    """Batch size and augmentation not given: the zoo's finetuning settings, else 128 with
    augmentation."""
    zoo_settings = {"batch_size": 128, "augment": True}
    if config["zoo"] and (config["batch_size"] is None or config["augment"] is None):
        zoo_settings = Zoo(config["zoo"]).finetune_settings()
    return dict(config, batch_size=config["batch_size"] or zoo_settings["batch_size"],
                augment=config["augment"] if config["augment"] is not None else zoo_settings["augment"])


def arch_file(path: str | None) -> dict | None:
    """``--arch``: a YAML/JSON architecture spec file, or an import path with keyword arguments
    (``torchvision.models:mobilenet_v2,num_classes=10``; see ``zoo.arch``)."""
    if path is None:
        return None

    if ":" in path and not os.path.exists(path):
        try:
            arch = parse_import_arch(path)
            build_model(arch)  # fail here, once, with the reason, not once per model in the Ray tasks
        except ValueError as err:
            raise BatchInputError(f"--arch {err}") from None
        return arch
    if not os.path.exists(path):
        raise BatchInputError(f"--arch file not found: {path}")
    require_regular_file(path, f"--arch {path}", BatchInputError)
    with open(path) as f:
        arch = load_yaml(f)
    if not isinstance(arch, dict) or "family" not in arch:
        raise BatchInputError(f"--arch {path}: not an architecture spec (a mapping with 'family')")
    return arch


# ------------------------------------------------------------------------------- results
def read_results(out: str):
    """The rows an earlier run left in ``out`` (none when there is no results file). A results file
    that cannot be read (cut short by a full disk or a copy) is refused, not replaced: rewriting it
    would drop every row it held."""
    import pandas as pd

    path = os.path.join(out, "results.parquet")
    if not os.path.exists(path):
        return pd.DataFrame(columns=COLUMNS)
    require_regular_file(path, path, BatchInputError)
    try:
        return pd.read_parquet(path)
    except (ValueError, OSError) as err:
        # pyarrow: ArrowInvalid (a ValueError) for a truncated or foreign file, an OSError without an
        # errno for damaged pages ("Corrupt snappy compressed data"); a failing disk keeps its errno
        # (pyarrow's only in the text: distributed.cli reports it as an I/O failure)
        if isinstance(err, OSError) and (err.errno is not None or "[Errno " in str(err)):
            raise
        why = re.sub(r"^Could not open Parquet input source '.*?': ", "", " ".join(str(err).split()))[:200]
        raise BatchInputError(f"{path}: not a readable Parquet file ({why}); move it away or delete it to start "
                              "over (results.csv beside it may hold the same rows)") from None


def write_results(out: str, rows: list[dict]):
    """Rewrites results.parquet and results.csv from ``rows`` (atomically); returns the frame."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame = frame.astype({"target": "float64", "floor": "float64", "sparsity": "float64", "nm": "object"})
    frame = frame.sort_values(KEY, na_position="last").reset_index(drop=True)
    atomic_write(os.path.join(out, "results.parquet"), lambda p: frame.to_parquet(p, index=False))
    atomic_write(os.path.join(out, "results.csv"), lambda p: frame.to_csv(p, index=False))
    return frame


def row_key(row) -> tuple:
    """What identifies a row: model, method, target, floor, sparsity, N:M (NaN and None alike)."""
    def num(v):
        return None if v is None or v != v else canonical(v)

    nm = row.get("nm")
    return (row["model"], row["method"], num(row["target"]), num(row["floor"]), num(row.get("sparsity")),
            nm if _given(nm) else None)


def paired_summary(frame) -> str:
    """Markdown: paired differences (same model) with 95% intervals, per target, in final test
    accuracy and right after pruning (BatchNorm recalibrated): meta and curve against the best
    hand-crafted criterion of the run (chosen on validation accuracy, per target) and against each
    other method, or the methods against each other without meta; '' with one method."""
    ok = frame[(frame.status == "ok") & frame.floor.isna()]
    weights = ok.sparsity.notna() | ok.nm.notna()
    return "\n\n".join(filter(None, [_paired(ok[~weights], HAND_CRAFTED, "target"),
                                      _paired(ok[weights], WEIGHT_BASELINES, "weights")]))


def _paired(ok, hand_crafted, kind: str) -> str:
    """``paired_summary`` of channel-pruning rows (``kind`` "target") or weight-level rows
    ("weights": the runs are their labels, ``sparsity0.8``, ``2of4``)."""
    methods = list(dict.fromkeys(ok.method))
    if len(methods) < 2:
        return ""
    if kind == "weights":
        ok = ok.assign(target=[run_label(r) for r in ok.to_dict("records")])
        text = "Weight-level pruning (sparsity, N:M). "
    else:
        text = ""
    criteria = [m for m in hand_crafted if m in methods]
    leads = [m for m in ("meta", "curve") if m in methods]
    pairs = [(a, b) for a in leads for b in methods if b != a and not (a == "curve" and b == "meta")]
    if not leads:
        pairs = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1:]]
    elif len(criteria) > 1:
        pairs = [(a, "best") for a in leads] + pairs
    targets = sorted(set(ok.target), key=str) if kind == "weights" else sorted(set(ok.target))
    rows = ok.to_dict("records")
    for label, key in (("final test accuracy", "acc"), ("test accuracy right after pruning (BatchNorm recalibrated, "
                                                        "no finetuning)", "acc_pruned")):
        both, chosen = with_best(rows, criteria, f"val_{key}", targets, unit="model")
        text += f"Paired by model, {label}, mean difference in points [95% interval over {ok.model.nunique()} models]"
        if len(criteria) > 1:
            text += ("; best hand-crafted criterion by validation accuracy: "
                     + ", ".join(f"{target_label(t)} {m}" for t, m in chosen.items()))
        text += ":\n\n" + paired_table(both, pairs, targets, f"test_{key}", unit="model") + "\n\n"
    if kind == "target" and ok["auc"].notna().any():
        curve = [r for r in rows if r["target"] == targets[0]]
        keys = [f"curve_{s:g}x" for s in CURVE_SPEEDUPS]
        plain = [p for p in pairs if "best" not in p]
        text += ("Recalibrated pruning curve of the prepared models (no finetuning after pruning), "
                 "paired by model, points:\n\n" + paired_key_table(curve, plain, keys, unit="model") + "\n\n")
    return text.rstrip()


def summary_table(frame) -> str:
    """Markdown: per method and target, the mean over models that finished."""
    ok = frame[frame.status == "ok"]
    lines = ["| method | target | models | reached | test acc before | test acc pruned (BN recal, no ft) | "
             "test acc after | val acc after | s each |", "|---|---|---|---|---|---|---|---|---|"]
    group = ok.assign(run=[run_label(r) for r in ok.to_dict("records")]).groupby(["run", "method"], sort=False)
    order = sorted(group.groups, key=lambda k: (k[0], k[1]))
    for run, method in order:
        g = group.get_group((run, method))
        reached = (f"{100 * g.sparsity_measured.mean():.1f}% zeros" if g.sparsity_measured.notna().any()
                   else f"{g.speedup.mean():.2f}x")
        lines.append(f"| {method} | {run} | {len(g)} | {reached} | {100 * g.test_acc_before.mean():.2f} | "
                     f"{100 * g.test_acc_pruned.mean():.2f} | {100 * g.test_acc.mean():.2f} | "
                     f"{100 * g.val_acc.mean():.2f} | {g.seconds.mean():.0f} |")
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




@dataclass
class Plan:
    """What a run does: ``rows`` it keeps as they are (other models' and methods', rows reused
    unchanged, the failed rows of unreadable sources), ``jobs`` to compute (model, method, the
    runs with their fingerprints), and why each recomputed row is recomputed."""

    rows: list[dict]
    jobs: list[tuple[Source, str, list[dict]]]
    keys: set[tuple]
    reused: int
    notes: list[str]
    # the finished rows this run recomputes: they stay in the results until their replacements
    # exist (a killed run loses nothing), marked by their old fingerprints for the next run
    stale: list[dict] = field(default_factory=list)


def plan(sources: list[Source], methods: list[str], runs: list[dict], previous: list[dict], metanet_sha: str,
         settings: tuple[str, str], per_method: dict[str, tuple[str, str]] | None = None) -> Plan:
    """Which rows of ``sources`` x ``methods`` x ``runs`` (each a dict of target and floor) to
    compute, given the ``previous`` rows of the output: a finished row is reused only when its
    model file, metanetwork file (``meta`` rows) and settings (``per_method``'s for its method,
    else ``settings``) are unchanged (``why_recompute``)."""
    old = {row_key(r): r for r in previous}
    kept, jobs, failed, notes, reused, stale = {}, [], [], [], 0, []
    for source in sources:
        for method in methods:
            settings_sha, settings_json = (per_method or {}).get(method, settings)
            current = {"model_sha": source.digest, "metanet_sha": metanet_sha if method == "meta" else "",
                       "settings_sha": settings_sha, "settings": settings_json}
            todo = []
            for r in runs:
                key = row_key({"model": source.name, "method": method, **r})
                if source.error is not None:
                    failed.append({"model": source.name, "source": source.ref, "method": method, **r,
                                   "status": "failed", "error": source.error, **current})
                    continue
                before = old.get(key)
                reason = why_recompute(before, current) if before is not None and before["status"] == "ok" \
                    else "not done"
                if reason is None:
                    kept[key] = before
                    reused += 1
                    continue
                if reason != "not done":
                    notes.append(f"{source.name} / {method} / {run_label(r)}: recomputed ({reason})")
                if before is not None:
                    stale.append(before)
                todo.append(dict(r, **current))
            if todo:
                jobs.append((source, method, todo))
    keys = {row_key({"model": s.name, "method": m, **r}) for s in sources for m in methods for r in runs}
    rows = [r for k, r in old.items() if k not in keys] + list(kept.values()) + failed
    return Plan(rows, jobs, keys, reused, notes, stale)


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
    return metrics


def write_plots(out: str, frame) -> list[str]:
    """The plots of ``frame``'s finished rows (this run's) that apply: accuracy against speed-up,
    against sparsity, and the pruning curves; the names of those written."""
    if not (frame.status == "ok").any():
        return []
    plots = (("accuracy_vs_speedup.png", plot), ("accuracy_vs_sparsity.png", plot_sparsity),
             ("pruning_curve.png", plot_curves))
    return [name for name, draw in plots if draw(frame, os.path.join(out, name))]
