"""UntieHeadPass: the tied LM head's Gemm on the embedding becomes a MatMul on its own transposed copy (same
logits, bit for bit); a Gemm that is not the exporter's head is left alone, saying why."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from layerpair.exporter.validate import OrtRunner
from layerpair.graph_passes.untie_head import UntieHeadPass
from layerpair.iospec import IOSpec
from tests.graph_passes.conftest import PAIR, TinyExport


def _logits(model: ir.Model, spec: IOSpec) -> np.ndarray:
    ids = np.array([[3, 1, 4, 1, 5, 9]], np.int64)
    past = [np.zeros((1, s.num_kv_heads, 0, spec.arch.head_dim), np.float32) for s in spec.slots for _ in (0, 1)]
    return OrtRunner(model, spec, threads=1).step(ids, np.ones_like(ids), np.arange(6)[None], past)[0]


def _tied(ex: TinyExport) -> ir.Model:
    model = ir.load(str(ex.path))
    assert any(n.op_type == "Gemm" for n in model.graph)  # the tiny Qwen3 ties its embeddings
    return model


def test_unties_the_head_and_keeps_the_logits(tiny_pair_exports: dict[str, TinyExport]) -> None:
    ex = tiny_pair_exports["qwen3"]
    spec = IOSpec.for_model(ex.arch, [PAIR])
    before = _logits(_tied(ex), spec)
    model = _tied(ex)
    p = UntieHeadPass()
    p(model)
    assert p.fired == 1 and p.rejections == []
    assert not any(n.op_type == "Gemm" for n in model.graph)
    head = [n for n in model.graph if n.op_type == "MatMul"][-1]
    assert head.inputs[1] is not None and head.inputs[1].shape == ir.Shape([ex.arch.hidden_size, ex.arch.vocab_size])
    assert np.array_equal(_logits(model, spec), before)


def test_does_not_fire_on_a_scaled_gemm(tiny_pair_exports: dict[str, TinyExport]) -> None:
    model = _tied(tiny_pair_exports["qwen3"])
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    gemm.attributes["alpha"] = ir.AttrFloat32("alpha", 2.0)
    p = UntieHeadPass()
    p(model)
    assert p.fired == 0 and len(p.rejections) == 1 and "alpha 1" in p.rejections[0]
