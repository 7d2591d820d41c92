"""MergeGatedMLPPass: a pair's two SwiGLU branches become one SwiGLU over the concatenated gate and up."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import onnx_ir as ir

from layerpair.graph_passes.base import (
    RewritePass,
    attr_int,
    is_weight,
    node,
    producer,
    remove_if_dead,
    replace_value,
    tshape,
)


@dataclass(frozen=True)
class _Branch:
    """``m = Mul(Mul(g, Sigmoid(g)), u)`` with ``g = x @ Wg``, ``u = x @ Wu`` (the exporter's SiLU-gated MLP)."""

    out: ir.Node  # the outer Mul
    silu: ir.Node  # Mul(g, Sigmoid(g))
    sigmoid: ir.Node
    gate: ir.Node  # MatMul
    up: ir.Node  # MatMul


@dataclass(frozen=True)
class _Gated:
    concat: ir.Node  # Concat(m_1 .. m_k, axis=-1): the down projection's input after merge_reducing_matmuls
    branches: list[_Branch]


class MergeGatedMLPPass(RewritePass[_Gated]):
    """Merge the gated MLPs of a pair into one wide one.

    Pattern (``x`` the pair's shared MLP input, ``Wg_j``/``Wu_j`` constant [K, I_j])::

        Concat(silu(x @ Wg_1) * (x @ Wu_1), ..., silu(x @ Wg_k) * (x @ Wu_k))        silu(g) = g * Sigmoid(g)
            ==>
        silu(G) * U,    G = Concat(x @ Wg_1, ..., x @ Wg_k),  U = Concat(x @ Wu_1, ..., x @ Wu_k)

    Elementwise ops commute with a last-axis Concat, so this is the same function, bit for bit. It runs after
    ``merge_reducing_matmuls`` (which leaves the Concat feeding the stacked down projection) and before
    ``merge_sibling_matmuls``, which then writes ``[Wg_1 .. Wg_k Wu_1 .. Wu_k]`` as one MatMul split into G and U
    (its Concat runs) — no weight is copied here. A merged pair's MLP drops from Split(4) + 2 x (Sigmoid, Mul,
    Mul) + Concat to Split(2) + Sigmoid + Mul + Mul: 4 nodes fewer per pair.

    Must not fire when: the Concat is not on the last axis or has fewer than 2 inputs; a branch is not exactly
    that form (another activation, a bias Add, a value read elsewhere); the gate and up MatMuls of all branches do
    not read one tensor or their weights are not rank-2 initializers; a gate and its up differ in width.

    Invariant: same function, bit-identical outputs; MatMul count and parameters unchanged; I/O unchanged.
    """

    name = "merge_gated_mlp"

    def pattern(self, model: ir.Model) -> Iterator[_Gated]:
        for n in list(model.graph):
            if n.graph is model.graph and n.op_type == "Concat" and n.domain in ("", "ai.onnx"):
                branches = [_branch(v) for v in n.inputs]
                if len(branches) >= 2 and all(b is not None for b in branches):
                    yield _Gated(n, [b for b in branches if b is not None])

    def check(self, model: ir.Model, candidate: _Gated) -> str | None:
        if attr_int(candidate.concat, "axis", 0) != -1:
            return "the Concat is not on the last axis (-1)"
        mms = [mm for b in candidate.branches for mm in (b.gate, b.up)]
        if len({id(mm.inputs[0]) for mm in mms}) != 1:
            return "the branches' gate and up projections do not read one tensor"
        if not all(is_weight(mm.inputs[1], model.graph, rank=2) for mm in mms):
            return "a gate or up weight is not a rank-2 initializer"
        for b in candidate.branches:
            wg, wu = (_const_shape(mm) for mm in (b.gate, b.up))
            if wg[1] != wu[1]:
                return f"a branch's gate and up differ in width ({wg[1]} vs {wu[1]})"
        return None

    def describe(self, candidate: _Gated) -> str:
        return str(candidate.concat.name)

    def rewrite(self, model: ir.Model, candidate: _Gated) -> None:
        g, tag = model.graph, f"lp_glu_{candidate.concat.name}"
        gates = node("Concat", [b.gate.outputs[0] for b in candidate.branches], f"{tag}/gate", axis=-1)
        ups = node("Concat", [b.up.outputs[0] for b in candidate.branches], f"{tag}/up", axis=-1)
        sig = node("Sigmoid", [gates.outputs[0]], f"{tag}/sigmoid")
        silu = node("Mul", [gates.outputs[0], sig.outputs[0]], f"{tag}/silu")
        out = node("Mul", [silu.outputs[0], ups.outputs[0]], f"{tag}/mul")
        g.extend([gates, ups, sig, silu, out])
        replace_value(g, candidate.concat.outputs[0], out.outputs[0])
        remove_if_dead(g, [candidate.concat] + [n for b in candidate.branches for n in (b.out, b.silu, b.sigmoid)])


def _const_shape(mm: ir.Node) -> tuple[int, ...]:
    w = mm.inputs[1]
    assert w is not None and w.const_value is not None  # checked: a rank-2 initializer
    return tshape(w.const_value)


def _branch(v: ir.Value | None) -> _Branch | None:
    """``v = Mul(Mul(g, Sigmoid(g)), u)`` (either operand order) with MatMul producers and single-use
    intermediates (``g`` read by the Sigmoid and the inner Mul only), else None."""
    out = producer(v, "Mul")
    if out is None or v is None or len(v.uses()) != 1 or v.is_graph_output():
        return None
    for s_in, u_in in ((out.inputs[0], out.inputs[1]), (out.inputs[1], out.inputs[0])):
        silu, up = producer(s_in, "Mul"), producer(u_in, "MatMul")
        if silu is None or up is None or s_in is None or len(s_in.uses()) != 1:
            continue
        for g_in, sig_in in ((silu.inputs[0], silu.inputs[1]), (silu.inputs[1], silu.inputs[0])):
            sig, gate = producer(sig_in, "Sigmoid"), producer(g_in, "MatMul")
            if sig is None or gate is None or sig.inputs[0] is not g_in or g_in is None or sig_in is None:
                continue
            if u_in is None or any(t.is_graph_output() for t in (g_in, sig_in, s_in, u_in)):
                continue
            if len(g_in.uses()) == 2 and len(sig_in.uses()) == 1 and len(u_in.uses()) == 1:
                return _Branch(out, silu, sig, gate, up)
    return None
