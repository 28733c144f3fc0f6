"""The golden run in small (``bench/golden.py``): on a tiny digits zoo, the fixed prune_batch and
learned-criterion commands print the numbers recorded before the registries move
(``tests/golden/tiny.json``, recorded with a7f9855's code and ``tests/golden/metanet-tiny.pt``, a
learned criterion with random scores). ``GOLDEN_RECORD=1`` rewrites the record instead: only for a
change that is meant to change the numbers, said in its commit."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import build_digits_zoo

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "tests/golden/tiny.json"
METANET = ROOT / "tests/golden/metanet-tiny.pt"


def _golden():
    spec = importlib.util.spec_from_file_location("golden_bench", ROOT / "bench/golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_small_golden_run_prints_the_recorded_numbers(tmp_path):
    golden = _golden()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded: on two threads a convolution's backward sums in another order
    try:
        zoo = build_digits_zoo(tmp_path / "zoo", members=3).root
    finally:
        torch.set_num_threads(threads)
    got = golden.record(zoo, str(METANET), zoo)
    if os.environ.get("GOLDEN_RECORD"):
        RECORD.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    expected = json.loads(RECORD.read_text())
    assert {len(v) for v in expected.values()} and all(expected.values())  # rows of every command
    diff = golden.differences(expected, got)
    assert not diff, "\n".join(diff[:40])


def test_a_changed_number_is_a_difference():
    golden = _golden()
    rows = {"channels": {"m|none|2.0": {"test_acc": 0.5, "status": "ok"}}, "learned_criterion": ["| a | 1.0 |"]}
    changed = json.loads(json.dumps(rows))
    changed["channels"]["m|none|2.0"]["test_acc"] = 0.51
    changed["learned_criterion"].append("| b | 2.0 |")
    assert golden.differences(rows, rows) == []
    assert golden.differences(rows, changed) == ["channels m|none|2.0 test_acc: 0.5 != 0.51",
                                                 "learned_criterion line 1: None != '| b | 2.0 |'"]
