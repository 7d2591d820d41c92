"""Weight-only quantization of the ``--target ort`` graph (``--quant int4|int8``, issue 16 item 2).

    quantize(model, bits, block, accuracy_level) -> (model, facts)   every MatMul on a constant -> MatMulNBits
    dequantized(model) -> model      each MatMulNBits back to a MatMul on its dequantized float32 weight
    with_accuracy_level(model, level) -> model      every MatMulNBits' activation precision set to ``level``

The quantizer is ONNX Runtime's own (``MatMulNBitsQuantizer``: round to nearest, symmetric, one scale per
``block`` consecutive K of each output column), as onnxruntime-genai's builder uses it (block 32, symmetric,
accuracy level 4 on CPU). What it stores, and what ``dequantized`` inverts (checked against ONNX Runtime's kernel
in tests/graph_passes/test_quantize.py)::

    W_KN[k, n] = (q[n, k] - z[n, k // block]) * s[n, k // block]
    q: B [N, K/block, block*bits/8] uint8, 4-bit values two per byte, low nibble first (K padded to a block)
    s: scales [N, K/block]; z: zero points, 2^(bits-1) when the symmetric quantizer stores none

Invariant: ``dequantized(quantize(m))`` is an fp32 graph with m's structure whose weights are exactly the rounded
ones, so the quantized graph at accuracy level 0 (float32 activations) must agree with it to float32 summation
order: that is the exactness check of a quantized export; what the rounding costs is measured by perplexity
(``layerpair-export eval --onnx``). A tied LM head is quantized when ``to_ort`` has given it its own transposed
copy (``UntieHeadPass``, as the genai builder does); with ``--quant-fp32-head`` it stays the float32 Gemm on the
embedding, which the quantizer (MatMul only) leaves alone, as it does the token embedding's Gather.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from layerpair.errors import InputError
from layerpair.graph_passes.base import GraphPassError

BITS = {"int4": 4, "int8": 8}
BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits' CPU kernel accepts (powers of two, 16..256)
ACCURACY_LEVELS = (0, 1, 4)  # 0: unset (float32), 1: float32, 4: int8 activations (the CPU's fast path)
NBITS = "MatMulNBits"
#: The shipped graph at accuracy level 4 (int8 activations, per block) against the same weights with float32
#: activations, logits normwise (max |diff| / max |ref|): measured 0.048 (int4) and 0.047 (int8) on SmolLM2-135M
#: 20:24, 2026-12-03; twice that. Level 0/1 graphs are held to the float32 bound (logits and caches) instead.
ACTIVATION_INT8_REL = 0.1


def check_quant(quant: str | None, block: int, accuracy_level: int, target: str) -> None:
    """``--quant``/``--quant-block``/``--quant-accuracy`` against what the quantizer and MatMulNBits accept."""
    if quant is None:
        return
    if target != "ort":
        raise InputError(
            f"--quant {quant} needs --target ort: MatMulNBits is an ONNX Runtime op",
            "add --target ort (ONNX Runtime only; not with --trt), or drop --quant",
        )
    if block not in BLOCK_SIZES:
        raise InputError(
            f"--quant-block {block} is not supported", f"use one of {', '.join(map(str, BLOCK_SIZES))} (default 32)"
        )
    if accuracy_level not in ACCURACY_LEVELS:
        raise InputError(
            f"--quant-accuracy {accuracy_level} is not supported",
            "use 4 (int8 activations, fast on CPU; the default), 1 or 0 (float32 activations)",
        )


def _quantizer_class() -> Any:
    """ONNX Runtime's quantizer, imported without its import-time ``logging.basicConfig(level=INFO)`` taking
    over the root logger (which would print every library's INFO records, stack traces included)."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:], root.level = handlers, level
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


def _to_matmul(graph: ir.Graph, node: ir.Node, w_KN: np.ndarray, w_name: str) -> None:
    """Replace ``node`` (first input x) by ``MatMul(x, w_KN)`` on a new initializer; its output keeps its name
    (graph outputs included)."""
    w = ir.Value(name=w_name, const_value=ir.tensor(w_KN))
    graph.register_initializer(w)
    mm = ir.node("MatMul", [node.inputs[0], w], name=f"{node.name}.matmul")
    graph.insert_after(node, mm)
    name = node.outputs[0].name
    node.outputs[0].replace_all_uses_with(mm.outputs[0], replace_graph_outputs=True)
    graph.remove(node, safe=True)
    mm.outputs[0].name = name


def quantize(model: ir.Model, bits: int, block: int, accuracy_level: int) -> tuple[ir.Model, dict[str, Any]]:
    """``model`` with every MatMul on a constant weight replaced by MatMulNBits: a new model, held in memory.
    ``model`` itself is consumed: its external-data tensors are read into memory."""
    MatMulNBitsQuantizer = _quantizer_class()
    ir.external_data.load_to_model(model)
    before = sum(1 for n in model.graph if n.op_type == "MatMul")
    q = MatMulNBitsQuantizer(
        ir.serde.serialize_model(model),
        bits=bits,
        block_size=block,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        op_types_to_quantize=("MatMul",),
    )
    q.process()
    out = ir.serde.deserialize_model(q.model.model)
    ops = [n.op_type for n in out.graph]
    facts = {
        "bits": bits,
        "block_size": block,
        "symmetric": True,
        "accuracy_level": accuracy_level,
        "matmuls_quantized": ops.count(NBITS),
        "matmuls_left_float": ops.count("MatMul"),  # activation x activation (attention) and any the quantizer skipped
        "matmuls_before": before,
        "gemm_left_float": ops.count("Gemm"),  # a tied LM head
        "gather_left_float": ops.count("Gather"),  # the token embedding
    }
    if facts["matmuls_quantized"] == 0:
        raise GraphPassError("the quantizer replaced no MatMul", "the graph has no MatMul on a constant weight")
    return out, facts


def _unpack(b: np.ndarray, bits: int, n: int, blocks: int) -> np.ndarray:
    """[N, K/block, bytes] uint8 -> [N, K/block, block] integer codes."""
    if bits == 8:
        return b.reshape(n, blocks, -1)
    return np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, blocks, -1)


