"""What the benchmark scripts share: the flags every one of them takes (the zoo, where its dataset
lies, torch's CPU threads, held-out zoos) and the set-up those flags name, so that each script
holds its study and nothing else."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from metanet.data import TaskData
from zoo.integrity import checked
from zoo.store import Zoo


def parser(doc: str | None, *, zoo_help: str, zoo_default: str | None = None, threads: int = 1,
           heldout: bool = False) -> argparse.ArgumentParser:
    """A script's parser with the shared flags: ``--zoo`` (required unless ``zoo_default``),
    ``--data-root``, ``--threads`` and, with ``heldout``, ``--heldout`` (zoos whose every member is
    evaluated too)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default=zoo_default, required=zoo_default is None, help=zoo_help)
    if heldout:
        p.add_argument("--heldout", nargs="*", default=[], help="zoos whose every member is evaluated too")
    p.add_argument("--data-root", help="the dataset folder, if not where the zoo was built from")
    p.add_argument("--threads", type=int, default=threads, help=f"torch's CPU threads (default: {threads})")
    return p


@dataclass
class Setup:
    zoo: Zoo
    data: TaskData
    heldout: list[Zoo]


def set_up(args: argparse.Namespace) -> Setup:
    """The zoo (checked: a damaged member is named), its dataset and the held-out zoos the flags
    name, with torch's threads set."""
    torch.set_num_threads(args.threads)
    zoo = checked(args.zoo)
    return Setup(zoo, zoo.dataset(args.data_root), [checked(p) for p in getattr(args, "heldout", None) or []])
