"""Pipeline settings: defaults, then a YAML file (``--config``), then command-line flags.

Each pipeline declares its settings once, as a dict of defaults; the flags are derived from it.
A config file may hold one section per pipeline (``meta_train:``, ``prune_batch:``), as the best
configuration that ``pipelines/tune.py`` writes does; a pipeline reads its own section, or the
whole file when it has none. The file is validated against a schema made from the defaults
(``settings_model``: pydantic, unknown keys forbidden, each value of its default's type), and a
bad one is one line naming the file, the key, the value and what is allowed (``SettingsError``).
"""

from __future__ import annotations

import argparse
import math
import warnings
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationError, create_model

from distributed.schema import Strict, describe, read_mapping


class SettingsError(ValueError):
    """A settings file that is missing, not a mapping, or has an unknown key or a bad value."""


def _distinct(values: list) -> list:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise ValueError(f"each value at most once; {seen[0]!r} is given twice")
    return values


def settings_model(defaults: dict[str, Any], types: dict[str, type] | None = None, name: str = "Settings",
                   limits: dict[str, dict] | None = None):
    """A pydantic model of ``defaults``: every key optional, typed after its default (or ``types``).
    ``limits[key]``: pydantic ``Field`` bounds (``gt``, ``ge``, ``le``, ...; for a list, of each
    item) and ``distinct: True`` (a list without repeats). Numbers must be finite everywhere: no
    setting means anything at NaN or infinity."""
    types, limits = types or {}, limits or {}
    fields: dict[str, Any] = {}
    for key, value in defaults.items():
        bounds = dict(limits.get(key, {}))
        distinct = bounds.pop("distinct", False)
        kind: Any = types.get(key) or (type(value) if value is not None else Any)
        if isinstance(value, list):
            kind = type(value[0]) if value else types.get(key, Any)
        if kind in (int, float):
            kind = Annotated[kind, Field(allow_inf_nan=False, **bounds)] if kind is float else \
                Annotated[kind, Field(**bounds)]
        if isinstance(value, list):
            kind = list[kind]
            if distinct:
                kind = Annotated[kind, AfterValidator(_distinct)]
        if value is None:
            kind = kind | None if kind is not Any else Any
        fields[key] = (kind, value)
    # a setting may share a name with a class attribute pydantic's base inherits (``register``,
    # ABCMeta's): the model only checks values, never reads them as attributes, so the shadowing
    # is harmless and its warning would only litter every log (make demo's)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Field name .* shadows an attribute in parent", category=UserWarning)
        return create_model(name, __base__=Strict, **fields)


def check_values(config: dict[str, Any], defaults: dict[str, Any], program: str,
                 types: dict[str, type] | None = None, limits: dict[str, dict] | None = None) -> None:
    """Refuses (``SystemExit``: exit 2 through ``distributed.cli``) the first setting of ``config``
    outside its type or ``limits``, in one line naming the flag and the value."""
    model = settings_model(defaults, types, limits=limits)
    try:
        model.model_validate({k: config[k] for k in defaults if k in config})
    except ValidationError as err:
        e = err.errors()[0]
        key = str(e["loc"][0]) if e["loc"] else ""
        where = f"--{key.replace('_', '-')}" + (f" item {e['loc'][1] + 1}" if len(e["loc"]) > 1 and
                                                isinstance(e["loc"][1], int) else "")
        msg = e["msg"].replace("Input should be", "must be").replace("Value error, ", "")
        raise SystemExit(f"{program}: {where} {_shown(e.get('input'))}: {msg}") from None


def _shown(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = " ".join(map(str, value)) if isinstance(value, list) else repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def add_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any],
              types: dict[str, type] | None = None, helps: dict[str, str] | None = None) -> None:
    """``--config`` plus one flag per setting (``--some-key``), typed after its default (or after
    ``types``, for settings whose default is None), its help line ``helps[key]`` plus the default."""
    parser.add_argument("--config", help="YAML file of settings (flags override it), e.g. a Tune best_config.yaml "
                                         "(default: none)")
    types, helps = types or {}, helps or {}
    missing = sorted(set(defaults) - set(helps))
    if helps and missing:
        raise ValueError(f"add_flags: no help for {', '.join(missing)}")
    for key, value in defaults.items():
        flag = "--" + key.replace("_", "-")
        shown = " ".join(map(str, value)) if isinstance(value, list) else value
        text = helps.get(key, "")
        if "(default:" not in text:  # a help may say its default itself (one that depends on another setting)
            text = f"{text} (default: {'none' if shown is None or shown == '' else shown})".strip()
        if isinstance(value, bool) or types.get(key) is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(value, list):
            kind = type(value[0]) if value else types.get(key, str)
            parser.add_argument(flag, type=kind, nargs="+", default=None, help=text)
        else:
            kind = types.get(key) or (type(value) if value is not None else str)
            parser.add_argument(flag, type=kind, default=None, help=text)


def load_config(path: str, section: str, defaults: dict[str, Any], types: dict[str, type] | None = None,
                sections: tuple[str, ...] = ("meta_train", "prune_batch", "tune"),
                limits: dict[str, dict] | None = None) -> dict[str, Any]:
    """The settings in ``path`` for ``section`` (or the whole file if it has none of ``sections``),
    validated; only the keys the file sets."""
    loaded = read_mapping(path, "config file", SettingsError)
    where = path
    if any(k in sections for k in loaded):
        where = f"{path}: {section}"
        loaded = loaded.get(section) or {}
        if not isinstance(loaded, dict):
            raise SettingsError(f"{where}: must be a mapping of settings")
    model = settings_model(defaults, types, limits=limits)
    try:
        model.model_validate(loaded)
    except ValidationError as err:
        raise SettingsError(describe(err, where, model)) from None
    return loaded


def resolve(args: dict[str, Any], defaults: dict[str, Any], section: str, program: str,
            types: dict[str, type] | None = None, limits: dict[str, dict] | None = None) -> dict[str, Any]:
    """Defaults, updated by the ``--config`` file, updated by the flags that were given, each
    value checked against its type and ``limits`` (``check_values``). ``args`` is
    ``vars(parser.parse_args())``; entries that are not settings pass through unchanged."""
    config = dict(defaults)
    path = args.pop("config", None)
    if path:
        try:
            config.update(load_config(path, section, defaults, types, limits=limits))
        except SettingsError as err:
            raise SystemExit(f"{program}: {err}") from None
    config.update({k: v for k, v in args.items() if v is not None or k not in defaults})
    check_values(config, defaults, program, types, limits)
    return config
