"""``--quant int4|int8`` (graph_passes/quantize.py): the dequantization that validation trusts is ONNX Runtime's
own arithmetic (checked against its MatMulNBits kernel), a quantized export is validated against its own
dequantized weights (and fails when they are wrong), and bad flags are one-line errors before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from layerpair.errors import ValidationError
from layerpair.graph_passes import quantize as q


def _matmul_model(w_KN: np.ndarray) -> ir.Model:
    a = ir.Value(name="a", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, w_KN.shape[0]]))
    w = ir.Value(name="w", const_value=ir.tensor(w_KN))
    node = ir.node("MatMul", [a, w])
    graph = ir.Graph([a], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 20})
    node.outputs[0].name = "y"
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize(("bits", "block", "K"), [(4, 32, 100), (4, 16, 64), (8, 32, 100), (8, 64, 96)])
def test_dequantized_weight_is_what_the_kernel_computes(bits: int, block: int, K: int) -> None:
    """K not a multiple of the block (padding) included; accuracy level 0 = float32 activations."""
    from layerpair.decode import session

    rng = np.random.default_rng(bits * block + K)
    w = rng.standard_normal((K, 40)).astype(np.float32)
    quant, facts = q.quantize(_matmul_model(w), bits, block, accuracy_level=0)
    assert facts["matmuls_quantized"] == 1 and facts["matmuls_left_float"] == 0
    (node,) = [n for n in quant.graph if n.op_type == q.NBITS]
    w_dq = q.dequantize_weight(node)
    assert w_dq.shape == w.shape and 0 < np.abs(w_dq - w).max() < (0.5 if bits == 4 else 0.05) * np.abs(w).max()
    x = rng.standard_normal((2, K)).astype(np.float32)
    y = session(ir.to_proto(quant).SerializeToString()).run(None, {"a": x})[0]
    np.testing.assert_allclose(y, x @ w_dq, atol=5e-5, rtol=0)
    ref = q.dequantized(quant)  # the same graph as a plain MatMul on the dequantized weight
    assert [n.op_type for n in ref.graph] == ["MatMul"] and len(ref.graph.initializers) == 1
    np.testing.assert_allclose(session(ir.to_proto(ref).SerializeToString()).run(None, {"a": x})[0], y, atol=5e-5)


@pytest.mark.parametrize(
    ("arch", "quant", "head"),
    [("llama", "int4", []), ("qwen3", "int8", []), ("qwen3", "int4", ["--quant-fp32-head"])],
)
def test_cli_quant_exports_a_validated_graph(
    arch: str, quant: str, head: list[str], tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """llama: an untied LM head (already a MatMul); qwen3: a tied one (a Gemm on the embedding), quantized through
    its own copy unless --quant-fp32-head."""
    from layerpair.cli import main

    out = tmp_path / "out"
    assert main([str(tiny_checkpoints[arch]), "--pairs", "1-2", "--target", "ort", "--quant", quant,
                 "--quant-block", "16", *head, "-o", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    rq = report["quant"]
    assert rq["bits"] == q.BITS[quant] and rq["block_size"] == 16 and rq["accuracy_level"] == 4
    assert rq["matmuls_quantized"] == rq["matmuls_before"] > 0 and rq["matmuls_left_float"] == 0
    tied = arch == "qwen3"
    untied = report["ort_target"]["lm_head_untied"]
    assert (untied, rq["gemm_left_float"]) == ((0, 1) if head else (1, 0)) if tied else (0, 0)
    assert set(rq["validation"]) == {"accuracy_level_0", "accuracy_level_4"}
    for case in ("prefill", "decode", "chunked", "padded"):
        assert rq["validation"]["accuracy_level_0"][case]["max_abs"] <= 1e-4  # float32 activations: exact
    graph = onnx.load(str(out / "model.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == q.NBITS]
    assert len(nbits) == rq["matmuls_quantized"] and report["onnx"]["bytes"] > 0
    assert all(a.i == 4 for n in nbits for a in n.attribute if a.name == "accuracy_level")  # shipped level
    assert "quantize" in report["timings_s"]


def test_a_wrong_dequantization_fails_validation(
    tiny_checkpoints: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """If the reference weights were not the quantized ones, validation must say so (and write nothing)."""
    from layerpair.cli import main

    real = q.dequantize_weight
    monkeypatch.setattr(q, "dequantize_weight", lambda node: real(node) * 1.05)
    out = tmp_path / "out"
    argv = [str(tiny_checkpoints["llama"]), "--pairs", "1-2", "--target", "ort", "--quant", "int4", "-o", str(out)]
    assert main(argv) == ValidationError.exit_code
    assert "accuracy level 0 disagrees with its own dequantized weights" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "msg"),
    [
        (["--quant", "int4"], "--quant int4 needs --target ort"),
        (["--quant", "int4", "--target", "ort", "--quant-block", "48"], "--quant-block 48 is not supported"),
        (["--quant", "int8", "--target", "ort", "--quant-accuracy", "2"], "--quant-accuracy 2 is not supported"),
        (["--quant", "int4", "--target", "ort", "--trt"], "cannot be combined with --trt"),
    ],
)
def test_bad_quant_flags_are_one_line_errors(extra: list[str], msg: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["smollm2-135m", "--pairs", "20:24", *extra, "-o", str(out)]
    code = "import sys; from layerpair.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], r.stderr
    assert not out.exists()


def test_the_int8_activation_bound_fails_above_it_and_on_nan() -> None:
    import math

    from layerpair.exporter.validate import Agreement
    from layerpair.pipeline import _normwise

    assert _normwise({"prefill": Agreement(max_rel=0.05)}, q.ACTIVATION_INT8_REL) == []
    assert _normwise({"prefill": Agreement(max_rel=0.2)}, q.ACTIVATION_INT8_REL) == [
        "prefill: logits max_rel 0.2 > 0.1"
    ]
    assert _normwise({"padded": Agreement(max_rel=math.nan)}, q.ACTIVATION_INT8_REL)[0].startswith("padded: logits")
