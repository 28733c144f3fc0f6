"""The zoo's member files: one Arrow IPC file per write, one row per network (``SCHEMA``), and
the conversions between rows and ``ZooRecord``s with their graphs.

Row schema (version ``SCHEMA_VERSION``, in the schema metadata):
- id, arch (JSON spec, see ``zoo.arch``), dataset, seed, role (train/val/test), status, error;
- metrics: train/val/test accuracy and loss, macs, params, speedup (nullable);
- the graph: num_nodes, input_shape, src, dst, edge_type (large lists, aligned by edge),
  edge_types and edge_feat_dims (one per type), node_feat_dim, node_feat (flat N*F),
  edge_feat (flat: each type's [E_t, k_t] block in order), counters, fingerprint.

Arrow IPC files are read memory-mapped, so a row's graph arrays are zero-copy views of the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from distributed.schema import require_regular_file
from metanet.files import atomic_write
from metanet.graph import NetworkGraph, graph_to_network
from zoo.arch import build_model
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
    atomic_write_bytes(fs, path, lambda stream: write_ipc(stream, table))
    return path


def write_ipc(stream, table: pa.Table) -> None:
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


def require_file(fs: pafs.FileSystem, path: str, where: str) -> None:
    """``ZooFormatError`` when ``path`` exists but is no regular file: opening a FIFO blocks until a
    writer comes (pyarrow's open cannot be interrupted), and a device is read forever. A missing
    path passes: the reader says so in its own words. Only local paths are asked (a stat each): an
    object store has neither, and asking would cost a request per read."""
    if isinstance(fs, pafs.LocalFileSystem):
        require_regular_file(path, where, ZooFormatError)


def read_table(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The table in one member file, memory-mapped when local; clear errors for bad files."""
    fs, path = open_fs(uri)
    require_file(fs, path, uri)
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
