"""The export CLI merges pairs by default; ``--no-merge`` keeps the two-branch graph."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from layerpair.cli import main


@pytest.mark.parametrize("merge", [True, False])
def test_cli_merges_by_default(merge: bool, tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [str(tiny_checkpoints["qwen2"]), "--pairs", "1-2", "-o", str(out)] + ([] if merge else ["--no-merge"])
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["merged"] is merge
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    names = [v.name for v in graph.input]
    assert names == [t["name"] for t in report["io"]["inputs"]]
    assert ("past_key_values.1_2.key" in names) is merge and ("past_key_values.1.key" in names) is not merge
    assert report["onnx"]["matmuls"] == sum(n.op_type == "MatMul" for n in graph.node)
    if merge:
        assert report["matmuls_after"] == report["matmuls_before"] - 12
        assert report["parameters_check"]["equal"]
        assert report["passes"]["merge_attention"] == 1
        assert report["rejections"] == {name: [] for name in report["passes"]}
        assert report["pairs_merged"]["1-2"] == {"wide": True, "merge_attention": "fired", "problems": []}
        for case in ("prefill", "decode", "padded"):
            assert report["agreement"][case]["max_abs"] <= 1e-4
            assert report["agreement_unmerged"][case]["max_abs"] <= 1e-4
    else:
        assert "passes" not in report
