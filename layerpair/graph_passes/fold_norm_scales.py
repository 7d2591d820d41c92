"""FoldNormScalesPass: a norm's scale vector moves into the weights of the MatMuls that read it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from layerpair.graph_passes.base import CountingPass, consumers_of, is_weight, remove_if_dead, tshape


class FoldNormScalesPass(CountingPass):
    """Fold ``RMSNorm(x) * g`` into the consumers' weights.

    Pattern (``g`` a constant vector on the last axis, every consumer a MatMul with a constant weight)::

        y = n * g;  z_j = y @ W_j     ==>     z_j = n @ (diag(g) W_j)

    Must not fire when: any consumer of ``y`` is not a MatMul reading ``y`` as its left operand; a weight is
    not a rank-2 initializer or is used elsewhere (scaling it would change the other use, copying it would
    duplicate weights); ``g`` broadcasts over anything but the last axis; ``y`` is a graph output. With
    ``shared_only=True`` (the pair-merge pipeline) it fires only where at least two scaled copies of the
    same ``n`` exist — that is, where it lets two branches share one activation — so a plain model is left
    unchanged.

    Invariant: same function (up to fp rounding of the pre-multiplied weights); weight shapes unchanged;
    the scale vectors disappear (``folded_parameters`` counts their elements). ``activations`` lists the
    now-shared inputs ``n`` (used to scope the sibling-MatMul merge to the pairs). Fires once per ``g``.
    """

    name = "fold_norm_scales"

    def __init__(self, shared_only: bool = False) -> None:
        super().__init__()
        self.shared_only = shared_only
        self.folded_parameters = 0
        self.activations: set[str] = set()

    def rewrite(self, graph: ir.Graph) -> None:
        self.folded_parameters = 0
        by_source: dict[int, list[tuple[ir.Node, ir.Value, ir.Value]]] = {}
        for n in list(graph):
            if n.op_type != "Mul" or n.domain not in ("", "ai.onnx"):
                continue
            found = self._match(graph, n)
            if found is not None:
                by_source.setdefault(id(found[0]), []).append((n, *found))
        for group in by_source.values():
            if self.shared_only and len(group) < 2:
                continue
            for mul, source, g in group:
                self._fold(graph, mul, source, g)

    def _match(self, graph: ir.Graph, mul: ir.Node) -> tuple[ir.Value, ir.Value] | None:
        y = mul.outputs[0]
        if y.is_graph_output() or not y.uses():
            return None
        for g, src in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
            if g is None or src is None or not is_weight(g, graph) or src.const_value is not None:
                continue
            assert g.const_value is not None
            gshape = list(g.const_value.shape.numpy())
            if not gshape or any(d != 1 for d in gshape[:-1]) or not g.const_value.dtype.is_floating_point():
                continue
            k = gshape[-1]
            ok = True
            for use in y.uses():
                c = use.node
                w = c.inputs[1] if len(c.inputs) == 2 else None
                if c.op_type != "MatMul" or use.idx != 0 or not is_weight(w, graph, rank=2):
                    ok = False
                    break
                assert w is not None and w.const_value is not None
                if len(w.uses()) != 1 or tshape(w.const_value)[0] != k or w.const_value.dtype != g.const_value.dtype:
                    ok = False
                    break
            if ok:
                return src, g
        return None

    def _fold(self, graph: ir.Graph, mul: ir.Node, source: ir.Value, g: ir.Value) -> None:
        assert g.const_value is not None
        g_t = g.const_value
        for c in consumers_of(mul.outputs[0]):
            w = c.inputs[1]
            assert w is not None and w.const_value is not None
            w_t = w.const_value

            def scaled(w_t: ir.TensorProtocol = w_t, g_t: ir.TensorProtocol = g_t) -> ir.TensorProtocol:
                g_K1 = g_t.numpy().reshape(-1, 1)  # [K,1]: scales row k of W [K,N]
                w_KN = w_t.numpy()
                return ir.tensor((g_K1 * w_KN).astype(w_KN.dtype))

            w.const_value = ir.LazyTensor(scaled, dtype=w_t.dtype, shape=ir.Shape(tshape(w_t)), name=w_t.name)
            c.replace_input_with(0, source)
        self.folded_parameters += int(np.prod(tshape(g_t)))
        self.activations.add(str(source.name))
        remove_if_dead(graph, [mul])
        self.fired += 1
