"""Merging is all or nothing per pair: a pair that cannot become one wide layer fails ``merge_pairs`` with a
``GraphPassError`` naming the pair and the reason; the report records, per pair, what fired."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from layerpair.arch import ArchSpec
from layerpair.exporter.model import Decoder
from layerpair.exporter.onnx_export import export_onnx
from layerpair.graph_passes import GraphPassError, merge_pairs
from layerpair.graph_passes.base import consumers_of, producer, small_initializer
from layerpair.graph_passes.merge_attention import check_attention
from layerpair.graph_passes.patterns import match_rmsnorm
from layerpair.graph_passes.verify import wide_pair_problems
from layerpair.iospec import IOSpec
from tests.conftest import tiny_model

PAIRS = [(0, 1), (2, 3)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[ArchSpec, Path]:
    hf = tiny_model("llama")
    arch = ArchSpec.from_hf_config(hf.config)
    path = tmp_path_factory.mktemp("all_or_nothing") / "model.onnx"
    export_onnx(Decoder.from_hf(hf, arch, PAIRS), path)
    return arch, path


def _attention(model: ir.Model, arch: ArchSpec, layer: int):  # type: ignore[no-untyped-def]
    s = IOSpec.for_model(arch, (), merged=False).slots[layer]
    ins, outs = {v.name: v for v in model.graph.inputs}, {v.name: v for v in model.graph.outputs}
    found = check_attention(ins[s.past_key], ins[s.past_value], outs[s.present_key], outs[s.present_value])
    assert not isinstance(found, str), found
    return found, outs[s.present_key]


def _replace_scalar(graph: ir.Graph, node: ir.Node, old: ir.Value, value: float) -> None:
    new = small_initializer(graph, "test_broken_scalar", np.array(value, np.float32))
    node.replace_input_with(list(node.inputs).index(old), new)


def test_good_pairs_are_recorded_wide(tiny: tuple[ArchSpec, Path]) -> None:
    arch, path = tiny
    _, report = merge_pairs(ir.load(str(path)), arch, PAIRS)
    assert report["pairs"] == {
        "0-1": {"wide": True, "merge_attention": "fired", "problems": []},
        "2-3": {"wide": True, "merge_attention": "fired", "problems": []},
    }
    assert report["matmuls_after"] == report["matmuls_expected_after"]


def test_branches_with_different_attention_scale_fail_naming_the_pair(tiny: tuple[ArchSpec, Path]) -> None:
    arch, path = tiny
    model = ir.load(str(path))
    att, present_k = _attention(model, arch, 1)
    scores = next(
        mm
        for u in consumers_of(present_k)
        for t in consumers_of(u.outputs[0])
        for mm in consumers_of(t.outputs[0])
        if mm.op_type == "MatMul"
    )
    (mul,) = consumers_of(scores.outputs[0])
    _replace_scalar(model.graph, mul, att.scale, 0.5)
    with pytest.raises(GraphPassError) as e:
        merge_pairs(model, arch, PAIRS)
    msg = str(e.value)
    assert "pair 0-1: merge_attention: the branches differ: different attention scale" in msg, msg
    assert "2-3" not in msg  # the other pair merged fine


def test_branches_with_different_norm_eps_fail_naming_the_pair(tiny: tuple[ArchSpec, Path]) -> None:
    """The attention still merges, but the input norms cannot be shared, so q/k/v stay 6 MatMuls."""
    arch, path = tiny
    model = ir.load(str(path))
    att, _ = _attention(model, arch, 1)
    q_mm = producer(att.q_lin, "MatMul")
    assert q_mm is not None and q_mm.inputs[0] is not None
    norm = match_rmsnorm(q_mm.inputs[0])
    assert norm is not None and norm.unit.eps_value is not None
    add = next(n for n in norm.unit.nodes if n.op_type == "Add")
    _replace_scalar(model.graph, add, norm.unit.eps_value, 1e-3)
    with pytest.raises(GraphPassError) as e:
        merge_pairs(model, arch, PAIRS)
    msg = str(e.value)
    assert "pair 0-1: qkv projection is 6 MatMuls, not 1 (merge_sibling_matmuls" in msg, msg
    assert "2-3" not in msg and "gate/up" not in msg


def test_wide_pair_check_rejects_an_unmerged_pair(tiny: tuple[ArchSpec, Path]) -> None:
    arch, path = tiny
    problems = wide_pair_problems(ir.load(str(path)).graph, arch, (0, 1))
    assert problems == ["no wide cache slot 'present.0_1.key' (merge_attention did not fire for this pair)"]
