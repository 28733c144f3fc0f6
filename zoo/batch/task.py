"""One model's rows: the work of one Ray task of ``pipelines/prune_batch.py`` (load, check, prepare
once, prune to each run, save), and the move of its files into place when the driver records them."""

from __future__ import annotations

import os
import re
import time

from metanet.diagnostics import CURVE_SPEEDUPS, diagnose
from metanet.files import atomic_write
from metanet.levels import Level
from metanet.metanetwork import load_metanetwork
from metanet.methods import METHODS
from metanet.prune import count
from metanet.recipe import prepare, prune_and_finetune, recipe_from_settings
from metanet.train import evaluate
from metanet.weight_pruning import WeightPruning, parse_nm
from zoo.batch.inputs import (Source, family_of, given, load_source, check_classes, check_finite, check_input,
                              drift_warning, is_weight_level, preparation_target, run_label)
from zoo.batch.results import RECONSTRUCT_COLUMNS
from zoo.model_files import save_model


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
        model = load_source(source, config["arch"], config["trust_pickle"]).to(device)
        check_finite(model, source.ref)
        family = family_of(model)
        x = torch.zeros(data.input_shape, device=device)
        check_classes(check_input(model, x, source.ref), data, source.ref)
        macs, params = count(model, x)
        val_acc = evaluate(model, data, "val")[0]
        before = {"family": family, "val_acc_before": val_acc, "test_acc_before": evaluate(model, data, "test")[0],
                  "macs_before": macs, "params_before": params, "warning": drift_warning(source, val_acc)}
        # DGL's wheel is a CPU build: on a GPU the metanetwork runs on the plain-PyTorch backend
        metanet = (load_metanetwork(metanet_path, None if device == "cpu" else "torch")[0]
                   if METHODS[method].uses_metanet else None)
        allocator = (load_metanetwork(config["allocator"], None if device == "cpu" else "torch")[0]
                     if config.get("allocator") else None)
        cfg = recipe_from_settings(config, batch_size=config["batch_size"], augment=config["augment"],
                                   seed=config["seed"], sparse_reg=config["sparse_reg"],
                                   target=preparation_target(config))  # the gates' amount
        prepared = prepare(model, data, method, cfg, metanet,
                           level=Level.WEIGHTS if any(is_weight_level(r) for r in runs) else Level.CHANNELS)
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
                nm = parse_nm(row["nm"]) if given(row.get("nm")) else None
                pruning = WeightPruning(sparsity=None if nm else row["sparsity"], nm=nm,
                                        scope=config["sparsity_scope"], dense_ends=not config["prune_ends"])
                pruned, result = prune_and_finetune(prepared, data, cfg, weights=pruning, metanet=metanet)
                kept = ("criterion", "sparsity_measured", "layers_pruned", "params_nonzero",
                        "macs_after", "params_after",
                        "val_acc_pruned", "test_acc_pruned", "val_acc", "test_acc",
                        *(c for c in RECONSTRUCT_COLUMNS if c in result))
                result.update(macs_after=macs, params_after=params)  # zeros leave the dense shapes and MACs as they were
            else:
                cfg.target = row["target"] if row["target"] is not None else cfg.target
                cfg.floor = row["floor"]
                pruned, result = prune_and_finetune(prepared, data, cfg, allocator=allocator)
                kept = ("criterion", "speedup", "macs_after", "params_after", "val_acc_pruned", "test_acc_pruned",
                        "val_acc", "test_acc", *(c for c in RECONSTRUCT_COLUMNS if c in result))
            # under models/.pending until the driver records the row (``publish``): the file a
            # finished row points to is replaced only together with the row
            path = os.path.join(out, "models", PENDING, f"{source.name}__{method}__{run_label(row)}.pt")
            labels = {"target": row["target"], "floor": row["floor"],
                      **{k: row[k] for k in ("sparsity", "nm") if given(row.get(k))}}
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
