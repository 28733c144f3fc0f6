"""`metaprune COMMAND`: the installed entry point forwards to the same code as `python pipelines/*.py`."""

import sys
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.__main__ import COMMANDS, main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_the_console_script_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["metaprune"] == "pipelines.__main__:main"
    assert all((ROOT / "pipelines" / f"{script}.py").exists() for script in COMMANDS.values())


@pytest.mark.parametrize("command", ["zoo", "meta-train", "prune", "tune"])
def test_each_command_takes_its_scripts_flags(command, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["metaprune"])
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"usage: metaprune {command}")
    assert "--out" in out  # a flag of the script itself


def test_an_unknown_command_is_named(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prune-everything"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "'prune-everything'" in err and "meta-train" in err


def test_bad_flags_get_the_scripts_one_line_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["metaprune"])
    with pytest.raises(SystemExit) as exit_:  # refused before Ray starts, as `python pipelines/prune_batch.py` does
        main(["prune", "--models", ".", "--methods", "magic", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unknown method(s) ['magic']" in err and "Traceback" not in err


def test_every_pipeline_is_a_thin_cli():
    """Scripts parse flags and wire Ray; what they do lives in the library, where tests call it
    in-process. A script past 300 lines has grown logic that belongs there."""
    long = {p.name: n for p in (ROOT / "pipelines").glob("*.py") if (n := len(p.read_text().splitlines())) >= 300}
    assert not long, f"pipelines over 300 lines: {long}"
