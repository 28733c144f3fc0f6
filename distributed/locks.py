"""One writer per output directory: an advisory lock held for the whole run.

Two drivers writing one output (two ``prune_batch`` runs on one ``--out``, two ``make_zoo`` builds
of one zoo) would each rewrite shared files from the rows they know, or build the same members
twice. ``exclusive(directory, program)`` takes ``<directory>/.lock`` with ``flock`` (released by
the kernel when the process dies, so a killed run never leaves a stale lock) and refuses at once
with a message naming the holder; it records the holder's pid and command in the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from typing import Iterator


class OutputBusyError(RuntimeError):
    """Another run holds the output directory."""


@contextlib.contextmanager
def exclusive(directory: str, program: str) -> Iterator[None]:
    """Holds ``directory/.lock`` while the block runs; ``OutputBusyError`` if another run holds it.
    Only local directories can be locked (``flock``); a URI output is not locked."""
    if "://" in directory:
        yield
        return
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory}: the output is an existing file, not a folder; give another output")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise OutputBusyError(f"{directory} is in use by another run ({holder}); wait for it to finish "
                                  f"or give another output directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{program}, pid {os.getpid()}, since {time.strftime('%H:%M:%S')}: "
                      f"{' '.join(sys.argv[:1])}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
