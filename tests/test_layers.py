"""The layout shows the architecture: stage packages sit in layers, and no module imports from a layer above its
own — at module level or inside a function (a deferred import that hides a cycle is still a cycle)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "layerpair"
# Lower numbers are lower layers. Same-layer imports are allowed only within one package (deploy and evaluation
# are siblings: neither imports the other).
LAYERS = {
    "errors": 0,
    "arch": 0,
    "iospec": 0,
    "meter": 0,
    "outdir": 0,
    "decode": 0,
    "exporter": 1,
    "graph_passes": 2,
    "engine": 3,
    "deploy": 4,
    "evaluation": 4,
    "pipeline": 5,
    "cli": 6,
}


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("layerpair."):
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("layerpair.")]
    return out


def _violations() -> list[str]:
    bad = []
    for f in sorted(PACKAGE.rglob("*.py")):
        top = f.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if top == "__init__":
            continue
        for mod in _imports(f):
            other = mod.split(".")[1]
            if other not in LAYERS:
                bad.append(f"{f.relative_to(PACKAGE)} imports {mod}: not in LAYERS")
            elif LAYERS[other] > LAYERS[top] or (LAYERS[other] == LAYERS[top] and other != top and LAYERS[top] > 0):
                bad.append(f"{f.relative_to(PACKAGE)} (layer {LAYERS[top]}) imports {mod} (layer {LAYERS[other]})")
    return bad


def test_no_import_from_a_higher_layer() -> None:
    assert _violations() == []


def test_every_top_level_module_has_a_layer() -> None:
    tops = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or p.is_dir()}
    assert tops - {"__init__", "__pycache__"} <= set(LAYERS)


def test_the_check_catches_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Feed it a wrong answer once: an exporter module importing the pipeline is reported."""
    fake = tmp_path / "layerpair"
    (fake / "exporter").mkdir(parents=True)
    (fake / "exporter" / "bad.py").write_text("def f():\n    from layerpair.pipeline import run_export\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _violations() == ["exporter/bad.py (layer 1) imports layerpair.pipeline (layer 5)"]


# ---- evaluation/ builds upward: data -> forward -> metrics -> search/heal -> selection/study/cli ----------------


def _evaluation_graph(package: Path) -> dict[str, set[str]]:
    """module -> the evaluation modules it imports, at module level or inside a function. ``from
    layerpair.evaluation import data`` counts as an import of ``data``."""
    ev = package / "evaluation"
    mods = {f.stem for f in ev.glob("*.py")} - {"__init__"}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m in mods:
        for node in ast.walk(ast.parse((ev / f"{m}.py").read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module == "layerpair.evaluation":
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("layerpair.evaluation."):
                names = [(node.module or "").split(".")[2]]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[2] for a in node.names if a.name.startswith("layerpair.evaluation.")]
            graph[m] |= {n for n in names if n in mods and n != m}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each once, as the path that closes it (depth-first search over the graph)."""
    found: list[list[str]] = []

    def walk(path: list[str]) -> None:
        for nxt in sorted(graph[path[-1]]):
            if nxt == path[0]:
                found.append([*path, nxt])
            elif nxt not in path and nxt > path[0]:  # start each cycle at its smallest module: no repeats
                walk([*path, nxt])

    for start in sorted(graph):
        walk([start])
    return found


def test_no_import_cycle_inside_evaluation() -> None:
    assert _cycles(_evaluation_graph(PACKAGE)) == []


def test_the_cycle_check_catches_a_deferred_cycle(tmp_path: Path) -> None:
    """Feed it a wrong answer once: the old layout (hfdata -> metrics -> text -> hfdata, text's import deferred
    into a function and written as ``from layerpair.evaluation import hfdata``) is reported."""
    ev = tmp_path / "layerpair" / "evaluation"
    ev.mkdir(parents=True)
    (ev / "__init__.py").write_text("")
    (ev / "hfdata.py").write_text("from layerpair.evaluation.metrics import MCItem\n")
    (ev / "metrics.py").write_text("from layerpair.evaluation.text import Encode\n")
    (ev / "text.py").write_text("def f():\n    from layerpair.evaluation import hfdata\n")
    (ev / "cli.py").write_text("import layerpair.evaluation.text\n")
    assert _cycles(_evaluation_graph(tmp_path / "layerpair")) == [["hfdata", "metrics", "text", "hfdata"]]


def _readme_layout_modules() -> set[str]:
    """Module paths (relative to layerpair/) named in README's Layout block; folders nest by indentation."""
    readme = (PACKAGE.parent / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    out: set[str] = set()
    folders: list[tuple[int, str]] = []  # (indent, name) of the enclosing folders
    for line in block.splitlines():
        name = line.strip().split(" ", 1)[0]
        if not name or not (name.endswith("/") or name.endswith(".py")):
            continue  # a continuation line
        indent = len(line) - len(line.lstrip())
        folders = [(i, f) for i, f in folders if i < indent]
        if name.endswith("/"):
            folders.append((indent, name))
        elif folders and folders[0][1] == "layerpair/":
            out.add("".join(f for _, f in folders[1:]) + name)
    return out


def test_readme_layout_names_every_module() -> None:
    """README's Layout lists every module of layerpair/ (one line each, saying what it holds) and nothing gone."""
    actual = {str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py") if f.name != "__init__.py"}
    listed = _readme_layout_modules()
    assert (sorted(actual - listed), sorted(listed - actual)) == ([], [])


def test_no_function_longer_than_60_lines() -> None:
    """Functions short enough to read at once (nested functions count on their own)."""
    long = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno is not None:
                if n.end_lineno - n.lineno + 1 > 60:
                    long.append(f"{f.relative_to(PACKAGE)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert long == []


def _private_imports(root: Path) -> list[str]:
    """A private name of a layerpair module used outside it, anywhere under ``root``: ``from layerpair.X import
    _name``, or ``M._name`` where ``M`` is a layerpair module the file imported (``from layerpair.x import m as M``,
    ``import layerpair.x.m as M``)."""
    bad = []
    for f in sorted(root.rglob("*.py")):
        tree = ast.parse(f.read_text())
        modules: dict[str, str] = {}  # local name -> the layerpair module it is bound to
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("layerpair"):
                bad += [f"{f.name} imports {n.module}.{a.name}" for a in n.names if a.name.startswith("_")]
                modules |= {a.asname or a.name: f"{n.module}.{a.name}" for a in n.names}
            elif isinstance(n, ast.Import):
                modules |= {a.asname: a.name for a in n.names if a.asname and a.name.startswith("layerpair.")}
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in modules:
                if n.attr.startswith("_") and not n.attr.startswith("__"):
                    bad.append(f"{f.name} uses {modules[n.value.id]}.{n.attr}")
    return bad


def test_no_private_name_crosses_a_module() -> None:
    assert _private_imports(PACKAGE) + _private_imports(PACKAGE.parent / "benchmarks") == []


def test_the_private_name_check_catches_one(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("def f():\n    from layerpair.exporter.validate import _hidden\n")
    (tmp_path / "n.py").write_text("from layerpair.evaluation import heal as H\n\nx = H._Normal()\n")
    assert _private_imports(tmp_path) == [
        "m.py imports layerpair.exporter.validate._hidden",
        "n.py uses layerpair.evaluation.heal._Normal",
    ]
