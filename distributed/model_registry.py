"""Metanetworks in the MLflow Model Registry: logged as MLflow models, registered under a name, and
read back from ``models:/NAME/VERSION`` (or ``models:/NAME@ALIAS``) and ``runs:/RUN_ID/PATH`` URIs.

A metanetwork is logged with MLflow's PyTorch flavour (``mlflow.pytorch.load_model(uri)`` gives the
module back, as MLflow users expect), with this project's own weights-only file beside it
(``extra_files/metanetwork.pt``) and its provenance in the model's metadata (its config, the zoo's
digest, the validation scores it was chosen by). The pipelines read only that file: loading it
runs no code from the store, where the PyTorch flavour's pickle would. No signature is logged:
MLflow's schemas describe tensors and tables, and a metanetwork reads a graph.

Which store: ``MLFLOW_TRACKING_URI`` (a server, or ``sqlite:///...``), as for any MLflow client.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from importlib import metadata as package_metadata

# as distributed.tracking sets them: a store that went away fails a call in well under a minute
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
# a download is a few files: a redrawn progress bar only litters logs (make demo > demo.log)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

URI_SCHEMES = ("models:/", "runs:/")
DIGEST_TAG = "file_sha256"  # a registered version's tag: the metanetwork file's content digest
FILE_NAME = "metanetwork.pt"  # this project's file inside a logged model (extra_files/)
MODEL_NAME = "metanetwork"  # the logged model's name inside its run (runs:/RUN_ID/metanetwork)


class RegistryError(ValueError):
    """A metanetwork URI that cannot be read: no store, no such model, no metanetwork file in it."""


def is_uri(source) -> bool:
    return isinstance(source, str) and source.startswith(URI_SCHEMES)


def cache_dir() -> str:
    return os.environ.get("METAPRUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "metaprune"))


def local_file(uri: str) -> str:
    """A local copy of the metanetwork file that ``uri`` names, downloaded from the tracking store
    into the cache (a temporary folder, then a rename: a killed download leaves nothing half-written).
    A registered version never changes, but an alias or ``latest`` can: every call downloads, and
    the caller keys on the file's content, never on the URI."""
    import mlflow
    from mlflow.exceptions import MlflowException

    store = os.environ.get("MLFLOW_TRACKING_URI")
    if not store:
        raise RegistryError(f"{uri}: set MLFLOW_TRACKING_URI to the MLflow store that holds it (a server, or "
                            "sqlite:///PATH/mlflow.db: the demo's is runs/demo/mlflow.db, meta_train.py's <out>/mlflow.db)")
    mlflow.set_tracking_uri(store)
    root = os.path.join(cache_dir(), "mlflow")
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=root)
    try:
        try:
            got = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        except (MlflowException, OSError) as err:
            raise RegistryError(f"{uri}: not found in {store} ({' '.join(str(err).split())[:200]})") from None
        found = _metanetwork_in(got)
        if found is None:
            raise RegistryError(f"{uri}: holds no {FILE_NAME} (not a metanetwork logged by meta_train.py)")
        with open(found, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        final = os.path.join(root, f"{digest}.pt")
        os.replace(found, final)  # same content, same name: a second download changes nothing
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _metanetwork_in(path: str) -> str | None:
    if os.path.isfile(path):
        return path
    for candidate in (os.path.join(path, "extra_files", FILE_NAME), os.path.join(path, FILE_NAME)):
        if os.path.isfile(candidate):
            return candidate
    return None


def log_metanetwork(net, path: str, run_id: str, register: str | None = None, provenance: dict | None = None) -> str:
    """Logs ``net`` (saved at ``path``) as an MLflow model into run ``run_id`` of the current store;
    with ``register``, also as a new version of that registered model. Returns the URI to read it
    by: ``models:/NAME/VERSION`` when registered, else ``runs:/RUN_ID/metanetwork``."""
    import mlflow

    with tempfile.TemporaryDirectory() as d:
        if os.path.basename(path) != FILE_NAME:  # extra_files keeps the base name: the reader looks for this one
            path = shutil.copy(path, os.path.join(d, FILE_NAME))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                net, name=MODEL_NAME, serialization_format="pickle", extra_files=[path],
                pip_requirements=_requirements(),
                metadata={str(k): v for k, v in (provenance or {}).items()}, registered_model_name=register)
    if register:
        if (provenance or {}).get(DIGEST_TAG):  # which version holds which file (registered_version)
            mlflow.MlflowClient().set_model_version_tag(register, str(info.registered_model_version), DIGEST_TAG,
                                                        str(provenance[DIGEST_TAG]))
        return f"models:/{register}/{info.registered_model_version}"
    return f"runs:/{run_id}/{MODEL_NAME}"


def _requirements() -> list[str]:
    """The logged model's pip requirements: this package and torch, where installed (a checkout run
    without ``pip install``, or a Ray job's uploaded copy, has no metaprune distribution)."""
    found = []
    for name in ("metaprune", "torch"):
        try:
            found.append(f"{name}=={package_metadata.version(name)}")
        except package_metadata.PackageNotFoundError:
            pass
    return found


def latest_version(name: str, digest: str | None = None) -> str | None:
    """``models:/NAME/VERSION`` of the newest version registered under ``name`` in the current
    store (``MLFLOW_TRACKING_URI``), with ``digest``: the newest whose file has that content digest
    (``zoo.store.file_sha256``'s); None when there is none."""
    import mlflow

    if os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    versions = [v for v in mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
                if digest is None or v.tags.get(DIGEST_TAG) == digest]
    return f"models:/{name}/{max(int(v.version) for v in versions)}" if versions else None
