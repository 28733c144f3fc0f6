"""Config-file schemas: pydantic models that forbid unknown keys, and one-line error messages.

Every file a user writes (zoo specs, Tune search files, pipeline settings) is validated against a
``Strict`` model before anything is written; ``describe`` turns pydantic's ValidationError into
one line that names the key, the value and what is allowed, e.g.

    spec.yaml: train.epochs = -5: must be >= 1
    spec.yaml: memberz: unknown key (allowed: dataset, families, ...)
"""

from __future__ import annotations

import os
import stat
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    """A config section: unknown keys are an error; values are converted only where nothing is
    lost (``lr: 1`` is 1.0, ``epochs: 2.5`` is an error)."""

    model_config = ConfigDict(extra="forbid")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1}; YAML would keep only the "
                    "last)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text_or_stream):
    """``yaml.safe_load`` that refuses duplicate keys (``yaml.constructor.ConstructorError``)."""
    return yaml.load(text_or_stream, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


_SPECIAL = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
            (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def require_regular_file(path: str, named: str, error: type[Exception] = ValueError) -> None:
    """Refuses (``error``, one line starting with ``named``: the flag and path, or the path) an
    existing ``path`` that is not a regular file (after symlinks): reading ``/dev/zero`` never
    ends, a FIFO waits for a writer forever, and hashing or parsing either hangs. A missing path
    passes: each caller names that its own way."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _SPECIAL if test(mode)), "not a plain file")
        raise error(f"{named}: not a regular file ({kind})")


def read_mapping(path: str, what: str, error: type[Exception]) -> dict:
    """The mapping in the YAML (or, for ``*.toml``, TOML) file ``path``; ``error`` with one line
    when the file is missing, does not parse, or is not a mapping (``what`` names the file's kind)."""
    if not os.path.exists(path):
        raise error(f"{what} not found: {path}")
    require_regular_file(path, f"{what} {path}", error)
    toml = path.endswith(".toml")
    try:
        with open(path) as f:
            if toml:
                import tomllib

                loaded = tomllib.loads(f.read())
            else:
                loaded = load_yaml(f)
    except (ValueError, yaml.YAMLError) as err:  # tomllib's error is a ValueError
        raise error(f"{path}: not valid {'TOML' if toml else 'YAML'}: {' '.join(str(err).split())[:200]}") from None
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict):
        raise error(f"{path}: a {what} must be a mapping")
    return loaded


def _path(loc: tuple) -> str:
    # pydantic puts the chosen union member's tag in the location ("families.0.resnet.depths"): drop it
    parts = [str(p) for p in loc if not (isinstance(p, str) and p in _UNION_TAGS)]
    return ".".join(parts) or "(top level)"


_UNION_TAGS: set[str] = set()  # discriminator values registered by schemas that use tagged unions


def register_union_tags(*tags: str) -> None:
    _UNION_TAGS.update(tags)


def describe(err: ValidationError, where: str, model: type[BaseModel] | None = None) -> str:
    """One line per problem (the first few), each naming the key, the value and what is allowed."""
    lines = []
    for e in err.errors()[:3]:
        key = _path(e["loc"])
        if e["loc"] and e["loc"][-1] == "[key]":  # a mapping whose keys are restricted
            key = _path(e["loc"][:-1])
            lines.append(f"{where}: {key}: not an allowed key; {e['msg'].replace('Input should be', 'must be')}")
        elif e["type"] == "extra_forbidden":
            allowed = _allowed(model, e["loc"][:-1]) if model else ""
            lines.append(f"{where}: {key}: unknown key" + (f" (allowed: {allowed})" if allowed else ""))
        elif e["type"] == "missing":
            lines.append(f"{where}: {key}: missing (required)")
        else:
            msg = e["msg"].replace("Input should be", "must be").replace("Value error, ", "")
            value = "" if not e["loc"] else f" = {_short(e.get('input'))}"  # a whole-file rule: no one value
            lines.append(f"{where}: {key}{value}: {msg}" if e["loc"] else f"{where}: {msg}")
    more = len(err.errors()) - len(lines)
    return "; ".join(lines) + (f" (and {more} more)" if more > 0 else "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _allowed(model: type[BaseModel], loc: tuple) -> str:
    """The keys allowed at ``loc`` (a path of field names) in ``model``, when it can be followed."""
    import typing

    current: Any = model
    for part in loc:
        if isinstance(part, int) or (isinstance(part, str) and part in _UNION_TAGS):
            if isinstance(part, str):  # a tagged union: find the member whose tag is ``part``
                members = [a for a in typing.get_args(current) if isinstance(a, type) and issubclass(a, BaseModel)]
                current = next((m for m in members if _tag(m) == part), None)
            continue
        if typing.get_origin(current) is dict:  # a mapping's value: follow its value type
            current = _unwrap(typing.get_args(current)[1])
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return ""
        current = _unwrap(current.model_fields[part].annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return ", ".join(current.model_fields)
    return ""


def _tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("family")
    args = getattr(field.annotation, "__args__", ()) if field else ()
    return args[0] if args else None


def _unwrap(annotation: Any) -> Any:
    """list[X] -> X, X | None -> X, Annotated[X, ...] -> X (to follow nested models)."""
    import typing

    while True:
        origin = typing.get_origin(annotation)
        if origin in (list, tuple):
            annotation = typing.get_args(annotation)[0]
        elif origin is typing.Annotated or (origin is None and hasattr(annotation, "__metadata__")):
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, __import__("types").UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
            else:
                return typing.Union[tuple(args)]  # a union of models: the caller picks by tag
        else:
            return annotation
