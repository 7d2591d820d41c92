"""PackedRotaryGqaPass (``--target ort``, rotary inside GroupQueryAttention): where it must not fire, what its
cache-index positions mean, and that validation in that mode still fails on a wrong key cache."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir
import pytest

from layerpair.exporter.validate import OrtRunner, Runner, compare_runners, within_tolerance
from layerpair.graph_passes.base import node
from layerpair.graph_passes.fuse_gqa import FuseGroupQueryAttentionPass
from layerpair.graph_passes.gqa_packed_rotary import PackedRotaryGqaPass
from layerpair.graph_passes.merge_sibling_matmuls import MergeSiblingMatMulsPass
from layerpair.graph_passes.ort_target import to_ort
from layerpair.iospec import IOSpec
from tests.graph_passes.conftest import TinyExport


def _fused_separate(ex: TinyExport) -> ir.Model:
    """The tiny export after the GQA fusion and QKV packing: what PackedRotaryGqaPass meets in ``to_ort``."""
    model = ir.load(str(ex.path))
    FuseGroupQueryAttentionPass(IOSpec.for_model(ex.arch))(model)
    MergeSiblingMatMulsPass()(model)
    return model


def _rotaries(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "RotaryEmbedding"]


def test_does_not_fire_on_interleaved_rotary_or_a_piece_read_elsewhere(tiny_plain_export: TinyExport) -> None:
    model = _fused_separate(tiny_plain_export)
    rot = _rotaries(model)
    assert len(rot) == 8  # q and k of 4 layers
    rot[0].attributes["interleaved"] = ir.AttrInt64("interleaved", 1)  # layer 0's q
    v_piece = [n for n in model.graph if n.op_type == "GroupQueryAttention"][2].inputs[2]  # layer 2's v
    assert v_piece is not None
    model.graph.append(node("Neg", [v_piece], "another_reader"))
    p = PackedRotaryGqaPass()
    p(model)
    assert p.fired == 2 and len(p.rejections) == 2
    assert "interleaved rotary" in p.rejections[0] and "read elsewhere" in p.rejections[1]


def test_does_not_fire_twice(tiny_plain_export: TinyExport) -> None:
    model = _fused_separate(tiny_plain_export)
    PackedRotaryGqaPass()(model)
    again = PackedRotaryGqaPass()
    again(model)
    assert again.fired == 0 and all("already rotates" in r for r in again.rejections)


def _step(model: ir.Model | OrtRunner, spec: IOSpec, pos: np.ndarray) -> np.ndarray:
    runner = model if isinstance(model, OrtRunner) else OrtRunner(model, spec, threads=1)
    ids = np.arange(3, 3 + pos.shape[1], dtype=np.int64)[None]
    past = [np.zeros((1, s.num_kv_heads, 0, spec.arch.head_dim), np.float32) for s in spec.slots for _ in (0, 1)]
    return runner.step(ids, np.ones_like(ids), pos, past)[0]


def test_positions_are_cache_indices_not_position_ids(tiny_plain_export: TinyExport) -> None:
    """The documented meaning: the gqa graph ignores position_ids (a gap in them changes nothing), the separate
    graph reads them (the same gap changes its logits)."""
    ex = tiny_plain_export
    spec = IOSpec.for_model(ex.arch)
    index = np.arange(8, dtype=np.int64)[None]
    gap = np.concatenate([index[:, :4], index[:, 4:] + 5], axis=1)
    for rotary, reads_positions in (("gqa", False), ("separate", True)):
        model, _ = to_ort(ir.load(str(ex.path)), spec, rotary)
        runner = OrtRunner(model, spec, threads=1)
        same = np.array_equal(_step(runner, spec, index), _step(runner, spec, gap))
        assert same is not reads_positions, rotary


class _BentKeys(Runner):
    """Another runner's outputs with ``delta`` added to every key cache (a wrong answer for the validator)."""

    def __init__(self, inner: Runner, delta: float) -> None:
        self.inner, self.delta = inner, delta

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, presents = self.inner.step(ids, mask, pos, past)
        return logits, [t + self.delta if i % 2 == 0 else t for i, t in enumerate(presents)]


@pytest.mark.parametrize("delta", [1e-3, float("nan")])
def test_validation_at_cache_index_still_fails_on_wrong_keys(tiny_plain_export: TinyExport, delta: float) -> None:
    """Keys of left-padded rows are not compared in this mode; every other row's are: a wrong or NaN key cache
    fails the bound on the unpadded cases."""
    ex = tiny_plain_export
    spec = IOSpec.for_model(ex.arch)
    fused, report = to_ort(ir.load(str(ex.path)), spec, "gqa")
    ours_spec = replace(spec, rotary_positions=report["rotary"]["positions"])
    ours = OrtRunner(fused, ours_spec, threads=1)
    ref = OrtRunner(ir.load(str(ex.path)), spec, threads=1)
    assert within_tolerance(compare_runners(ours, ours_spec, ref, spec), 1e-5) == []
    res = compare_runners(_BentKeys(ours, delta), ours_spec, ref, spec)
    bad = within_tolerance(res, 1e-5)
    assert any(b.startswith("prefill") for b in bad), bad
    assert not res["prefill"].present_max_abs <= 1e-5
