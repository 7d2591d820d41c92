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
