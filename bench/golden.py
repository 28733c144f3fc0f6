"""The golden run: what fixed commands print, recorded before a change that must not alter behaviour
(a move of code, a rename) and compared after it, number for number.

    python bench/golden.py record --zoo runs/zoo-digits-heldout --learned-zoo runs/zoo-digits \\
        --metanet tests/golden/metanet-digits.pt --out tests/golden/digits-heldout.json
    python bench/golden.py check --zoo runs/zoo-digits-heldout --learned-zoo runs/zoo-digits \\
        --metanet tests/golden/metanet-digits.pt --against tests/golden/digits-heldout.json

Three runs, each with fixed seeds (``COMMANDS``): ``prune_batch`` over the zoo's held-out members
with ``--methods meta none fpgm curve depgraph`` at 2x, ``prune_batch`` at the weight level
(``--sparsity 0.8 --nm 2:4``), and ``bench/learned_criterion.py``'s small run on ``--learned-zoo`` (one
variant, one epoch, with and without the reconstruction). What is held: every row's status,
criterion, MACs, speed-up, zeros and accuracies (validation and test, right after pruning and at
the end), and every number in the learned-criterion tables (their timing column aside). ``check``
prints each difference and exits 1 if there is one. Accuracies are counts over a fixed split, so a
change that keeps the arithmetic keeps them to the last digit; a change of summation order in a
kernel can still move one prediction, which ``check`` reports like any other difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the columns of prune_batch's rows that the golden run holds (times, paths and hashes vary by run)
HELD = ("status", "criterion", "macs_before", "macs_after", "speedup", "sparsity_measured", "params_nonzero",
        "val_acc_pruned", "test_acc_pruned", "val_acc", "test_acc")
STEPS = ("--before-steps", "10", "--after-steps", "20")
COMMANDS = {
    "channels": ("--methods", "meta", "none", "fpgm", "curve", "depgraph", "--targets", "2", *STEPS),
    "weights": ("--methods", "none", "wanda", "curve", "--sparsity", "0.8", "--nm", "2:4", *STEPS),
}
# bench/learned_criterion.py's small run: what tests/test_bench.py runs on a tiny zoo
LEARNED = ("--variants", "layers=0,epochs=1", "--no-curve", "--reconstruct", "--finetune", "2",
           "--finetune-speedups", "2", "--criteria", "fpgm", "random")


def _env() -> dict:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return env


def _rows(frame) -> dict[str, dict]:
    """prune_batch's results, keyed by model, method and run, with the held columns rounded."""
    out = {}
    for row in frame.to_dict("records"):
        run = f"{row.get('target')}|{row.get('sparsity')}|{row.get('nm')}"
        held = {}
        for k in HELD:
            v = row.get(k)
            if isinstance(v, float):
                v = None if v != v else round(v, 6)  # NaN: not measured for this row
            elif hasattr(v, "item"):
                v = v.item()
            held[k] = v
        out[f"{row['model']}|{row['method']}|{run}"] = held
    return out


def prune_batch(zoo: str, metanet: str, args: tuple[str, ...], work: str) -> dict[str, dict]:
    import pandas as pd

    cmd = [sys.executable, str(ROOT / "pipelines/prune_batch.py"), "--zoo", zoo, "--metanet", metanet,
           "--out", work, "--no-mlflow", "--num-cpus", "2", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return _rows(pd.read_parquet(Path(work) / "results.parquet"))


def learned_tables(zoo: str) -> list[str]:
    """The table rows bench/learned_criterion.py prints (lines starting with ``|``), a seconds
    column (a header cell ending in " s") blanked: the held numbers are accuracies and differences."""
    cmd = [sys.executable, str(ROOT / "bench/learned_criterion.py"), "--zoo", zoo, *LEARNED]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    out, timed = [], set()
    lines = run.stdout.splitlines()
    for line, after in zip(lines, lines[1:] + [""]):
        cells = line.strip().strip("|").split("|")
        if not line.startswith("|") or set("".join(cells)) <= set("-: "):  # not a table, or a header's rule
            continue
        if set(after.strip()) <= set("|-: ") and after.strip():  # a header: which columns are seconds
            timed = {i for i, c in enumerate(cells) if c.strip().endswith(" s")}
        out.append("|".join("s" if i in timed else c for i, c in enumerate(cells)))
    return out


def record(zoo: str, metanet: str, learned_zoo: str) -> dict:
    out = {}
    for name, args in COMMANDS.items():
        with tempfile.TemporaryDirectory() as work:
            out[name] = prune_batch(zoo, metanet, args, work)
    out["learned_criterion"] = learned_tables(learned_zoo)
    return out


def differences(expected: dict, got: dict) -> list[str]:
    """One line per held value that differs (or is missing on one side)."""
    lines = []
    for name in sorted(expected.keys() | got.keys()):
        a, b = expected.get(name), got.get(name)
        if isinstance(a, list) or isinstance(b, list):
            a, b = a or [], b or []
            lines += [f"{name} line {i}: {x!r} != {y!r}" for i, (x, y) in
                      enumerate(zip(a + [None] * (len(b) - len(a)), b + [None] * (len(a) - len(b)))) if x != y]
            continue
        a, b = a or {}, b or {}
        for key in sorted(a.keys() | b.keys()):
            ra, rb = a.get(key, {}), b.get(key, {})
            lines += [f"{name} {key} {k}: {ra.get(k)!r} != {rb.get(k)!r}" for k in sorted(ra.keys() | rb.keys())
                      if ra.get(k) != rb.get(k)]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("record", "check"))
    p.add_argument("--zoo", required=True, help="a zoo whose test members are pruned (and meta-trained on)")
    p.add_argument("--metanet", required=True, help="the metanetwork file of the meta rows")
    p.add_argument("--learned-zoo", help="the zoo of the learned-criterion run: its train members meta-train, its "
                   "test members are pruned (default: --zoo; a held-out zoo has no train members)")
    p.add_argument("--out", help="record: the JSON file to write")
    p.add_argument("--against", help="check: the JSON file recorded before")
    a = p.parse_args(argv)
    if a.action == "record" and not a.out or a.action == "check" and not a.against:
        p.error("record needs --out, check needs --against")
    got = record(a.zoo, a.metanet, a.learned_zoo or a.zoo)
    if a.action == "record":
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        tmp.replace(a.out)
        print(f"recorded {sum(len(v) for v in got.values())} rows and lines in {a.out}")
        return 0
    diff = differences(json.loads(Path(a.against).read_text()), got)
    for line in diff:
        print(line)
    print(f"{len(diff)} differences from {a.against}" if diff else f"same numbers as {a.against}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
