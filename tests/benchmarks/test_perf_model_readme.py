"""README.md's performance-model table is generated from the committed result JSON, never typed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.perf_model.report import (
    README_BEGIN,
    README_END,
    RESULTS_JSON,
    readme_block,
    readme_span,
    replace_readme_block,
)

REPO = Path(__file__).resolve().parents[2]


def test_readme_table_equals_the_one_rendered_from_the_committed_json() -> None:
    """A hand edit between the markers (or a new JSON without regenerating) fails here; regenerate with
    ``python -m benchmarks.perf_model --readme``."""
    res = json.loads((REPO / RESULTS_JSON).read_text())
    assert readme_span((REPO / "README.md").read_text()) == readme_block(res)


def test_readme_block_marks_predictions_and_has_every_device_and_batch() -> None:
    res = json.loads((REPO / RESULTS_JSON).read_text())
    block = readme_block(res)
    assert block.startswith(README_BEGIN) and block.endswith(README_END)
    assert "PREDICTION" in block and "limit L/(L-p)" in block
    rows = [ln for ln in block.splitlines() if ln.startswith("| ") and not ln.startswith("| device")]
    for dev in {r["device"] for r in res["single_gpu"]}:
        for b in {r["batch"] for r in res["single_gpu"]}:
            assert any(r.startswith(f"| {dev} |") and f"| 1 GPU | {b} |" in r for r in rows), (dev, b)


def test_replace_readme_block_touches_only_the_marked_span() -> None:
    text = f"before\n{README_BEGIN}\nold\n{README_END}\nafter\n"
    assert replace_readme_block(text, f"{README_BEGIN}\nnew\n{README_END}") == (
        f"before\n{README_BEGIN}\nnew\n{README_END}\nafter\n"
    )
    with pytest.raises(ValueError, match="exactly once"):
        replace_readme_block("no markers", "x")
    with pytest.raises(ValueError, match="before"):
        replace_readme_block(f"{README_END}\n{README_BEGIN}", "x")
