"""ScaleUnitNormsPass on tiny exports: fires on a merged pair's unit-scale norms only, and changes nothing."""

from __future__ import annotations

import onnx_ir as ir

from layerpair.exporter.validate import OrtRunner, compare_runners, within_tolerance
from layerpair.graph_passes import merge_pairs
from layerpair.graph_passes.scale_unit_norms import ScaleUnitNormsPass
from layerpair.iospec import IOSpec
from tests.graph_passes.conftest import PAIR, TinyExport


def test_fires_on_the_merged_pairs_unit_norms_and_is_exact(tiny_pair_exports: dict[str, TinyExport]) -> None:
    ex = tiny_pair_exports["llama"]
    spec = IOSpec.for_model(ex.arch, [PAIR], merged=True)
    before, _ = merge_pairs(ir.load(str(ex.path)), ex.arch, [PAIR])
    after, _ = merge_pairs(ir.load(str(ex.path)), ex.arch, [PAIR])
    p = ScaleUnitNormsPass()
    p(after)
    assert p.fired == 2 and p.rejections == []  # the pair's shared input and post-attention norms
    ones = [v for name, v in after.graph.initializers.items() if name.startswith("ort_norm_ones_")]
    assert len(ones) == 1 and ones[0].const_value is not None and (ones[0].const_value.numpy() == 1).all()
    res = compare_runners(OrtRunner(after, spec, threads=1), spec, OrtRunner(before, spec, threads=1), spec)
    assert within_tolerance(res, 0.0) == []  # v * 1.0 == v: bit for bit


def test_does_not_fire_on_scaled_norms(tiny_plain_export: TinyExport) -> None:
    model = ir.load(str(tiny_plain_export.path))
    p = ScaleUnitNormsPass()
    p(model)
    assert p.fired == 0 and p.rejections == []
