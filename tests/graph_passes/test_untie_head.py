"""UntieHeadPass: the tied LM head's Gemm on the embedding becomes a MatMul on its own transposed copy (same
logits, bit for bit); a Gemm that is not the exporter's head is left alone, saying why."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from layerpair.graph_passes.untie_head import UntieHeadPass
from layerpair.iospec import IOSpec
from tests.graph_passes.conftest import PAIR, TinyExport, prefill_logits


def _tied(ex: TinyExport) -> ir.Model:
    model = ir.load(str(ex.path))
    assert any(n.op_type == "Gemm" for n in model.graph)  # the tiny Qwen3 ties its embeddings
    return model


def test_unties_the_head_and_keeps_theprefill_logits(tiny_pair_exports: dict[str, TinyExport]) -> None:
    ex = tiny_pair_exports["qwen3"]
    spec = IOSpec.for_model(ex.arch, [PAIR])
    before = prefill_logits(_tied(ex), spec)
    model = _tied(ex)
    p = UntieHeadPass()
    p(model)
    assert p.fired == 1 and p.rejections == []
    assert not any(n.op_type == "Gemm" for n in model.graph)
    head = [n for n in model.graph if n.op_type == "MatMul"][-1]
    assert head.inputs[1] is not None and head.inputs[1].shape == ir.Shape([ex.arch.hidden_size, ex.arch.vocab_size])
    assert np.array_equal(prefill_logits(model, spec), before)


def test_does_not_fire_on_a_scaled_gemm(tiny_pair_exports: dict[str, TinyExport]) -> None:
    model = _tied(tiny_pair_exports["qwen3"])
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    gemm.attributes["alpha"] = ir.AttrFloat32("alpha", 2.0)
    p = UntieHeadPass()
    p(model)
    assert p.fired == 0 and len(p.rejections) == 1 and "alpha 1" in p.rejections[0]
