"""Is a zoo what ``make_zoo`` built? Every pipeline that trains on a zoo or prunes its members
asks this first (``checked``), so that a member whose file was altered, copied over another's or
edited by hand is named instead of being trained on.

The analysis (``inspect``) compares each member file with its manifest entry (``manifest.json``,
written by ``Zoo.write_manifest``):

- its content digest (SHA-256 of the file): any change after the build, weights or graph;
- the member id it holds against the file's name and the manifest's id: a file copied over
  another's, and ids held twice;
- its recorded metrics, role and status against the manifest's: edits that kept the digest out of
  reach (a manifest written by a version without digests);
- for a manifest without digests, the graph against the one its network converts to (``src``,
  ``dst``, features: the metanetwork reads them, the network is rebuilt from the features alone);
- that its architecture can be built at all (an unknown family, a bad key);
- files the manifest lists that are gone, and files it does not list.

The action (``checked``) follows the user's choice, ``DAMAGED_MEMBERS``: ``refuse`` (the default:
one line naming each damaged member, ``ZooDamageError``), ``skip`` (leave them out, one warning
line), ``use`` (keep them, one warning line). Nothing is ever silent.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import pyarrow.fs as pafs
import torch

from distributed.schema import require_regular_file
from metanet.graph import network_to_graph
from zoo.arch import build_model
from zoo.store import METRICS, Zoo, ZooFormatError, file_sha256, read_table, record_from_row

DAMAGED_MEMBERS = ("refuse", "skip", "use")
# the bench scripts have no flag for it: they read the choice from this variable (default refuse)
DAMAGED_ENV = "METAPRUNE_DAMAGED_MEMBERS"
# fields a member file and its manifest entry must agree on (the metrics as recorded at the build)
AGREED = ("id", "role", "status", "arch", "dataset", "seed", *METRICS)


UNLISTED = "not in the manifest (added after the zoo was built, or by an interrupted make_zoo)"


class ZooDamageError(ZooFormatError):
    """A zoo whose members are not what its manifest says, refused (one line, exit 2)."""


@dataclass(frozen=True)
class Damage:
    """One damaged member: its file (name inside ``members/``), the member id (the file's stem when
    the file cannot say) and what is wrong, in words."""

    file: str
    member: str
    what: str
    unlisted: bool = False  # only that the manifest does not list it (make_zoo's interrupted build leaves such files)

    def line(self) -> str:
        return f"{self.member} (members/{self.file}: {self.what})"


def manifest_entries(zoo: Zoo) -> dict[str, dict] | None:
    """The manifest's entries by file name, or None when the zoo has no readable manifest."""
    try:
        if isinstance(zoo.fs, pafs.LocalFileSystem):  # a FIFO would block the read below for ever
            require_regular_file(f"{zoo.path}/manifest.json", f"{zoo.root}/manifest.json", ZooFormatError)
        with zoo.fs.open_input_stream(f"{zoo.path}/manifest.json") as f:
            manifest = json.loads(f.read())
        return {m["file"]: m for m in manifest["members"]}
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as err:
        raise ZooFormatError(f"{zoo.root}/manifest.json: not a readable manifest ({err})") from None


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return a == b


def _graph_damage(record) -> str | None:
    """How ``record``'s stored graph differs from the graph its own network converts to, or None."""
    graph = record.graph
    again = network_to_graph(record.network(), torch.zeros(graph.input_shape))
    for name in ("src", "dst", "edge_type", "node_feat", "counters"):
        if not torch.equal(getattr(graph, name), getattr(again, name)):
            return f"its graph's {name} is not the graph of its own network (edited after the build?)"
    for t in again.edge_types:
        if t not in graph.edge_feat or not torch.equal(graph.edge_feat[t], again.edge_feat[t]):
            return f"its graph's {t!r} edge features are not its network's (edited after the build?)"
    return None


def inspect(zoo: Zoo, roles: Iterable[str] | None = None, graphs: bool | None = None) -> tuple[list[Damage], list[str]]:
    """The damaged members of ``zoo`` (of ``roles``, by the manifest's or the file's role; all when
    None) and notes that are not damage (a manifest without digests). ``graphs``: compare each
    graph with its network's (default: only where the manifest has no digest to compare)."""
    roles = set(roles) if roles is not None else None
    entries = manifest_entries(zoo)
    notes = []
    if entries is None:
        notes.append(f"{zoo.root} has no manifest.json: members are checked against nothing but themselves")
        entries = {}
    elif entries and not all("sha256" in e for e in entries.values()):
        notes.append(f"{zoo.root}/manifest.json records no content digests (written by an older version): "
                     "altered members are found by their graphs only; make_zoo with the zoo's spec and --out records them")
    damage: list[Damage] = []
    files = {path.rsplit("/", 1)[-1]: path for path in zoo.files()}
    holders: dict[str, list[str]] = {}
    for name, path in files.items():
        entry = entries.get(name)
        stem = name.removesuffix(".arrow")
        if roles is not None and entry is not None and entry.get("role") not in roles:
            continue
        try:
            table = read_table(zoo._uri(path))
        except ZooFormatError:
            continue  # an unreadable file: the Zoo lists it in ``unreadable``, each pipeline decides
        records = [record_from_row(table, i, with_graph=False) for i in range(table.num_rows)]
        if roles is not None and entry is None and not any(r.role in roles for r in records):
            continue
        for r in records:
            holders.setdefault(r.id, []).append(name)
        problem = _file_damage(zoo, name, path, stem, entry, records, entries, graphs)
        if problem:
            member = entry.get("id") if entry is not None else (records[0].id if len(records) == 1 else stem)
            damage.append(Damage(name, str(member), problem, unlisted=problem == UNLISTED))
    damaged = {d.file for d in damage}
    for member, names in sorted(holders.items()):
        # a file already named (a copy of another member's) explains its share of the repeat
        for name in [n for n in names if n not in damaged][1:]:
            damage.append(Damage(name, member, f"member id {member} is held by {len(names)} files "
                                               f"({', '.join(sorted(names))})"))
    for name, entry in sorted(entries.items()):
        if name not in files and (roles is None or entry.get("role") in roles):
            damage.append(Damage(name, str(entry.get("id")), "listed in the manifest, but the file is gone"))
    return damage, notes


