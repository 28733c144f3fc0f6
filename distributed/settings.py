"""Pipeline settings: defaults, then a YAML file (``--config``), then command-line flags.

Each pipeline declares its settings once, as a dict of defaults; the flags are derived from it.
A config file may hold one section per pipeline (``meta_train:``, ``prune_batch:``), as the best
configuration that ``pipelines/tune.py`` writes does; a pipeline reads its own section, or the
whole file when it has none. Unknown keys are an error that names them.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import yaml


def add_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any],
              types: dict[str, type] | None = None) -> None:
    """``--config`` plus one flag per setting (``--some-key``), typed after its default (or after
    ``types``, for settings whose default is None)."""
    parser.add_argument("--config", help="YAML file of settings (flags override it), e.g. a Tune best_config.yaml")
    types = types or {}
    for key, value in defaults.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool) or types.get(key) is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(value, list):
            kind = type(value[0]) if value else str
            parser.add_argument(flag, type=kind, nargs="+", default=None)
        else:
            kind = types.get(key) or (type(value) if value is not None else str)
            parser.add_argument(flag, type=kind, default=None)


def load_config(path: str, section: str, known: set[str], program: str) -> dict[str, Any]:
    """The settings in ``path`` for ``section`` (or the whole file if it has no such section)."""
    if not os.path.exists(path):
        raise SystemExit(f"{program}: config file not found: {path}")
    with open(path) as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise SystemExit(f"{program}: {path}: a config file must be a mapping of settings")
    if section in loaded:
        loaded = loaded[section] or {}
    unknown = set(loaded) - known
    if unknown:
        raise SystemExit(f"{program}: {path}: unknown setting(s) {', '.join(sorted(unknown))}")
    return loaded


def resolve(args: dict[str, Any], defaults: dict[str, Any], section: str, program: str) -> dict[str, Any]:
    """Defaults, updated by the ``--config`` file, updated by the flags that were given. ``args``
    is ``vars(parser.parse_args())``; entries that are not settings pass through unchanged."""
    config = dict(defaults)
    path = args.pop("config", None)
    if path:
        config.update(load_config(path, section, set(defaults), program))
    config.update({k: v for k, v in args.items() if v is not None or k not in defaults})
    return config
