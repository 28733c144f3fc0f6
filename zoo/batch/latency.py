"""Measured speed-ups of a batch run (``prune_batch --latency``): each finished row's pruned model
timed against its unpruned model (``metanet.latency``), in the driver once every pruning task has
ended, one pair at a time: a timing made beside running tasks would measure the tasks."""

from __future__ import annotations

import time

from distributed.progress import progress
from metanet.latency import LatencySettings, compare
from zoo.batch.inputs import Source, load_source
from zoo.batch.results import LATENCY_COLUMNS  # noqa: F401  (the columns measure_rows sets)
from zoo.model_files import load_model

LATENCY_DEFAULTS = {"latency": False, **{f"latency_{k}": v for k, v in LatencySettings().model_dump().items()}}
# the settings' bounds as prune_batch checks flags (distributed.settings): refused before any pruning
LATENCY_LIMITS = {f"latency_{k}": {type(m).__name__.lower(): getattr(m, type(m).__name__.lower()) for m in f.metadata}
                  for k, f in LatencySettings.model_fields.items()}
LATENCY_HELP = {
    "latency": "also time each pruned model against its unpruned one (forward passes at batch 1 and "
               "--latency-batch, interleaved, the median of --latency-repeats rounds after --latency-warmup, on the "
               "driver's device once pruning is over) and record latency_ms and latency_speedup beside the MAC speed-up",
    "latency_batch": "the larger batch of --latency (the other is 1)",
    "latency_warmup": "untimed rounds before --latency times",
    "latency_repeats": "timed rounds of --latency (the median is kept)",
    "latency_threads": "CPU threads while --latency times (fixed: the machine's load would change the answer)",
}


def latency_settings(config: dict) -> LatencySettings:
    return LatencySettings(**{k: config[f"latency_{k}"] for k in LatencySettings.model_fields})


def measure_rows(rows: list[dict], keys: set, sources: list[Source], config: dict, input_shape, key_of,
                 device: str = "cpu") -> list[dict]:
    """``rows`` with the latency columns of every finished row whose key (``key_of``) is in ``keys``
    set anew (the others as they were); the unpruned model is loaded once per source."""
    settings = latency_settings(config)
    by_name = {s.name: s for s in sources}
    todo = sorted((i for i, r in enumerate(rows) if key_of(r) in keys and r.get("status") == "ok" and r.get("path")
                   and r["model"] in by_name), key=lambda i: rows[i]["model"])  # each unpruned model loaded once
    out = list(rows)
    unpruned: dict[str, object] = {}
    started, failed = time.perf_counter(), 0
    for i in progress(todo, desc="latency", unit="model"):
        row = out[i]
        try:
            if row["model"] not in unpruned:
                unpruned.clear()  # the previous model's rows are done: its memory (a GPU's too) goes
                unpruned[row["model"]] = load_source(by_name[row["model"]], config["arch"], config["trust_pickle"])
            # this run wrote the pruned file: a pickled module only where the source was one it was trusted with
            pruned = load_model(row["path"], trust_pickle=config["trust_pickle"])[0]
            out[i] = dict(row, latency_batch=settings.batch,
                          **compare(unpruned[row["model"]], pruned, input_shape, settings, device))
        except Exception as err:  # a moved file, memory at a large batch: this row untimed, the rest go on
            failed += 1
            note = f"latency not measured: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
            earlier = row.get("warning") if isinstance(row.get("warning"), str) else None  # NaN in a reused row
            out[i] = dict(row, warning="; ".join(filter(None, [earlier, note])))
    if todo:
        device_label = next((out[i]["latency_device"] for i in todo if out[i].get("latency_device")), device)
        print(f"latency: {len(todo) - failed} pruned models timed against their unpruned ones ({device_label}; "
              f"{time.perf_counter() - started:.0f} s)" + (f"; {failed} could not be (their rows' warning says why)"
                                                          if failed else ""))
    return out