def _file_damage(zoo: Zoo, name: str, path: str, stem: str, entry: dict | None, records: list,
                 entries: dict, graphs: bool | None) -> str | None:
    """What is wrong with one readable member file, or None."""
    if entries and entry is None:
        return UNLISTED
    ids = [r.id for r in records]
    if len(records) == 1 and entries and ids[0] != stem:
        return f"holds member {ids[0]}, not {stem} (a copy of another member's file?)"
    for r in records:  # first: the clearest words for a member no pipeline can use
        if r.status != "ok":
            continue
        try:
            build_model(r.arch)
        except (ValueError, TypeError, KeyError) as err:
            return f"its architecture cannot be built: {err}"
    if entry is not None and "sha256" in entry:
        digest = file_sha256(zoo.fs, path)
        if digest != entry["sha256"]:
            return f"content differs from the manifest's digest ({digest}, recorded {entry['sha256']}): altered after the build"
    if entry is not None and len(records) == 1:
        row = {**records[0].metrics, "id": ids[0], "role": records[0].role, "status": records[0].status,
               "arch": json.dumps(records[0].arch, sort_keys=True), "dataset": records[0].dataset,
               "seed": records[0].seed}
        recorded = dict(entry, arch=json.dumps(json.loads(entry["arch"]), sort_keys=True)
                        if isinstance(entry.get("arch"), str) else entry.get("arch"))
        for key in AGREED:
            if key in recorded and not _same(row.get(key), recorded[key]):
                if key == "arch":  # a spec is long: its family says enough
                    return (f"records architecture {records[0].arch.get('family')!r}, the manifest another "
                            f"({json.loads(recorded[key]).get('family')!r})")
                return f"records {key} {row.get(key)!r}, the manifest {recorded[key]!r}"
    check_graphs = graphs if graphs is not None else not (entry is not None and "sha256" in entry)
    if check_graphs:
        for i, r in enumerate(records):
            if r.status == "ok":
                try:
                    problem = _graph_damage(record_from_row(read_table(zoo._uri(path)), i))
                except (ValueError, RuntimeError, IndexError) as err:
                    problem = f"its graph does not rebuild its network: {str(err).splitlines()[0][:200]}"
                if problem:
                    return problem
    return None


def damaged_members_choice(value: str | None = None) -> str:
    """The choice ``value``, else the ``DAMAGED_ENV`` variable's, else ``refuse``; checked."""
    choice = value or os.environ.get(DAMAGED_ENV) or "refuse"
    if choice not in DAMAGED_MEMBERS:
        where = "damaged members" if value else DAMAGED_ENV
        raise ZooFormatError(f"{where}: {choice!r} is not one of {', '.join(DAMAGED_MEMBERS)}")
    return choice


def checked(root: str | Zoo, damaged: str | None = None, roles: Iterable[str] | None = None,
            who: str = "zoo", warn: Callable[[str], None] | None = None, skip_unreadable: bool = False,
            override: str = f"{DAMAGED_ENV}=") -> Zoo:
    """``root``'s zoo, inspected (``inspect``) and acted on as ``damaged`` says (the module
    docstring): refused with ``ZooDamageError``, damaged members left out (they read as
    ``Zoo.unreadable``, with the damage as the reason), or kept; a warning line either way.
    ``override``: how the caller's user gives the choice (the refusal tells them)."""
    choice = damaged_members_choice(damaged)
    zoo = root if isinstance(root, Zoo) else Zoo(root, skip_unreadable=skip_unreadable)
    warn = warn or (lambda line: print(f"{who}: warning: {line}", file=sys.stderr))
    damage, notes = inspect(zoo, roles)
    for note in notes:
        warn(note)
    if not damage:
        return zoo
    listed = "; ".join(d.line() for d in damage)
    if choice == "refuse":
        raise ZooDamageError(f"{zoo.root}: {len(damage)} damaged member(s): {listed}. Rebuild them with make_zoo "
                             f"(the zoo's spec and --out), or give {override}skip (leave them out) or {override}use "
                             "(keep them)")
    if choice == "skip":
        zoo.exclude({f"{zoo.members_dir}/{d.file}": f"damaged: {d.what}" for d in damage})
        warn(f"{zoo.root}: leaving out {len(damage)} damaged member(s): {listed}")
    else:
        warn(f"{zoo.root}: using {len(damage)} damaged member(s) as asked: {listed}")
    return zoo
