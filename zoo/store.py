"""The zoo on disk: network graphs and their metadata in Apache Arrow.

A zoo is a directory (local, or any URI pyarrow's filesystems open, such as ``s3://``) holding
``members/*.arrow`` (``zoo.members_file``: Arrow IPC files with one row per network) and
``manifest.json``. Every file is written under a temporary name and renamed into place, so a
reader never sees half of one.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from metanet.pretrained import seen_by
from zoo.data import load_from_config
from zoo.members_file import (GRAPH_COLUMNS, INT_METRICS, METRICS, SCHEMA, SCHEMA_VERSION,  # noqa: F401
                              ZooFormatError, ZooRecord, atomic_write_bytes, file_sha256, open_fs, read_members,
                              read_table, record_from_row, require_file, write_ipc, write_members)
from zoo.spec import lineage, role_of


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
                atomic_write_bytes(self.fs, path, lambda s, t=table: write_ipc(s, t))
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
        require_file(self.fs, path, where)
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


def lineages(zoo: Zoo, roles: Sequence[str]) -> list[str]:
    """The lineages (``zoo.spec.lineage``) of the built members of ``roles``, in the zoo's order."""
    return [lineage(r.dataset, r.arch, r.seed) for r in zoo if r.status == "ok" and r.role in roles]


class SeenNetworkError(ValueError):
    """A held-out network that a metanetwork under evaluation learned from or was chosen on."""


def refuse_seen(records: Sequence[ZooRecord], metanet_paths: Sequence[str]) -> None:
    """Stops an evaluation of a shipped metanetwork on a network it learned from or was chosen on,
    naming the first such network: a zoo built from the same spec with its data in another folder
    gives those networks other ids and other roles (``zoo.spec.lineage``), and would pass them off
    as held out."""
    for path in metanet_paths:
        seen = seen_by(path)
        for r in records if seen else ():
            if lineage(r.dataset, r.arch, r.seed) in seen:
                raise SeenNetworkError(
                    f"{r.id}: {path} learned from this network or was chosen on it (the same spec's member "
                    f"under another id: the zoo was built with its data in another folder); held-out "
                    f"networks must be unseen: rebuild the zoo with the dataset root the shipped "
                    f"metanetwork's manifest names, or leave this network out")


def seen_members(zoo: Zoo, metanet_paths: Sequence[str]) -> list[str]:
    """The ids of ``zoo``'s members that a shipped metanetwork among ``metanet_paths`` learned from
    or was chosen on (``refuse_seen``), read from the zoo's metadata (no network is loaded)."""
    seen = frozenset().union(*(seen_by(p) for p in metanet_paths))
    if not seen:
        return []
    return [m.id for m in zoo.metadata().itertuples() if lineage(m.dataset, json.loads(m.arch), m.seed) in seen]


def benchmark_networks(zoo: Zoo, heldout: Sequence[str | Zoo] = (), test_from: Sequence[str | Zoo] | None = None,
                       family: str | None = None, val_limit: int = 4) -> tuple[list[ZooRecord], list, list[ZooRecord]]:
    """What a benchmark over ``zoo`` uses, as the bench scripts split it: the built ``train`` members
    (they meta-train), the networks of the first ``val_limit`` ``val`` members (they select a
    checkpoint), and the held-out records: the ``test`` members of the ``test_from`` zoos (default:
    ``zoo``; ``[]``: none) and every built member of the ``heldout`` zoos (networks unlike any member).
    ``family`` keeps one architecture family among the train and val members (transfer)."""
    ok = [r for r in zoo if r.status == "ok" and (family is None or r.arch["family"] == family)]
    train = [r for r in ok if r.role == "train"]
    val = [r.network().eval() for r in [r for r in ok if r.role == "val"][:val_limit]]

    def opened(z: str | Zoo) -> Zoo:  # the bench scripts pass zoos they checked (zoo.integrity)
        return z if isinstance(z, Zoo) else Zoo(z)

    sources = [opened(z) for z in test_from] if test_from is not None else [zoo]
    held = [r for z in sources for r in z if r.status == "ok" and r.role == "test"]
    held += [r for z in heldout for r in opened(z) if r.status == "ok"]
    return train, val, held
