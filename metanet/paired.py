"""Paired comparisons of pruning methods: mean differences with 95% confidence intervals.

Methods are compared on the same network (and seed), so the network's own difficulty cancels.
The unit of the interval is the network: differences are first averaged over a network's seeds
(seeds of one network are not independent evidence about the method), then a Student-t interval
is taken over networks. With n networks the interval has n - 1 degrees of freedom; with one
network there is no interval (NaN), which the tables print as such rather than hide.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from scipy import stats


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def __str__(self) -> str:
        if self.n < 2 or math.isnan(self.low):
            return f"{self.mean:+.1f} (n={self.n}, no CI)"
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}]"


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and Student-t confidence interval of ``values``."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def per_unit(rows: Iterable[Mapping], method: str, key: str, target: float | None = None,
             unit: str = "network") -> dict:
    """``key`` of ``method``'s rows (at ``target``), averaged over seeds per ``unit``."""
    groups: dict = defaultdict(list)
    for r in rows:
        if r.get("method") != method or (target is not None and r.get("target") != target):
            continue
        value = r.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        groups[r[unit]].append(float(value))
    return {u: sum(v) / len(v) for u, v in groups.items()}


def paired_difference(rows: Iterable[Mapping], a: str, b: str, key: str, target: float | None = None,
                      unit: str = "network", scale: float = 100.0) -> Interval:
    """Mean of ``a - b`` in ``key`` (times ``scale``: percentage points) over the units both have."""
    rows = list(rows)
    va, vb = per_unit(rows, a, key, target, unit), per_unit(rows, b, key, target, unit)
    common = sorted(set(va) & set(vb), key=str)
    return mean_ci([scale * (va[u] - vb[u]) for u in common])


def target_label(target) -> str:
    """A column's name: a speed-up as ``2x``; any other run (``sparsity0.8``, ``2of4``) as it is."""
    return f"{target:g}x" if isinstance(target, (int, float)) else str(target)


def paired_table(rows: Iterable[Mapping], pairs: Sequence[tuple[str, str]], targets: Sequence[float],
                 key: str = "test_acc", unit: str = "network") -> str:
    """A markdown table: one line per pair, one column per target, cells 'mean [low, high]'."""
    rows = list(rows)
    head = "| difference (points) | " + " | ".join(map(target_label, targets)) + " |"
    lines = [head, "|" + "---|" * (len(targets) + 1)]
    for a, b in pairs:
        cells = [str(paired_difference(rows, a, b, key, t, unit)) for t in targets]
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_key_table(rows: Iterable[Mapping], pairs: Sequence[tuple[str, str]], keys: Sequence[str],
                     unit: str = "network", prefix: str = "curve_") -> str:
    """A markdown table: one line per pair, one column per key (e.g. the points of a pruning
    curve, labelled without ``prefix``), cells 'mean [low, high]'."""
    rows = list(rows)
    lines = ["| difference | " + " | ".join(k.removeprefix(prefix) for k in keys) + " |",
             "|" + "---|" * (len(keys) + 1)]
    for a, b in pairs:
        lines.append(f"| {a} - {b} | " + " | ".join(str(paired_difference(rows, a, b, k, unit=unit))
                                                     for k in keys) + " |")
    return "\n".join(lines)


def method_table(rows: Iterable[Mapping], methods: Sequence[str], targets: Sequence[float],
                 key: str = "test_acc", unit: str = "network") -> str:
    """A markdown table of each method's mean over units with its 95% interval, per target."""
    rows = list(rows)
    lines = ["| method | " + " | ".join(map(target_label, targets)) + " |", "|" + "---|" * (len(targets) + 1)]
    for m in methods:
        cells = []
        for t in targets:
            ci = mean_ci([100 * v for v in per_unit(rows, m, key, t, unit).values()])
            cells.append("n/a" if ci.n == 0 else f"{ci.mean:.1f}" if ci.n < 2 else
                         f"{ci.mean:.1f} ± {(ci.high - ci.low) / 2:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_by(candidates: Iterable[str], validation: Callable[[str], Sequence[float]]) -> str:
    """The candidate whose validation values (one per network) have the highest mean, the first of
    equals: the one rule by which every table and figure picks "the best hand-crafted criterion"."""
    def mean(c: str) -> float:
        values = list(validation(c))
        return sum(values) / len(values)

    return max(candidates, key=mean)


def best_method(rows: Iterable[Mapping], candidates: Sequence[str], val_key: str, target: float | None = None,
                unit: str = "network") -> str | None:
    """The candidate with the highest mean ``val_key`` over units (at ``target``): chosen on
    validation, so that its test accuracy is an honest report. None if no candidate has rows."""
    rows = list(rows)
    values = {m: per_unit(rows, m, val_key, target, unit) for m in candidates}
    values = {m: v for m, v in values.items() if v}
    if not values:
        return None
    common = sorted(set.intersection(*(set(v) for v in values.values())))  # the units all of them have
    return best_by(values, lambda m: [values[m][u] for u in common] or [0.0])


def with_best(rows: Iterable[Mapping], candidates: Sequence[str], val_key: str, targets: Sequence[float],
              unit: str = "network", label: str = "best") -> tuple[list[dict], dict[float, str]]:
    """``rows`` plus, at each target, a copy of the best candidate's rows (``best_method`` on
    ``val_key``) with ``method`` set to ``label``; and which candidate that was per target."""
    rows = [dict(r) for r in rows]
    chosen: dict[float, str] = {}
    extra = []
    for t in targets:
        best = best_method(rows, candidates, val_key, t, unit)
        if best is None:
            continue
        chosen[t] = best
        extra += [dict(r, method=label) for r in rows if r.get("method") == best and r.get("target") == t]
    return rows + extra, chosen
