"""UntieHeadPass: a tied LM head, ``Reshape -> Gemm(x, E, transB=1) -> Reshape`` on the embedding table, becomes one
``MatMul`` on its own transposed copy of the table (``--target ort`` float32, as the genai builder's graph)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from layerpair.graph_passes.base import (
    RewritePass,
    attr_int,
    consumers_of,
    lazy_initializer,
    node,
    producer,
    remove_if_dead,
    replace_value,
    tshape,
)


@dataclass(frozen=True)
class _Head:
    gemm: ir.Node
    found: tuple[ir.Value, ir.Value, ir.Value] | str  # (x [B,S,E], embedding [V,E], logits [B,S,V]) or why not


def check_head(gemm: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value] | str:
    """The exporter's tied head (``onnx_graph.lm_head``): rows = Reshape(x [B,S,E], [-1, E]); Gemm(rows, E, transB=1)
    with default alpha/beta and no bias; logits = Reshape(that, [B, S, V]) (read by nothing else)."""
    a = gemm.attributes
    emb = gemm.inputs[1] if len(gemm.inputs) == 2 else None
    if emb is None or emb.const_value is None or len(tshape(emb.const_value)) != 2:
        return "not a Gemm on a constant matrix without bias"
    if attr_int(gemm, "transB", 0) != 1 or attr_int(gemm, "transA", 0) != 0 or a.get_float("alpha", 1.0) != 1.0:
        return "not Gemm(x, W, transB=1) with alpha 1"
    if emb.const_value.dtype != ir.DataType.FLOAT:
        return "not float32 (only --target ort float32 graphs are rewritten)"
    rows = producer(gemm.inputs[0], "Reshape")
    users = consumers_of(gemm.outputs[0])
    if rows is None or rows.inputs[0] is None or len(users) != 1 or users[0].op_type != "Reshape":
        return "the Gemm is not between two Reshapes (the exporter's [B,S,E] -> [B*S,E] -> [B,S,V])"
    x = rows.inputs[0]
    if x.shape is None or len(x.shape) != 3 or gemm.outputs[0].is_graph_output():
        return "the head's input is not [batch, sequence, hidden]"
    return x, emb, users[0].outputs[0]


class UntieHeadPass(RewritePass[_Head]):
    """Give a tied LM head its own [E, V] copy of the embedding and one MatMul.

    Pattern (``E_VE`` the embedding table, also read by the input Gather)::

        logits = Reshape(Gemm(Reshape(x_BSE, [-1, E]), E_VE, transB=1), [B, S, V])
            ==>
        logits = MatMul(x_BSE, E_EV),    E_EV = transpose(E_VE), a new constant (written lazily)

    Why: on ONNX Runtime's CPU decode the Gemm with transB and the two Reshapes around it (a copy of the logits)
    cost more than a MatMul on a [E, V] weight, the form the genai builder emits (SmolLM2: ~1.5% of a decode step).
    Cost: the table is stored twice (+V*E*4 bytes: 113 MB for SmolLM2, 2.1 GB for Llama-3-8B's vocabulary).

    Must not fire when: the Gemm has a bias, alpha != 1, transA, or no transB; the matrix is not a float32
    constant; the Gemm is not between the exporter's two Reshapes; ``--quant-fp32-head`` (``to_ort`` does not run
    this then: the quantizer converts MatMuls only, so the Gemm keeps the head float32; with ``--quant`` alone the
    new MatMul is quantized, as the genai builder's head is).

    Invariant: same function, exactly (the same products and sums per logit; SmolLM2: logits bit-identical);
    graph I/O unchanged.
    """

    name = "untie_head"

    def pattern(self, model: ir.Model) -> Iterator[_Head]:
        for n in list(model.graph):
            if n.op_type == "Gemm" and n.domain in ("", "ai.onnx"):
                yield _Head(n, check_head(n))

    def check(self, model: ir.Model, candidate: _Head) -> str | None:
        return candidate.found if isinstance(candidate.found, str) else None

    def describe(self, candidate: _Head) -> str:
        return str(candidate.gemm.name)

    def rewrite(self, model: ir.Model, candidate: _Head) -> None:
        f = candidate.found
        assert not isinstance(f, str)  # check
        x, emb, logits = f
        table = emb.const_value
        assert table is not None  # check
        V, E = tshape(table)
        w_EV = lazy_initializer(
            model.graph, f"{emb.name}.transposed", lambda: np.ascontiguousarray(table.numpy().T), table.dtype, (E, V)
        )
        mm = node("MatMul", [x, w_EV], f"{candidate.gemm.name}/untied")
        model.graph.append(mm)
        old = [logits.producer(), candidate.gemm, producer(candidate.gemm.inputs[0])]
        replace_value(model.graph, logits, mm.outputs[0])
        remove_if_dead(model.graph, [n for n in old if n is not None])  # the shape nodes go in CleanupPass
