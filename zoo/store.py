"""The zoo on disk: network graphs and their metadata in Apache Arrow.

A zoo is a directory (local, or any URI pyarrow's filesystems open, such as ``s3://``) holding
``members/*.arrow``, Arrow IPC files with one row per network, and ``manifest.json``. Arrow IPC
files are read memory-mapped, so a row's graph arrays are zero-copy views of the file. Every file
is written under a temporary name and renamed into place, so a reader never sees half of one.

Row schema (version ``SCHEMA_VERSION``, in the schema metadata):
- id, arch (JSON spec, see ``zoo.arch``), dataset, seed, role (train/val/test), status, error;
- metrics: train/val/test accuracy and loss, macs, params, speedup (nullable);
- the graph: num_nodes, input_shape, src, dst, edge_type (large lists, aligned by edge),
  edge_types and edge_feat_dims (one per type), node_feat_dim, node_feat (flat N*F),
  edge_feat (flat: each type's [E_t, k_t] block in order), counters, fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from distributed.schema import require_regular_file
from metanet.files import atomic_write
from metanet.graph import NetworkGraph, graph_to_network
from zoo.arch import build_model
from zoo.data import load_from_config
from zoo.spec import role_of

SCHEMA_VERSION = 1
_KIND = b"metaprune.zoo-members"
METRICS = ("train_acc", "val_acc", "test_acc", "train_loss", "val_loss", "test_loss", "speedup", "seconds")
INT_METRICS = ("macs", "params")

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("arch", pa.string()),
        pa.field("dataset", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("role", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        *[pa.field(m, pa.float64()) for m in METRICS],
        *[pa.field(m, pa.int64()) for m in INT_METRICS],
        pa.field("num_nodes", pa.int64()),
        pa.field("input_shape", pa.list_(pa.int64())),
        pa.field("src", pa.large_list(pa.int32())),
        pa.field("dst", pa.large_list(pa.int32())),
        pa.field("edge_type", pa.large_list(pa.int8())),
        pa.field("edge_types", pa.list_(pa.string())),
        pa.field("edge_feat_dims", pa.list_(pa.int32())),
        pa.field("node_feat_dim", pa.int32()),
        pa.field("node_feat", pa.large_list(pa.float32())),
        pa.field("edge_feat", pa.large_list(pa.float32())),
        pa.field("counters", pa.list_(pa.int64())),
        pa.field("fingerprint", pa.string()),
    ],
    metadata={b"metaprune.kind": _KIND, b"metaprune.schema_version": str(SCHEMA_VERSION).encode()},
)
GRAPH_COLUMNS = ("num_nodes", "input_shape", "src", "dst", "edge_type", "edge_types", "edge_feat_dims",
                 "node_feat_dim", "node_feat", "edge_feat", "counters", "fingerprint")


class ZooFormatError(ValueError):
    """A file that is not a readable zoo member file of this schema version."""


@dataclass
class ZooRecord:
    """One network of the zoo: its description, metrics and graph."""

    id: str
    arch: dict[str, Any]
    dataset: str
    seed: int
    graph: NetworkGraph | None
    metrics: dict[str, float | int | None] = field(default_factory=dict)
    status: str = "ok"
    error: str | None = None
    role: str = "train"

    def network(self):
        """The member as a module (eval mode), rebuilt exactly from its graph."""
        if self.graph is None:
            raise ValueError(f"zoo member {self.id} has no graph (status {self.status})")
        return graph_to_network(self.graph, build_model(self.arch)).eval()


# ------------------------------------------------------------------------------ filesystems
def open_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or a URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def file_sha256(fs: pafs.FileSystem, path: str) -> str:
    """The first 16 hex digits of the SHA-256 of a file on ``fs``, read in blocks."""
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:16]


def atomic_write_bytes(fs: pafs.FileSystem, path: str, write) -> None:
    """Calls ``write(stream)`` on a temporary file next to ``path`` on ``fs``, then renames it to
    ``path`` (``metanet.files.atomic_write``)."""
    atomic_write(path, write, fs=fs)


# ---------------------------------------------------------------------------- records -> Arrow
def _graph_columns(g: NetworkGraph | None) -> dict[str, Any]:
    if g is None:
        return {c: None for c in GRAPH_COLUMNS}
    if g.num_nodes >= 2**31:
        raise ValueError(f"graph with {g.num_nodes} nodes does not fit int32 node ids")
    if len(g.edge_types) > 127:
        raise ValueError("more than 127 edge types do not fit the int8 edge_type column")
    edge_feat = [g.edge_feat[t].detach().cpu().reshape(-1) for t in g.edge_types]
    return {
        "num_nodes": g.num_nodes,
        "input_shape": list(g.input_shape),
        "src": pa.array(g.src.cpu().to(torch.int32).numpy()),
        "dst": pa.array(g.dst.cpu().to(torch.int32).numpy()),
        "edge_type": pa.array(g.edge_type.cpu().to(torch.int8).numpy()),
        "edge_types": list(g.edge_types),
        "edge_feat_dims": [int(g.edge_feat[t].shape[1]) for t in g.edge_types],
        "node_feat_dim": int(g.node_feat.shape[1]),
        "node_feat": pa.array(g.node_feat.detach().cpu().reshape(-1).numpy()),
        "edge_feat": pa.array(torch.cat(edge_feat).numpy() if edge_feat else np.zeros(0, np.float32)),
        "counters": g.counters.cpu().tolist(),
        "fingerprint": g.fingerprint,
    }


def _list_array(values: list[pa.Array | None], typ: pa.DataType) -> pa.Array:
    """A large-list column from per-row value arrays, without a Python loop over the values."""
    present = [v.cast(typ.value_type) for v in values if v is not None]
    flat = pa.concat_arrays(present) if present else pa.array([], type=typ.value_type)
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum([0 if v is None else len(v) for v in values], out=offsets[1:])
    mask = pa.array([v is None for v in values], type=pa.bool_())
    return pa.LargeListArray.from_arrays(pa.array(offsets), flat, mask=mask)


def records_to_table(records: Sequence[ZooRecord]) -> pa.Table:
    """Zoo records as an Arrow table of ``SCHEMA``."""
    rows = [_graph_columns(r.graph) for r in records]
    columns: dict[str, Any] = {
        "id": [r.id for r in records],
        "arch": [json.dumps(r.arch, sort_keys=True) for r in records],
        "dataset": [r.dataset for r in records],
        "seed": [int(r.seed) for r in records],
        "role": [r.role for r in records],
        "status": [r.status for r in records],
        "error": [r.error for r in records],
    }
    for m in METRICS + INT_METRICS:
        columns[m] = [r.metrics.get(m) for r in records]
    for c in GRAPH_COLUMNS:
        columns[c] = [row[c] for row in rows]
    arrays = []
    for f in SCHEMA:
        values = columns[f.name]
        if pa.types.is_large_list(f.type):
            arrays.append(_list_array(values, f.type))
        else:
            arrays.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def write_members(uri: str, records: Sequence[ZooRecord]) -> str:
    """Writes ``records`` as one Arrow IPC file at ``uri`` (atomically); returns the path."""
    if not records:
        raise ValueError("write_members: no records to write")
    fs, path = open_fs(uri)
    table = records_to_table(records)
    atomic_write_bytes(fs, path, lambda stream: _write_ipc(stream, table))
    return path


def _write_ipc(stream, table: pa.Table) -> None:
    with pa.ipc.new_file(stream, table.schema) as writer:
        writer.write_table(table)


# ---------------------------------------------------------------------------- Arrow -> records
def _check_schema(schema: pa.Schema, where: str) -> None:
    meta = schema.metadata or {}
    if meta.get(b"metaprune.kind") != _KIND:
        raise ZooFormatError(f"{where}: not a metaprune zoo file (its Arrow schema has no "
                             f"'metaprune.kind' metadata; columns: {', '.join(schema.names[:8])})")
    version = meta.get(b"metaprune.schema_version", b"?").decode()
    if version != str(SCHEMA_VERSION):
        raise ZooFormatError(f"{where}: zoo schema version {version}, this code reads version {SCHEMA_VERSION}")
    for f in SCHEMA:
        if f.name not in schema.names:
            raise ZooFormatError(f"{where}: column '{f.name}' is missing")
        got = schema.field(f.name).type
        if got != f.type:
            raise ZooFormatError(f"{where}: column '{f.name}' has type {got}, expected {f.type}")


def _require_file(fs: pafs.FileSystem, path: str, where: str) -> None:
    """``ZooFormatError`` when ``path`` exists but is no regular file: opening a FIFO blocks until a
    writer comes (pyarrow's open cannot be interrupted), and a device is read forever. A missing
    path passes: the reader says so in its own words. Only local paths are asked (a stat each): an
    object store has neither, and asking would cost a request per read."""
    if isinstance(fs, pafs.LocalFileSystem):
        require_regular_file(path, where, ZooFormatError)


def read_table(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The table in one member file, memory-mapped when local; clear errors for bad files."""
    fs, path = open_fs(uri)
    _require_file(fs, path, uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            source = pa.memory_map(path, "r")
        else:
            source = fs.open_input_file(path)
        reader = pa.ipc.open_file(source)
        _check_schema(reader.schema, uri)
        table = reader.read_all()
    except FileNotFoundError:
        raise FileNotFoundError(f"zoo member file not found: {uri}") from None
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as err:
        raise ZooFormatError(f"{uri}: not a readable Arrow IPC file (truncated or foreign?): {err}") from None
    return table.select(list(columns)) if columns else table


def _values(table: pa.Table, column: str, row: int) -> np.ndarray:
    """The flat values of list column ``column`` at ``row``, zero-copy where Arrow allows."""
    col = table.column(column)
    chunk_row = row
    for chunk in col.chunks:
        if chunk_row < len(chunk):
            start, stop = chunk.offsets[chunk_row].as_py(), chunk.offsets[chunk_row + 1].as_py()
            return chunk.values.slice(start, stop - start).to_numpy(zero_copy_only=False)
        chunk_row -= len(chunk)
    raise IndexError(row)


def _tensor(array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    if not array.flags.writeable:  # memory-mapped and read-only: copy once rather than alias the file
        array = array.copy()
    out = torch.from_numpy(array)
    return out.to(dtype) if dtype is not None and out.dtype != dtype else out


def graph_from_row(table: pa.Table, row: int) -> NetworkGraph | None:
    """The NetworkGraph stored in ``row`` of a member table (None for a failed member)."""
    scalar = {c: table.column(c)[row].as_py() for c in ("num_nodes", "input_shape", "edge_types",
                                                       "edge_feat_dims", "node_feat_dim", "counters",
                                                       "fingerprint")}
    if scalar["num_nodes"] is None:
        return None
    types, dims = scalar["edge_types"], scalar["edge_feat_dims"]
    edge_type = _tensor(_values(table, "edge_type", row), torch.int64)
    counts = torch.bincount(edge_type, minlength=len(types)).tolist()
    flat = _tensor(_values(table, "edge_feat", row))
    expected = sum(c * d for c, d in zip(counts, dims))
    if flat.numel() != expected:
        raise ZooFormatError(f"row {row}: edge_feat has {flat.numel()} values, edge types and dims "
                             f"say {expected}")
    edge_feat, start = {}, 0
    for t, c, d in zip(types, counts, dims):
        edge_feat[t] = flat[start:start + c * d].view(c, d)
        start += c * d
    node_feat = _tensor(_values(table, "node_feat", row)).view(scalar["num_nodes"], scalar["node_feat_dim"])
    return NetworkGraph(
        num_nodes=scalar["num_nodes"], node_feat=node_feat,
        src=_tensor(_values(table, "src", row), torch.int64),
        dst=_tensor(_values(table, "dst", row), torch.int64),
        edge_type=edge_type, edge_types=tuple(types), edge_feat=edge_feat,
        input_shape=tuple(scalar["input_shape"]),
        counters=torch.tensor(scalar["counters"], dtype=torch.int64), fingerprint=scalar["fingerprint"])


def record_from_row(table: pa.Table, row: int, with_graph: bool = True) -> ZooRecord:
    get = lambda c: table.column(c)[row].as_py()  # noqa: E731
    return ZooRecord(
        id=get("id"), arch=json.loads(get("arch")), dataset=get("dataset"), seed=get("seed"),
        graph=graph_from_row(table, row) if with_graph else None,
        metrics={m: get(m) for m in METRICS + INT_METRICS}, status=get("status"), error=get("error"),
        role=get("role"))


def read_members(uri: str, with_graph: bool = True) -> list[ZooRecord]:
    table = read_table(uri)
    return [record_from_row(table, i, with_graph) for i in range(table.num_rows)]


# ------------------------------------------------------------------------------- the zoo dir
class Zoo:
    """A zoo directory: ``members/*.arrow`` plus ``manifest.json``.

    ``Zoo(root)[i]`` reads member ``i`` (its graph too); ``Zoo(root).metadata()`` is a pandas
    DataFrame of every member without the graph columns. A member file that cannot be read raises
    ``ZooFormatError``; with ``skip_unreadable=True`` it is left out of everything (index,
    metadata, iteration) and listed in ``unreadable`` (path -> error) for the caller to decide
    whether it needed it (``expected_role`` says what that member was for).
    """

    def __init__(self, root: str, skip_unreadable: bool = False, exclude: dict[str, str] | None = None):
        self.root = root.rstrip("/")
        self.skip_unreadable = skip_unreadable
        self.unreadable: dict[str, str] = {}
        self.excluded: dict[str, str] = {}  # member file path -> why it is left out (zoo.integrity)
        self.fs, self.path = open_fs(self.root)
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"zoo directory not found: {root}")
        self._index: list[tuple[str, int]] | None = None
        if exclude:
            self.exclude(exclude)

    def exclude(self, files: dict[str, str]) -> None:
        """Leaves the member files ``files`` (path -> why) out of everything, as unreadable ones are:
        ``zoo.integrity.checked`` does so with damaged members when asked to skip them."""
        self.excluded.update(files)
        self.unreadable.update(files)
        self._index = None

    @property
    def members_dir(self) -> str:
        return f"{self.path}/members"

    def files(self) -> list[str]:
        selector = pafs.FileSelector(self.members_dir, allow_not_found=True)
        names = [i.path for i in self.fs.get_file_info(selector) if i.path.endswith(".arrow")]
        return sorted(names)

    def _uri(self, path: str) -> str:
        return path if isinstance(self.fs, pafs.LocalFileSystem) else f"{self.root.split('://')[0]}://{path}"

    def _tables(self, columns: Sequence[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
        for path in self.files():
            if path in self.excluded:
                continue
            try:
                table = read_table(self._uri(path), columns)
            except ZooFormatError as err:
                if not self.skip_unreadable:
                    raise
                self.unreadable[path] = str(err)
                continue
            yield path, table

    def index(self) -> list[tuple[str, int]]:
        if self._index is None:
            self._index = [(p, r) for p, t in self._tables() for r in range(t.num_rows)]
        return self._index

    def __len__(self) -> int:
        return len(self.index())

    def __getitem__(self, i: int) -> ZooRecord:
        path, row = self.index()[i]
        return record_from_row(read_table(self._uri(path)), row)

    def built(self, role: str | None = None) -> list[ZooRecord]:
        """The members that were built (status ok), of ``role`` if given, with their graphs; only
        their own files are read."""
        meta = self.metadata()
        keep = (meta.status == "ok") & ((meta.role == role) if role is not None else True)
        return [self.record(i) for i in meta.id[keep]]

    def record(self, member_id: str) -> ZooRecord:
        """Member ``member_id`` (its graph too), read from ``members/<id>.arrow`` when the zoo keeps
        one member per file (as make_zoo writes it), else found by scanning."""
        path = f"{self.members_dir}/{member_id}.arrow"
        own = self.fs.get_file_info(path).type == pafs.FileType.File and path not in self.excluded
        tables = [(path, read_table(self._uri(path)))] if own else self._tables()
        for _, table in tables:
            ids = table.column("id").to_pylist()
            if member_id in ids:
                return record_from_row(table, ids.index(member_id))
        raise KeyError(f"{self.root}: no member {member_id!r}")

    def expected_role(self, path: str) -> str:
        """The role of the member in file ``path`` without reading it: as the manifest recorded
        it, else from its id (the file name) and the spec's fractions (``zoo.spec.role_of``)."""
        name = path.rsplit("/", 1)[-1]
        try:
            with self.fs.open_input_stream(f"{self.path}/manifest.json") as f:
                recorded = {m["file"]: m["role"] for m in json.loads(f.read())["members"]}
        except (FileNotFoundError, OSError, ValueError, KeyError):
            recorded = {}
        if name in recorded:
            return recorded[name]
        spec = self.spec()
        return role_of(name.removesuffix(".arrow"), float(spec.get("val_members", 0.0)),
                       float(spec.get("test_members", 0.0)), bool(spec.get("held_out", False)))

    def __iter__(self) -> Iterator[ZooRecord]:
        for _, table in self._tables():
            for row in range(table.num_rows):
                yield record_from_row(table, row)

    def metadata(self):
        """Every member's id, arch, dataset, seed, status, error and metrics as a DataFrame."""
        import pandas as pd

        cols = [f.name for f in SCHEMA if f.name not in GRAPH_COLUMNS]
        tables = [t for _, t in self._tables(cols)]
        if not tables:
            return pd.DataFrame(columns=cols)
        return pa.concat_tables(tables).to_pandas()

    def write(self, name: str, records: Sequence[ZooRecord], manifest: bool = True) -> str:
        """Writes ``records`` as ``members/<name>.arrow`` (atomically), replacing a file of that name,
        and refreshes the manifest unless ``manifest`` is False (many concurrent writers)."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad member file name {name!r}")
        path = write_members(self._uri(f"{self.members_dir}/{name}.arrow"), records)
        self._index = None
        if manifest:
            self.write_manifest()
        return path

    def set_roles(self, roles: dict[str, str]) -> int:
        """Gives members the roles in ``roles`` (id -> role), rewriting only the files that change
        (atomically); returns how many members changed. A spec's split can change after its members
        were built (a ``test_members`` fraction added, say) without retraining anything."""
        changed = 0
        for path, table in list(self._tables()):
            old = table.column("role").to_pylist()
            new = [roles.get(i, r) for i, r in zip(table.column("id").to_pylist(), old)]
            if new != old:
                table = table.set_column(table.schema.get_field_index("role"), SCHEMA.field("role"),
                                         pa.array(new, pa.string()))
                atomic_write_bytes(self.fs, path, lambda s, t=table: _write_ipc(s, t))
                changed += sum(a != b for a, b in zip(new, old))
        self._index = None
        return changed

    def write_manifest(self) -> dict[str, Any]:
        """Rewrites ``manifest.json`` from the member files (atomically), with each file's content
        digest (``zoo.integrity`` compares them before a pipeline uses the zoo): only its writers
        call this, after they wrote or checked every file."""
        members = []
        for path, table in self._tables():
            meta = table.select(["id", "arch", "dataset", "seed", "role", "status", "error", *METRICS, *INT_METRICS])
            digest = file_sha256(self.fs, path)
            for row in meta.to_pylist():
                row["file"] = path.rsplit("/", 1)[-1]
                row["sha256"] = digest
                members.append(row)
        manifest = {"schema_version": SCHEMA_VERSION, "members": members,
                    "counts": {"total": len(members),
                               "ok": sum(m["status"] == "ok" for m in members),
                               "failed": sum(m["status"] != "ok" for m in members)}}
        data = json.dumps(manifest, indent=1).encode()
        atomic_write_bytes(self.fs, f"{self.path}/manifest.json", lambda s: s.write(data))
        return manifest

    def edge_widths(self) -> dict[str, int]:
        """Every edge type in the zoo and its feature width (read without the graph arrays)."""
        widths: dict[str, int] = {}
        for _, t in self._tables(["edge_types", "edge_feat_dims"]):
            for types, dims in zip(t.column("edge_types").to_pylist(), t.column("edge_feat_dims").to_pylist()):
                for name, dim in zip(types or [], dims or []):
                    if widths.setdefault(name, dim) != dim:
                        raise ZooFormatError(f"{self.root}: edge type {name!r} has widths {widths[name]} and {dim}")
        return dict(sorted(widths.items()))

    def write_spec(self, spec: dict) -> None:
        """Keeps the spec the zoo was built from (``spec.json``): later stages read its dataset."""
        data = json.dumps(spec, indent=1, sort_keys=True).encode()
        atomic_write_bytes(self.fs, f"{self.path}/spec.json", lambda s: s.write(data))

    def spec(self) -> dict:
        """The spec the zoo was built from; ``ZooFormatError`` naming ``<zoo>/spec.json`` when it is
        cut short, not JSON, not a mapping, or not a regular file (a FIFO would block the read)."""
        path, where = f"{self.path}/spec.json", f"{self.root}/spec.json"
        # make_zoo compares the spec it is given with this one: a damaged one must go before it writes anew
        fix = "restore it, or delete it and run make_zoo with the zoo's spec and this --out (built members are kept)"
        _require_file(self.fs, path, where)
        try:
            with self.fs.open_input_stream(path) as f:
                spec = json.loads(f.read())
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.root}: no spec.json (was this zoo built by make_zoo.py?)") from None
        except ValueError as err:  # JSONDecodeError (with the position), or bytes that are not UTF-8
            raise ZooFormatError(f"{where}: not valid JSON ({err}); {fix}") from None
        if not isinstance(spec, dict):
            raise ZooFormatError(f"{where}: not a JSON mapping (a {type(spec).__name__}); {fix}")
        return spec

    def finetune_settings(self) -> dict[str, Any]:
        """Batch size and augmentation of the zoo's own finetuning: later finetuning on this dataset
        follows them (digits, say, must not be flipped)."""
        section = self.spec().get("finetune", {})
        return {"batch_size": int(section.get("batch_size", 128)), "augment": bool(section.get("augment", True))}

    def dataset(self, root: str | None = None):
        """The zoo's task data, as its spec describes it (``root`` overrides the data folder)."""
        return load_from_config(self.spec()["dataset"], root)

    @classmethod
    def create(cls, root: str) -> "Zoo":
        fs, path = open_fs(root)
        fs.create_dir(f"{path}/members", recursive=True)
        return cls(root)


def benchmark_networks(zoo: Zoo, heldout: Sequence[str | Zoo] = (), test_from: Sequence[str | Zoo] | None = None,
                       family: str | None = None, val_limit: int = 4) -> tuple[list[ZooRecord], list, list[ZooRecord]]:
    """What a benchmark over ``zoo`` uses, as the bench scripts split it: the built ``train`` members
    (they meta-train), the networks of the first ``val_limit`` ``val`` members (they select a
    checkpoint), and the held-out records: the ``test`` members of the ``test_from`` zoos (default:
    ``zoo``) and every built member of the ``heldout`` zoos (networks unlike any member).
    ``family`` keeps one architecture family among the train and val members (transfer)."""
    ok = [r for r in zoo if r.status == "ok" and (family is None or r.arch["family"] == family)]
    train = [r for r in ok if r.role == "train"]
    val = [r.network().eval() for r in [r for r in ok if r.role == "val"][:val_limit]]

    def opened(z: str | Zoo) -> Zoo:  # the bench scripts pass zoos they checked (zoo.integrity)
        return z if isinstance(z, Zoo) else Zoo(z)

    sources = [opened(z) for z in test_from] if test_from else [zoo]
    held = [r for z in sources for r in z if r.status == "ok" and r.role == "test"]
    held += [r for z in heldout for r in opened(z) if r.status == "ok"]
    return train, val, held
