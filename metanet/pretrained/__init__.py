"""The metanetworks that ship with the package, as pretrained weights ship with torchvision: used
when a learned method is asked for and no metanetwork is given, and said so.

Each is a ``meta_train.py`` output copied here with its provenance in ``manifest.json`` (the
command, the zoo and its digest, the checkpoint chosen and on what, the file's SHA-256, and where
it was measured on networks it never saw: docs/benchmarks.md). A file whose digest is not the
manifest's is refused: a shipped metanetwork is the one the docs' numbers describe, or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from metanet.files import atomic_write, atomic_write_text
from metanet.levels import Level
from metanet.metanetwork import load_metanetwork

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"
# the roles, and what a metanetwork must do to serve in each (its head's abilities, not its name)
CRITERION, ALLOCATION = "criterion", "allocation"
SERVES = {CRITERION: lambda net: net.head.ranks is Level.CHANNELS,
          ALLOCATION: lambda net: net.head.allocates}


@dataclass(frozen=True)
class Shipped:
    """One shipped metanetwork: its role (``criterion``: ranks channels, for ``meta``;
    ``allocation``: how many channels each group keeps, for ``--allocation learned``), its file,
    and its provenance."""
    role: str
    file: str
    sha256: str
    trained_on: str
    command: str
    measured: str
    seen: tuple[str, ...] = ()  # lineages (zoo.spec.lineage) of the members it learned from or was chosen on

    @property
    def path(self) -> str:
        return str(HERE / self.file)

    def note(self) -> str:
        """One line for a run's output: which metanetwork it uses and where that was trained."""
        return (f"the shipped {self.role} metanetwork ({self.file}, trained on {self.trained_on}; "
                f"measured on unseen networks: {self.measured})")


class ShippedError(ValueError):
    """A shipped metanetwork that is missing or not the file the manifest records."""


def _manifest() -> dict:
    with open(MANIFEST) as f:
        return json.load(f)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def roles() -> list[str]:
    return sorted(_manifest())


def shipped(role: str) -> Shipped:
    """The shipped metanetwork of ``role``, its file checked against the manifest's digest."""
    entries = _manifest()
    if role not in entries:
        raise ShippedError(f"no shipped metanetwork for {role!r}; shipped: {', '.join(sorted(entries))}")
    entry = Shipped(role=role, **{**entries[role], "seen": tuple(entries[role].get("seen", ()))})
    if not os.path.isfile(entry.path):
        raise ShippedError(f"{entry.path}: the shipped {role} metanetwork is missing from the package")
    digest = _sha256(entry.path)
    if digest != entry.sha256:
        raise ShippedError(f"{entry.path}: SHA-256 {digest[:12]}... is not the manifest's {entry.sha256[:12]}...: "
                           "not the shipped file (reinstall the package)")
    return entry


def seen_by(path: str) -> frozenset[str]:
    """The lineages of the networks the metanetwork file at ``path`` learned from or was chosen on,
    if it is a shipped one (recognised by its content, wherever it was copied); empty otherwise (a
    user's own metanetwork: its zoo's roles already keep its training members out of the test split)."""
    digest = _sha256(path)
    return frozenset(name for entry in _manifest().values() if entry["sha256"] == digest
                     for name in entry.get("seen", ()))


def record(role: str, source: str, dataset: str, trained_on: str, command: str, measured: str,
           seen: Sequence[str] = ()) -> Shipped:
    """Ships ``source`` (a ``meta_train.py`` metanetwork file) as the metanetwork of ``role``: copied
    here as ``<role>-<dataset>.pt`` and entered in the manifest with its digest and provenance (each
    file through a temporary name, then a rename). For maintainers: ``python -m metanet.pretrained``."""
    net = load_metanetwork(source)[0]  # a file that is not a metanetwork is refused here, not shipped
    if role not in SERVES or not SERVES[role](net):
        raise ShippedError(f"{source}: edit {net.config.edit!r} cannot serve as the {role} metanetwork")
    name = f"{role}-{dataset}.pt"
    atomic_write(str(HERE / name), lambda tmp: shutil.copyfile(source, tmp))
    digest = _sha256(str(HERE / name))
    entries = _manifest() if MANIFEST.exists() else {}
    entries[role] = {"file": name, "sha256": digest, "trained_on": trained_on, "command": command,
                     "measured": measured, "seen": sorted(seen)}
    atomic_write_text(str(MANIFEST), json.dumps(entries, indent=1, sort_keys=True) + "\n")
    return shipped(role)