def dequantize_weight(node: ir.Node) -> np.ndarray:
    """The float32 W [K, N] one MatMulNBits node computes with (the module docstring's equation)."""
    k, n, bits = (node.attributes[a].as_int() for a in ("K", "N", "bits"))
    ins = list(node.inputs) + [None] * 6
    if ins[4] is not None or ins[5] is not None:
        raise GraphPassError(f"{node.name}: MatMulNBits with g_idx or bias is not supported here", "quantize again")
    vals = [v.const_value.numpy() if v is not None and v.const_value is not None else None for v in ins[1:4]]
    if vals[0] is None or vals[1] is None:
        raise GraphPassError(f"{node.name}: MatMulNBits weight or scales are not constants", "quantize again")
    scales = vals[1].astype(np.float32).reshape(n, -1)
    blocks = scales.shape[1]
    codes = _unpack(vals[0], bits, n, blocks).astype(np.float32)
    if vals[2] is None:
        zero = np.full((n, blocks), 2 ** (bits - 1), np.float32)
    else:
        zero = _unpack(vals[2], bits, n, -1).reshape(n, -1)[:, :blocks].astype(np.float32)
    w_NK = ((codes - zero[..., None]) * scales[..., None]).reshape(n, -1)[:, :k]
    return np.ascontiguousarray(w_NK.T)


def dequantized(model: ir.Model) -> ir.Model:
    """A copy of ``model`` (a quantized graph) where each MatMulNBits is a MatMul on its dequantized weight."""
    out = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    for node in [n for n in out.graph if n.op_type == NBITS]:
        packed = [v for v in node.inputs[1:4] if v is not None]
        _to_matmul(out.graph, node, dequantize_weight(node), f"{node.name}.dequantized")
        for v in packed:  # the packed codes, scales and zero points: unused now
            if not v.uses() and v.name is not None and v.name in out.graph.initializers:
                del out.graph.initializers[v.name]
    return out


def with_accuracy_level(model: ir.Model, level: int) -> ir.Model:
    """``model`` itself, every MatMulNBits' ``accuracy_level`` set to ``level`` (0: float32 activations)."""
    for node in model.graph:
        if node.op_type == NBITS:
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)
    return model
