"""MergeReducingMatMulsPass: two MatMuls whose results are summed become one MatMul over the joint input."""

from __future__ import annotations

from functools import partial

import numpy as np
import onnx_ir as ir

from layerpair.graph_passes.base import (
    INT64_MAX,
    CountingPass,
    attr_int,
    is_weight,
    lazy_initializer,
    node,
    producer,
    remove_if_dead,
    replace_value,
    small_initializer,
    tshape,
)


class MergeReducingMatMulsPass(CountingPass):
    """Merge the output projections of a pair (o_proj, down_proj).

    Pattern (``Wa`` [Ka, N], ``Wb`` [Kb, N] constant; the inner sum optional)::

        (r + a @ Wa) + b @ Wb      ==>     r + concat(a, b) @ [Wa; Wb]
        a @ Wa + b @ Wb            ==>     concat(a, b) @ [Wa; Wb]

    When ``a`` and ``b`` are consecutive last-axis outputs of one ``Split`` (the wide attention's per-branch
    context), ``concat(a, b)`` is that Split's input (or a Slice of it) — no Concat remains.

    Must not fire when: a MatMul result or the inner sum has another use (it would have to be kept, so
    nothing is saved — this is what keeps a plain model's residual stream ``(x + attn) + mlp`` untouched);
    a weight is not a rank-2 initializer used only here; N or dtypes differ; ``a`` or ``b`` is not rank-3+
    on the same leading dims (checked through shapes when known).

    Invariant: same function up to the order of the fp32 sum; parameter count unchanged (weights are
    stacked lazily). Fires once per merged sum.
    """

    name = "merge_reducing_matmuls"

    def rewrite(self, graph: ir.Graph) -> None:
        for add in list(graph):
            if add.graph is graph and add.op_type == "Add" and add.domain in ("", "ai.onnx"):
                self._try(graph, add)

    def _proj(self, graph: ir.Graph, v: ir.Value | None) -> ir.Node | None:
        mm = producer(v, "MatMul")
        if mm is None or v is None or len(v.uses()) != 1 or v.is_graph_output():
            return None
        w = mm.inputs[1]
        if not is_weight(w, graph, rank=2) or w is None or len(w.uses()) != 1:
            return None
        return mm

    def _try(self, graph: ir.Graph, outer: ir.Node) -> None:
        lhs, rhs = outer.inputs[0], outer.inputs[1]
        for p, q in ((lhs, rhs), (rhs, lhs)):
            mm_b = self._proj(graph, q)
            if mm_b is None:
                continue
            mm_a = self._proj(graph, p)
            inner: ir.Node | None = None
            residual: ir.Value | None = None
            if mm_a is None:
                inner = producer(p, "Add")
                if inner is None or p is None or len(p.uses()) != 1 or p.is_graph_output():
                    continue
                for r, m in ((inner.inputs[0], inner.inputs[1]), (inner.inputs[1], inner.inputs[0])):
                    mm_a = self._proj(graph, m)
                    if mm_a is not None:
                        residual = r
                        break
                if mm_a is None:
                    continue
            if self._merge(graph, outer, mm_a, mm_b, inner, residual):
                return

    def _merge(
        self,
        graph: ir.Graph,
        outer: ir.Node,
        mm_a: ir.Node,
        mm_b: ir.Node,
        inner: ir.Node | None,
        residual: ir.Value | None,
    ) -> bool:
        wa, wb = mm_a.inputs[1], mm_b.inputs[1]
        a, b = mm_a.inputs[0], mm_b.inputs[0]
        assert wa is not None and wb is not None and wa.const_value is not None and wb.const_value is not None
        ta, tb = wa.const_value, wb.const_value
        if a is None or b is None or ta.shape[1] != tb.shape[1] or ta.dtype != tb.dtype or a is b:
            return False
        tag = f"lp_red_{outer.outputs[0].name}"
        new_nodes: list[ir.Node] = []
        joint = self._covering(graph, a, b, tag, new_nodes)
        if joint is None:
            new_nodes.append(node("Concat", [a, b], f"{tag}/concat", axis=-1))
            joint = new_nodes[-1].outputs[0]
        w = lazy_initializer(
            graph,
            f"{tag}.weight",
            partial(_stack, ta, tb),
            ta.dtype,
            (tshape(ta)[0] + tshape(tb)[0], tshape(ta)[1]),
        )
        new_nodes.append(node("MatMul", [joint, w], f"{tag}/matmul"))
        y = new_nodes[-1].outputs[0]
        if residual is not None:
            new_nodes.append(node("Add", [residual, y], f"{tag}/residual"))
            y = new_nodes[-1].outputs[0]
        graph.extend(new_nodes)
        replace_value(graph, outer.outputs[0], y)
        split = producer(a, "Split")  # dead when the MatMul now reads the tensor it split
        remove_if_dead(
            graph, [outer] + ([inner] if inner is not None else []) + [mm_a, mm_b] + ([split] if split else [])
        )
        self.fired += 1
        return True

    @staticmethod
    def _covering(graph: ir.Graph, a: ir.Value, b: ir.Value, tag: str, new_nodes: list[ir.Node]) -> ir.Value | None:
        """``concat(a, b)`` as a view of the tensor a and b were split from, if they are adjacent pieces."""
        split = producer(a, "Split")
        if split is None or producer(b, "Split") is not split or attr_int(split, "axis", 0) != -1:
            return None
        outs = list(split.outputs)
        ia, ib = outs.index(a), outs.index(b)
        if ib != ia + 1:
            return None
        src = split.inputs[0]
        if len(outs) == 2:
            return src
        sizes = split.inputs[1].const_value if len(split.inputs) > 1 and split.inputs[1] is not None else None
        if sizes is None or src is None:
            return None
        off = np.concatenate([[0], np.cumsum(sizes.numpy())]).astype(np.int64)
        starts = small_initializer(graph, f"{tag}.starts", off[ia : ia + 1])
        ends = small_initializer(graph, f"{tag}.ends", np.array([off[ib + 1] if ib + 1 < len(outs) else INT64_MAX]))
        axes = small_initializer(graph, f"{tag}.axes", np.array([-1], np.int64))
        new_nodes.append(node("Slice", [src, starts, ends, axes], f"{tag}/slice"))
        return new_nodes[-1].outputs[0]


def _stack(ta: ir.TensorProtocol, tb: ir.TensorProtocol) -> np.ndarray:
    return np.concatenate([ta.numpy(), tb.numpy()], axis=0)  # [Ka+Kb, N]
