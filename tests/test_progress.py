"""Progress where the output is not a terminal: lines now and then, not carriage-return redraws."""

import io

from distributed.progress import LineProgress, progress


def test_lines_every_tenth_and_at_the_end_with_the_postfix():
    out = io.StringIO()
    bar = LineProgress(total=50, desc="pruning", unit="task", file=out)
    for i in range(50):
        bar.update(1)
        bar.set_postfix(failed=i // 25)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 10
    assert lines[0].startswith("pruning: 5/50 task (10%), 0 s, about ") and lines[-1].startswith("pruning: 50/50 task (100%)")
    assert lines[-1].endswith("[failed=1]")


def test_an_iterable_without_a_total_and_a_slow_loop(monkeypatch):
    out = io.StringIO()
    clock = iter(range(0, 1000, 20))
    monkeypatch.setattr("distributed.progress.time.monotonic", lambda: next(clock))
    items = list(LineProgress(iter(range(4)), desc="epochs", unit="epoch", file=out, seconds=30))
    assert items == [0, 1, 2, 3]
    assert out.getvalue().splitlines() == ["epochs: 2 epoch, 40 s", "epochs: 4 epoch, 80 s"]


def test_the_mode_follows_the_terminal_unless_set(monkeypatch):
    monkeypatch.delenv("METAPRUNE_PROGRESS", raising=False)
    assert isinstance(progress(total=3, desc="x"), LineProgress)  # pytest's stderr is not a terminal
    monkeypatch.setenv("METAPRUNE_PROGRESS", "bar")
    assert not isinstance(progress(total=3, desc="x"), LineProgress)
    assert not isinstance(progress(total=3, desc="x", disable=True), LineProgress)
