"""Progress for long loops: a tqdm bar on a terminal, and where the output is not a terminal (a log
file, CI, `make demo > demo.log`) a plain line now and then instead of hundreds of carriage-return
redraws joined on one line.

    bar = progress(total=len(jobs), desc="pruning", unit="task")
    for ...: bar.update(1); bar.set_postfix(failed=0)
    bar.close()

``progress(iterable, ...)`` wraps an iterable the same way. The plain form prints a line when the
count passes another ``every`` share of the total (default 10%) or ``seconds`` (default 30 s)
have passed since the last line, and one at the end.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, TextIO


class LineProgress:
    """tqdm's small surface (``update``, ``set_postfix``, ``close``, iteration, ``with``) as lines."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 every: float = 0.1, seconds: float = 30.0, file: TextIO | None = None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit, self.every, self.seconds = total, desc, unit, every, seconds
        self.file = file or sys.stderr
        self.n, self.postfix, self.closed = 0, "", False
        self.start = self.last_time = time.monotonic()
        self.last_n = 0

    def __iter__(self):
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        share = self.total and (self.n - self.last_n) / self.total >= self.every
        if share or now - self.last_time >= self.seconds:
            self._line(now)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.last_n or self.n == 0:
                self._line(time.monotonic())

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        done = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else \
            f"{self.n} {self.unit}"
        left = ""
        if self.total and 0 < self.n < self.total:
            left = f", about {_duration(elapsed * (self.total - self.n) / self.n)} left"
        extra = f" [{self.postfix}]" if self.postfix else ""
        print(f"{self.desc}: {done}, {_duration(elapsed)}{left}{extra}", file=self.file, flush=True)
        self.last_n, self.last_time = self.n, now


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


MODE_ENV = "METAPRUNE_PROGRESS"  # "bar" or "lines": overrides the terminal test (demo.py draws its children's bars)


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, leave: bool = True):
    """A tqdm bar when standard error is a terminal (or ``METAPRUNE_PROGRESS=bar``), else a
    ``LineProgress`` (or ``METAPRUNE_PROGRESS=lines``); nothing when ``disable``."""
    mode = os.environ.get(MODE_ENV) or ("bar" if sys.stderr.isatty() else "lines")
    if disable or mode == "bar":
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave)
    return LineProgress(iterable, total=total, desc=desc, unit=unit)
