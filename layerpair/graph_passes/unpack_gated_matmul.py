"""UnpackGatedMatMulPass: a gated MLP's packed gate/up MatMul and its Split become two MatMuls (``--target ort``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from layerpair.graph_passes.base import (
    RewritePass,
    attr_int,
    const,
    consumers_of,
    is_weight,
    lazy_initializer,
    node,
    producer,
    remove_if_dead,
    replace_value,
    tshape,
)


@dataclass(frozen=True)
class _Packed:
    split: ir.Node
    matmul: ir.Node


class UnpackGatedMatMulPass(RewritePass[_Packed]):
    """Give a gated MLP's gate and up their own MatMuls again.

    Pattern (``W`` a constant [K, N_g + N_u]; ``G`` read by the SiLU's Sigmoid and Mul, ``U`` by the gating Mul)::

        G, U = Split(x @ W, [N_g, N_u], axis=-1)      ==>     G = x @ W[:, :N_g],   U = x @ W[:, N_g:]

    A merged pair's MLP comes out of ``merge_pairs`` as one [K, 4I] MatMul split in two (``merge_gated_mlp``).
    ONNX Runtime's CPU MatMul takes as long for the packed weight as for its two halves (SmolLM2, 2 threads:
    326-334 us against 2 x 162-164), and the Split costs ~17 us a node: so the genai builder's layout, gate and
    up apart, is the faster one (``to_ort`` no longer packs a single layer's gate/up either).

    Must not fire when: the Split has other than 2 outputs, is not on the last axis or has no constant sizes; the
    MatMul's weight is not a rank-2 initializer or its output has another reader; G is read by anything but
    Sigmoid/Mul or U by anything but Mul (not a gated MLP: a packed QKV, say, stays packed).

    Invariant: same function, each output column the same dot product (bit-identical on SmolLM2); parameters
    unchanged (the halves are lazy column slices of the packed weight, written one at a time); MatMuls +1, Splits -1.
    """

    name = "unpack_gated_matmul"

    def pattern(self, model: ir.Model) -> Iterator[_Packed]:
        for n in list(model.graph):
            if n.graph is model.graph and n.op_type == "Split" and n.domain in ("", "ai.onnx"):
                mm = producer(n.inputs[0], "MatMul")
                if mm is not None and len(n.outputs) == 2:
                    yield _Packed(n, mm)

    def check(self, model: ir.Model, candidate: _Packed) -> str | None:
        split, mm = candidate.split, candidate.matmul
        sizes, w = const(split.inputs[1] if len(split.inputs) > 1 else None), mm.inputs[1]
        if sizes is None or attr_int(split, "axis", 0) != -1:
            return "the Split has no constant sizes or is not on the last axis (-1)"
        if not is_weight(w, model.graph, rank=2) or w is None or w.const_value is None:
            return "the MatMul's weight is not a rank-2 initializer"
        if len(mm.outputs[0].uses()) != 1 or mm.outputs[0].is_graph_output():
            return "the packed MatMul's output has another reader"
        g_ops = {c.op_type for c in consumers_of(split.outputs[0])}
        u_ops = {c.op_type for c in consumers_of(split.outputs[1])}
        if not g_ops or not g_ops <= {"Sigmoid", "Mul"} or u_ops != {"Mul"}:
            return f"not a gated MLP's gate/up (readers {sorted(g_ops)} and {sorted(u_ops)})"
        if int(sizes.sum()) != tshape(w.const_value)[1]:
            return f"Split sizes {sizes.tolist()} do not cover the weight's {tshape(w.const_value)[1]} columns"
        return None

    def describe(self, candidate: _Packed) -> str:
        return str(candidate.split.name)

    def rewrite(self, model: ir.Model, candidate: _Packed) -> None:
        g, split, mm = model.graph, candidate.split, candidate.matmul
        w = mm.inputs[1]
        sizes = const(split.inputs[1])
        assert w is not None and w.const_value is not None and sizes is not None  # check
        tensor, (K, _) = w.const_value, tshape(w.const_value)
        bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        for i, out in enumerate(split.outputs):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            half = lazy_initializer(g, f"{w.name}.cols{lo}_{hi}", _columns(tensor, lo, hi), tensor.dtype, (K, hi - lo))
            new = node("MatMul", [mm.inputs[0], half], f"{mm.name}/cols{lo}_{hi}")
            g.append(new)
            replace_value(g, out, new.outputs[0])
        remove_if_dead(g, [split, mm])


def _columns(tensor: ir.TensorProtocol, lo: int, hi: int) -> Callable[[], np.ndarray]:
    """Columns [lo, hi) of ``tensor``, read (and copied contiguous) only when written."""
    return lambda: np.ascontiguousarray(tensor.numpy()[:, lo:hi])
