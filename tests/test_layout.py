"""The code's layout holds as it grows: concepts are dispatched through their registries, not by
comparing their names; no project import hides inside a function; no import circle in the library.
Each test names the offending lines, and each check is shown failing on a made-up source."""

import ast
from pathlib import Path

import pytest

from metanet.criteria import CRITERIA
from metanet.heads import HEADS
from metanet.levels import Level
from metanet.methods import METHODS
from metanet.objectives import OBJECTIVES
from metanet.recipe_settings import LEARNED_AS

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("metanet", "zoo", "bench", "pipelines", "distributed")
# the modules that define a concept's classes may name it: that is what a registry is for
REGISTRIES = {"metanet/methods.py", "metanet/objectives.py", "metanet/heads.py", "metanet/criteria/__init__.py",
              "metanet/criteria/base.py", "metanet/criteria/both.py", "metanet/criteria/channels.py",
              "metanet/criteria/weights.py", "metanet/levels.py"}
CONCEPT_NAMES = {*METHODS, *OBJECTIVES, *HEADS, *CRITERIA, *(v.value for v in Level), *LEARNED_AS}
# comparisons against registered names outside the registries: none today, so any new one fails
MOST_COMPARISONS = 0
OPTIONAL = {"metanet.dgl_compat", "distributed.tracking"}  # optional third-party behind a project module


def _sources(roots=SCANNED):
    for root in roots:
        for path in sorted((ROOT / root).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path.read_text()


def name_comparisons(rel: str, text: str) -> list[str]:
    """Comparisons (==, !=, in, not in, <=) of a string constant that names a registered concept."""
    hits = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.Compare):
            continue
        strings = []
        for side in (node.left, *node.comparators):
            items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            strings += [e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        if any(s in CONCEPT_NAMES for s in strings):
            hits.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    return hits


def inner_project_imports(rel: str, text: str) -> list[str]:
    hits = []
    for fn in ast.walk(ast.parse(text)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            modules = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                       [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            hits += [f"{rel}:{node.lineno}: {m}" for m in modules
                     if m.split(".")[0] in {"metanet", "zoo", "distributed", "pipelines"} and m not in OPTIONAL]
    return hits


def import_graph(sources) -> dict[str, set[str]]:
    """Module -> the project modules it imports at module level (a package's import is its
    ``__init__``'s)."""
    modules = {rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for rel, _ in sources}
    graph = {}
    for rel, text in sources:
        name = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        edges = set()
        for node in ast.parse(text).body:
            if isinstance(node, ast.ImportFrom) and node.module:
                # ``from pkg import sub`` needs the submodule; any import runs the parents' __init__ anyway
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules
                edges |= subs if len(subs) == len(node.names) else subs | {node.module}
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected part of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_concepts_are_dispatched_through_their_registries():
    hits = [h for rel, text in _sources() if rel not in REGISTRIES for h in name_comparisons(rel, text)]
    assert len(hits) <= MOST_COMPARISONS, "compare a registered concept's attribute, not its name:\n" + "\n".join(hits)


def test_the_comparison_count_sees_each_form():
    made_up = 'if method == "meta": pass\nif kind in ("weights", "x"): pass\nif {"curve", "none"} <= s: pass\n' \
              'if objective != name: pass\n'
    assert len(name_comparisons("x.py", made_up)) == 3


def test_no_project_import_inside_a_function():
    hits = [h for rel, text in _sources(("metanet", "zoo")) for h in inner_project_imports(rel, text)]
    assert not hits, "import at the module's top (a circle it hid is a layout bug):\n" + "\n".join(hits)
    made_up = "def f():\n    from metanet.recipe import prepare\n    from metanet.dgl_compat import dgl\n"
    assert inner_project_imports("x.py", made_up) == ["x.py:2: metanet.recipe"]


def test_no_import_circle_in_the_library():
    found = cycles(import_graph(list(_sources(("metanet", "zoo")))))
    assert not found, f"import circles: {found}"
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("registry", [METHODS, OBJECTIVES, HEADS])
def test_every_registered_name_is_its_class_name(registry):
    assert all(entry.name == name for name, entry in registry.items())


LONGEST = 500
LONG_ALLOWED = {"metanet/graph/rules.py"}  # the converter's rule registry: one short rule per layer type


def test_no_library_module_over_500_lines():
    long = [f"{rel}: {text.count(chr(10))} lines" for rel, text in _sources(("metanet", "zoo", "distributed", "pipelines"))
            if text.count("\n") > LONGEST and rel not in LONG_ALLOWED]
    assert not long, "split these by job:\n" + "\n".join(long)
