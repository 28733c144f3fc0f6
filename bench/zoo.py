"""Zoo building throughput: members per minute with 1 and with 2 Ray workers, side by side.

The same spec (the digits zoo, ``--members`` of them, fewer epochs) is built twice into fresh
directories, once by a local Ray with 1 CPU and once with 2, and the build phase (first task
submitted to last member written) is timed; Ray's start-up is reported apart.

    python bench/zoo.py [--members 8] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(workers: int, members: int, epochs: int, out: str) -> dict:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(ROOT / "pipelines/make_zoo.py"), "--members", str(members), "--out", out,
           "--num-cpus", str(workers), "--no-mlflow", "--set", f"train.epochs={epochs}", "--set", "finetune.epochs=1"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    total = time.perf_counter() - start
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    # the progress bar's elapsed time is the build phase
    phases = re.findall(r"building zoo: 100%.*?\[(\d+):(\d+)<", proc.stderr)
    build_s = int(phases[-1][0]) * 60 + int(phases[-1][1]) if phases else total
    return {"workers": workers, "ok": manifest["counts"]["ok"], "total_s": total, "build_s": build_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            rows.append(build(workers, args.members, args.epochs, f"{tmp}/zoo-{workers}"))
    print(f"\nzoo build, digits spec, {args.members} members, {args.epochs} training epochs each")
    head = f"{'workers':>8}{'members ok':>12}{'build s':>9}{'members/min':>13}{'speed-up':>10}{'total s':>9}"
    print(head)
    print("-" * len(head))
    base = rows[0]["ok"] / rows[0]["build_s"]
    for r in rows:
        rate = r["ok"] / r["build_s"]
        print(f"{r['workers']:>8}{r['ok']:>12}{r['build_s']:>9.0f}{60 * rate:>13.1f}{rate / base:>10.2f}"
              f"{r['total_s']:>9.0f}")
    print("\n'total s' includes starting Ray, loading data and writing the manifest.")


if __name__ == "__main__":
    main()
