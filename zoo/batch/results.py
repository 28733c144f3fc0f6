"""The results store: ``results.parquet`` (and ``results.csv``) under the run's output, its columns and
its key."""

from __future__ import annotations

import os
import re

from distributed.schema import require_regular_file
from metanet.diagnostics import CURVE_SPEEDUPS
from metanet.files import atomic_write
from zoo.batch.inputs import BatchInputError


DIAGNOSTICS = ["ratio_spread", "mean_ratio", "share_below_0.1", "acc_recal",
               *(f"curve_{s:g}x" for s in CURVE_SPEEDUPS), "auc"]
# weight-level rows (--sparsity, --nm): what was asked, the zeros measured in the saved weights, the
# nonzero parameters, and the saved file's size raw and compressed (zeros compress)
WEIGHT_COLUMNS = ["sparsity", "nm", "sparsity_measured", "layers_pruned", "params_nonzero", "file_bytes",
                  "file_bytes_compressed"]
# what a reconstructed row records (metanet.reconstruct.ReconstructReport.summary)
RECONSTRUCT_COLUMNS = ["reconstructed_layers", "reconstruct_error_before", "reconstruct_error_after",
                       "reconstruct_seconds", "reconstruct_peak_mb"]
# prune_batch --latency (zoo.batch.latency): measured times at batch 1 and the larger batch, and where
LATENCY_COLUMNS = ["latency_ms", "latency_ms_before", "latency_speedup", "latency_ms_batch",
                   "latency_ms_before_batch", "latency_speedup_batch", "latency_batch", "latency_device"]
COLUMNS = ["model", "source", "family", "method", "criterion", "target", "floor", "sparsity", "nm", "status", "error",
           "warning", "speedup", "macs_before", "macs_after", "params_before", "params_after", "val_acc_before",
           "test_acc_before", "val_acc_pruned", "test_acc_pruned", "val_acc", "test_acc", "seconds", "path",
           *DIAGNOSTICS, *WEIGHT_COLUMNS[2:], *RECONSTRUCT_COLUMNS, *LATENCY_COLUMNS, "model_sha", "metanet_sha",
           "settings_sha", "settings", "node"]
KEY = ["model", "method", "target", "floor", "sparsity", "nm"]


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
