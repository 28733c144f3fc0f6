"""Where a metanetwork comes from: a file, an MLflow URI (``models:/NAME/VERSION``, ``runs:/ID/PATH``:
``distributed.model_registry``) or, when none is given, the one shipped with the package
(``metanet.pretrained``). The API, ``prune_batch`` and the benchmarks resolve through here, so a URI
or the shipped file means the same everywhere (Tune takes no metanetwork: each trial trains its own)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from distributed.model_registry import is_uri, local_file
from metanet.pretrained import ALLOCATION, CRITERION, shipped  # noqa: F401  (the roles, re-exported)



@dataclass(frozen=True)
class MetanetSource:
    """A metanetwork as a local file: ``path``, what was asked for (``given``: a path, a URI, or
    None for the shipped one), and the line a run prints about it (None for a plain file)."""
    path: str
    given: str | None
    note: str | None = None


def resolve(source: str | os.PathLike | None, role: str = CRITERION) -> MetanetSource:
    """``source`` as a local file: None -> the shipped metanetwork of ``role``; an MLflow URI ->
    downloaded from ``MLFLOW_TRACKING_URI``'s store; a path -> itself (unchecked: the loader names
    a missing or foreign file)."""
    if source is None:
        entry = shipped(role)
        return MetanetSource(entry.path, None, f"no metanetwork given: using {entry.note()}")
    source = os.fspath(source)
    if is_uri(source):
        return MetanetSource(local_file(source), source, f"metanetwork {source} (MLflow)")
    return MetanetSource(source, source)
