"""MLflow tracking: where runs go, and small helpers shared by the pipelines.

Default tracking URI: a SQLite database in the pipeline's output directory (MLflow's file store
is deprecated); ``MLFLOW_TRACKING_URI`` overrides it, e.g. one ``mlflow server`` on 127.0.0.1 when
many processes write at once. Artifacts of a SQLite-backed experiment go next to the database.
"""

from __future__ import annotations

import json
import os
from typing import Any

import mlflow

# MLflow's HTTP client retries a request with backoff for minutes: a server that went away should
# fail a logging call in well under a minute (a user's own setting wins)
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def check_server() -> None:
    """One line (``SystemExit``) when ``MLFLOW_TRACKING_URI`` names a server that does not answer:
    called before any work starts, so that results are not computed only to hang in logging."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        from distributed.ray_env import check_reachable

        check_reachable(uri, "MLflow tracking server (MLFLOW_TRACKING_URI)",
                        "start it (mlflow server), unset MLFLOW_TRACKING_URI for a local store, or pass --no-mlflow")


def tracking_uri(out_dir: str) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if "://" in out_dir:
        raise ValueError(f"output {out_dir} is not a local path: set MLFLOW_TRACKING_URI to a tracking server")
    os.makedirs(out_dir, exist_ok=True)
    return f"sqlite:///{os.path.abspath(out_dir)}/mlflow.db"


def use_experiment(name: str, out_dir: str) -> str:
    """Points MLflow at the tracking URI for ``out_dir`` and selects (or creates) ``name``."""
    uri = tracking_uri(out_dir)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(name) is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)
    return uri


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys, lists as JSON: MLflow params are flat strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def log_run(experiment: str, out_dir: str, *, run_name: str | None = None, run_id: str | None = None,
            params: dict | None = None, metrics: dict | None = None, step_metrics: dict | None = None,
            artifacts: list[str] = (), figures: dict | None = None, tables: dict | None = None) -> str:
    """One MLflow run (or more logging into run ``run_id``): params (flattened, as strings),
    metrics (NaN left out), ``step_metrics`` as {name: [(step, value), ...]}, artifact files that
    exist, matplotlib figures {file name: figure} and pandas tables {file name: frame}. Returns
    the tracking URI."""
    import math

    uri = use_experiment(experiment, out_dir)
    with (mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=run_name or experiment)):
        if params:
            mlflow.log_params({k: str(v)[:5000] for k, v in flatten(params).items()})
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()
                                if v is not None and not (isinstance(v, float) and math.isnan(v))})
        for name, points in (step_metrics or {}).items():
            for step, value in points:
                mlflow.log_metric(name, float(value), step=int(step))
        for path in artifacts:
            if os.path.exists(path):
                mlflow.log_artifact(path)
        for name, fig in (figures or {}).items():
            mlflow.log_figure(fig, name)
        for name, frame in (tables or {}).items():
            mlflow.log_table(frame, name)
    return uri



RUN_NOTE = "mlflow_run_id"  # in a training's folder: the MLflow run it logs into


def resumable_run(experiment: str, out_dir: str, folder: str, run_name: str, params: dict) -> str:
    """The MLflow run of the work in ``folder`` (one training, one set of inputs): the run the folder
    notes, so that an interrupted training, resumed, goes on logging into its own run; else a new
    run with ``params``, noted in the folder (a temporary name, then a rename) before any worker
    starts. A folder behind a URI keeps no note: each start is a new run."""
    from mlflow.exceptions import MlflowException

    use_experiment(experiment, out_dir)
    note = os.path.join(folder, RUN_NOTE)
    local = "://" not in folder
    if local and os.path.exists(note):
        with open(note) as f:
            run_id = f.read().strip()
        try:
            if mlflow.get_run(run_id).info.lifecycle_stage == "active":
                return run_id
        except MlflowException:
            pass  # deleted from the store, or another store: a new run
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: str(v) for k, v in flatten(params).items()})
    if local:
        os.makedirs(folder, exist_ok=True)
        tmp = f"{note}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(run.info.run_id)
        os.replace(tmp, note)
    return run.info.run_id


def metric_histories(run_id: str, keys) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` of run ``run_id`` in the current tracking store."""
    client = mlflow.MlflowClient()
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}
