"""--dtype: typed graph keeps its fp32 islands, validates against fp32 within the dtype tolerance, and the
overflow scan finds what does not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerpair.engine.dtype import fp32_islands
from layerpair.exporter.precision import (
    DTYPE_TOLERANCE,
    overflow_scan,
    reference_cache_max,
    typed_decoder,
    within_dtype_tolerance,
)
from layerpair.exporter.validate import Agreement, OrtRunner, TorchRunner, compare_runners
from tests.engine.conftest import TinyExport


def test_fp16_graph_keeps_norm_and_softmax_in_fp32(tiny_export: TinyExport) -> None:
    isl = fp32_islands(tiny_export.onnx["float16"])
    assert isl["problems"] == []
    n_layers = tiny_export.dec32.arch.num_layers
    # two norms per layer + the final norm (the unmerged graph: each branch of a pair has its own norms)
    assert isl["ops"]["ReduceMean"] == {"float32": 2 * n_layers + 1}
    assert isl["ops"]["Softmax"] == {"float32": n_layers}


def test_fp16_onnx_matches_fp32_pytorch_within_dtype_tolerance(tiny_export: TinyExport) -> None:
    spec, dec32 = tiny_export.specs["float16"], tiny_export.dec32
    res = compare_runners(OrtRunner(tiny_export.onnx["float16"], spec), spec, TorchRunner(dec32), dec32.io)
    assert within_dtype_tolerance(res, "float16", reference_cache_max(dec32, None), 1e-4) == []
    # ... and it really is a 16-bit graph: not within the fp32 tolerance.
    assert max(a.max_abs for a in res.values()) > 1e-5


def test_bf16_decoder_within_bf16_tolerance() -> None:
    from layerpair.arch import ArchSpec
    from layerpair.exporter.model import Decoder
    from layerpair.iospec import IOSpec
    from tests.conftest import tiny_model

    m = tiny_model("llama")
    arch = ArchSpec.from_hf_config(m.config)
    dec32 = Decoder.from_hf(m, arch)
    bf = typed_decoder(dec32, "bfloat16")
    assert bf.embed_tokens.dtype == torch.bfloat16 and bf.inv_freq.dtype == torch.float32
    assert dec32.embed_tokens.dtype == torch.float32  # the reference is untouched

    spec = IOSpec.for_model(arch, dtype="float32")  # fed as fp32 numpy, cast inside the runner
    res = compare_runners(TorchRunner(bf), spec, TorchRunner(dec32), dec32.io)  # one runner, any dtype
    assert within_dtype_tolerance(res, "bfloat16", reference_cache_max(dec32, None), 1e-4) == []


def test_dtype_tolerance_rejects_large_errors() -> None:
    a = Agreement(max_abs=1.0, max_rel=0.5, top1=0.5, present_max_abs=3.0)
    bad = within_dtype_tolerance({"prefill": a}, "float16", ref_cache_max=10.0, atol=1e-4)
    assert len(bad) == 2 and "logits max_rel 0.5" in bad[0] and "KV cache" in bad[1]
    ok = Agreement(max_abs=0.1, max_rel=DTYPE_TOLERANCE["float16"] / 2, present_max_abs=0.01)
    assert within_dtype_tolerance({"prefill": ok}, "float16", 10.0, 1e-4) == []
    # fp32 keeps the absolute tolerance
    assert within_dtype_tolerance({"prefill": ok}, "float32", 10.0, 1e-4) != []


def test_overflow_scan_clean_on_tiny_model(tiny_export: TinyExport) -> None:
    rep = overflow_scan(tiny_export.dec32, "float16", np.arange(20))
    assert rep.findings == [] and rep.overflows == []
    assert rep.weights_scanned > 0 and rep.ops_scanned > 10
    assert 0 < rep.activation_max_abs < 65504


def test_overflow_scan_reports_weights_and_activations_beyond_fp16(tiny_export: TinyExport) -> None:
    import copy

    dec = copy.deepcopy(tiny_export.dec32)
    with torch.no_grad():
        dec.layers[0].mlp.up_proj[0, :4] = 1e6  # > fp16 max: inf weight, inf activations downstream
        dec.layers[1].self_attn.q_proj[0, 0] = 1e-9  # below fp16's smallest subnormal: flushes to 0
    rep = overflow_scan(dec, "float16", np.arange(20))
    kinds = {(f.where, f.kind) for f in rep.findings}
    assert ("layers.0.mlp.up_proj", "weight>max") in kinds
    assert ("layers.1.self_attn.q_proj", "weight_underflow") in kinds
    assert any(f.kind == "nonfinite" and f.where.startswith("layers.0.mlp") for f in rep.findings)
    assert rep.overflows and "weight>max" in rep.summary()
    # bf16 has fp32's range: the same weights fit
    assert not [f for f in overflow_scan(dec, "bfloat16", np.arange(20)).findings if f.kind == "weight>max"]


@pytest.mark.parametrize("dtype", ["float32"])
def test_fp32_scan_is_a_no_op(tiny_export: TinyExport, dtype: str) -> None:
    assert overflow_scan(tiny_export.dec32, dtype, np.arange(4)).findings == []
