"""Writing files so that a reader never sees half of one: write under a temporary name next to the
target, then rename it into place (atomic on one filesystem). Used for every result file: model
and metanetwork files, zoo members, result tables, plots, configs."""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *, fs=None, binary: bool = True) -> str:
    """Calls ``write(target)`` to produce ``path`` under a temporary name, then renames it to
    ``path``; on any error the temporary file is removed and ``path`` is untouched. ``target`` is a
    file path (local files: ``write`` may hand it to torch.save, pandas, matplotlib) or, with a
    pyarrow filesystem ``fs``, an open output stream."""
    path = str(path)
    parent = os.path.dirname(path) if fs is None else path.rsplit("/", 1)[0]
    tag = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if fs is None:  # a hidden name that keeps the extension last: matplotlib and pandas read the format from it
        stem, dot, ext = os.path.basename(path).rpartition(".")
        name = f".{stem}.{tag}{dot}{ext}" if dot else f".{ext}.{tag}"
        tmp = os.path.join(parent, name)
    else:  # never ends in the target's extension: readers list zoo members by it
        tmp = f"{path}.{tag}"
    try:
        if fs is None:
            if parent:
                os.makedirs(parent, exist_ok=True)
            write(tmp)
            os.replace(tmp, path)
        else:
            fs.create_dir(parent, recursive=True)
            with fs.open_output_stream(tmp) as stream:
                write(stream)
            fs.move(tmp, path)
    except BaseException:
        try:
            os.remove(tmp) if fs is None else fs.delete_file(tmp)
        except (OSError, FileNotFoundError):
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    def write(target: str) -> None:
        with open(target, "w") as f:
            f.write(text)

    return atomic_write(path, write)
