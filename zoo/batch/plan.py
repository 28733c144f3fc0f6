"""What a run reuses and what it recomputes: a row is reused only when the model file, the metanetwork
file and the settings that change its result are the ones it was made from."""

from __future__ import annotations

from dataclasses import dataclass, field

from metanet.allocation import DEFAULT_ALLOCATION
from metanet.methods import METHODS
from zoo.batch.inputs import Source, given, canonical, preparation_target, run_label


# and, when the run reconstructs (only then: rows of runs without it keep their digests)
RECONSTRUCT_SETTINGS = ("reconstruct", "reconstruct_batches", "reconstruct_ridge", "reconstruct_targets")
# the settings a row's result depends on (besides its model, method, target/floor and metanetwork)
RESULT_SETTINGS = ("arch", "dataset", "data_root", "before_steps", "before_lr", "after_steps", "after_lr",
                   "batch_size", "augment", "sparse_reg", "seed", "diagnostics", "criterion", "learned_as")
# and, in a weight-level run (only: channel-pruning rows of earlier runs keep their digests)
WEIGHT_SETTINGS = ("sparsity_scope", "prune_ends")
# and with another allocation than the default (rows of earlier runs keep their digests)
ALLOCATION_SETTINGS = ("allocation", "allocation_candidates")
# and with an allocation metanetwork: its content (its path does not change a result)
ALLOCATOR_SETTINGS = ("allocator_sha",)


def method_settings(config: dict, methods, reads_target) -> dict[str, tuple[str, str]]:
    """Per method whose preparation reads the target (``reads_target(method)``): the settings'
    digest with that target in it (``preparation_target``), so that a row is reused only when its
    method was prepared for the same target."""
    return {m: settings_digest(config, {"prepared_for_target": preparation_target(config)})
            for m in methods if reads_target(m)}


def settings_digest(config: dict, extra: dict | None = None) -> tuple[str, str]:
    """The settings that change a row's result (and ``extra``: what one method's rows also depend
    on), as JSON, and their hash."""
    import hashlib
    import json

    keys = (RESULT_SETTINGS + (WEIGHT_SETTINGS if config.get("sparsity") or config.get("nm") else ())
            + (RECONSTRUCT_SETTINGS if config.get("reconstruct") else ())
            + (ALLOCATION_SETTINGS if config.get("allocation", DEFAULT_ALLOCATION) != DEFAULT_ALLOCATION else ())
            + (ALLOCATOR_SETTINGS if config.get("allocator") else ()))
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


def row_key(row) -> tuple:
    """What identifies a row: model, method, target, floor, sparsity, N:M (NaN and None alike)."""
    def num(v):
        return None if v is None or v != v else canonical(v)

    nm = row.get("nm")
    return (row["model"], row["method"], num(row["target"]), num(row["floor"]), num(row.get("sparsity")),
            nm if given(nm) else None)


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
            current = {"model_sha": source.digest, "metanet_sha": metanet_sha if METHODS[method].uses_metanet else "",
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
