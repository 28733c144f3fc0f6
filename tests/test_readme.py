"""Every command the README and docs/ show parses as written: each `python pipelines/... | bench/...` line
(also inside `ray job submit ... --`) with its flags, each `metaprune` command, each `make` target.

Parsing only (the commands themselves take minutes to hours): argparse stops each script right
after it has read its flags, so a renamed or removed flag, a wrong value type or a moved script
fails here, naming the README line."""

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ("python", "python3", ".venv/bin/python")


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _code_lines() -> list[tuple[str, str]]:
    """("file:line", command) of the documents' code: fenced blocks and indented blocks, with
    continuation lines joined and comments removed."""
    return [(f"{doc.relative_to(ROOT)}:{n}", c) for doc in DOCUMENTS for n, c in _file_code_lines(doc)]


def _file_code_lines(path: Path) -> list[tuple[int, str]]:
    lines, out, fenced, pending, start = path.read_text().splitlines(), [], False, "", 0
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or line.startswith("    ")) or (not pending and line.lstrip().startswith(("|", "- ", "* "))):
            continue  # prose, or an indented list item or table row
        text = re.sub(r"\s+#\s.*$", "", line).strip()
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        out.append((start, pending + text))
        pending = ""
    for number, line in enumerate(lines, 1):  # commands quoted in the prose: `python pipelines/demo.py --quick`
        out += [(number, span) for span in re.findall(r"`([^`]+)`", line)
                if re.match(r"(rm -rf \S+; )?(time )?(python |\.venv/bin/python |make |metaprune |CI=)", span)]
    return [(n, c) for n, c in out if c]


def _commands(kind: str) -> list[tuple[str, list[str]]]:
    found = []
    for number, line in _code_lines():
        for part in re.split(r"&&|;", line):
            try:
                words = shlex.split(part.replace("$PWD", "/tmp/readme"))
            except ValueError:
                continue
            words = words[:next((i for i, w in enumerate(words) if w[:1] in "|>" or w[:2] == "2>"), len(words))]
            while words and (re.fullmatch(r"[A-Z_]+=\S*", words[0]) or words[0] == "time"):  # VAR=value, time
                words = words[1:]
            if "--" in words and words[0] == "ray":  # ray job submit ... -- python pipelines/...
                words = words[words.index("--") + 1:]
            if kind == "script" and len(words) > 1 and words[0] in PYTHONS and words[1].endswith(".py"):
                found.append((number, words[1:]))
            elif kind == "metaprune" and words and words[0] == "metaprune":
                found.append((number, words[1:]))
            elif kind == "make" and words and words[0] == "make":
                found.append((number, words[1:]))
    return found


class _Parsed(Exception):
    pass


def _stop_after_parsing(monkeypatch):
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)


SCRIPTS = _commands("script")


def test_the_readme_shows_commands():
    assert len(SCRIPTS) >= 20 and _commands("make") and _commands("metaprune")  # the extraction finds them


@pytest.mark.parametrize("line, argv", SCRIPTS, ids=[f"{n}:{a[0]}" for n, a in SCRIPTS])
def test_a_readme_command_parses(line, argv, monkeypatch, capsys):
    script = ROOT / argv[0]
    assert script.exists(), f"{line}: no such script {argv[0]}"
    _stop_after_parsing(monkeypatch)
    monkeypatch.setattr(sys, "argv", [str(script), *argv[1:]])
    monkeypatch.syspath_prepend(str(script.parent))
    with pytest.raises((_Parsed, SystemExit)) as stopped:
        runpy.run_path(str(script), run_name="__main__")
    if stopped.type is SystemExit:  # --help exits 0 by design; anything else is argparse refusing the line
        error = (capsys.readouterr().err.strip().splitlines() or [""])[-1]
        assert stopped.value.code == 0 and "--help" in argv, f"{line}: {' '.join(argv)}: {error}"


def test_readme_make_targets_and_metaprune_commands_exist():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    for line, words in _commands("make"):
        named = [w for w in words if "=" not in w and not w.startswith("-")]
        assert set(named) <= targets, f"{line}: make {' '.join(words)}: not a target"
    from pipelines.__main__ import COMMANDS

    for line, words in _commands("metaprune"):
        assert words[0] in COMMANDS, f"{line}: metaprune {words[0]}: not a command"
