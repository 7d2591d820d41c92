"""The CPU throughput benchmark times only a fully merged ONNX graph: its weights have non-unit norm scales (so
fold_norm_scales fires), and an incomplete merge fails the benchmark instead of becoming an lp_merged row."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import onnx_ir as ir
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ lives at the repo root
exports: Any = importlib.import_module("benchmarks.throughput.exports")
measure: Any = importlib.import_module("benchmarks.throughput.measure")
shapes: Any = importlib.import_module("benchmarks.shapes")

from layerpair.exporter.onnx_export import export_onnx  # noqa: E402
from layerpair.graph_passes import GraphPassError, merge_pairs  # noqa: E402

ARCH = shapes.SHAPES["tiny"]
PAIRS = ((1, 2),)


def _export(dec: Any, root: Path) -> Path:
    path = root / "model.onnx"
    export_onnx(shapes.with_pairs(dec, PAIRS), path)
    return path


def test_benchmark_weights_merge_fully_with_every_pass_firing(tmp_path: Path) -> None:
    dec = measure.bench_decoder(ARCH)
    norms = [p for n, p in dec.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(not torch.all(p == 1.0) for p in norms)
    spec, report = exports.merged_onnx(merge_pairs, _export(dec, tmp_path), tmp_path / "m" / "model.onnx", ARCH, PAIRS)
    assert all(report["passes"][name] >= 1 for name in exports.MERGE_PASSES)
    assert report["passes"]["fold_norm_scales"] == 4  # 2 branches x 2 norms
    assert (tmp_path / "m" / "model.onnx").is_file() and spec.slots


def test_a_merge_whose_norm_folding_did_not_fire_fails(tmp_path: Path) -> None:
    """The committed figures' failure: a wide-looking graph timed although fold_norm_scales fired 0 times."""
    model, report = merge_pairs(ir.load(str(_export(measure.bench_decoder(ARCH), tmp_path))), ARCH, PAIRS)
    exports.check_fully_merged(model, ARCH, PAIRS, report)  # as merged: fine
    report["passes"]["fold_norm_scales"] = 0
    with pytest.raises(GraphPassError, match="passes that did not fire: fold_norm_scales"):
        exports.check_fully_merged(model, ARCH, PAIRS, report)


def test_a_merge_that_left_the_pair_as_two_branches_fails(tmp_path: Path) -> None:
    """A merge hook that reports every pass fired but returns the graph unmerged is caught from the graph."""
    src = _export(measure.bench_decoder(ARCH), tmp_path)

    def fake_merge(model: ir.Model, arch: Any, pairs: Any) -> tuple[ir.Model, dict[str, Any]]:
        matmuls = sum(n.op_type == "MatMul" for n in model.graph)
        return model, {"passes": dict.fromkeys(exports.MERGE_PASSES, 1), "matmuls_before": matmuls}

    with pytest.raises(GraphPassError, match=r"pair 1-2: .*MatMuls, expected"):
        exports.merged_onnx(fake_merge, src, tmp_path / "m" / "model.onnx", ARCH, PAIRS)
