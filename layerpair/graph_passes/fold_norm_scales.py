"""FoldNormScalesPass: a norm's scale vector moves into the weights of the MatMuls that read it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from layerpair.graph_passes.base import RewritePass, consumers_of, is_weight, remove_if_dead, tshape

REPORT_KEY = "folded_norm_scales"


@dataclass(frozen=True)
class _Scaled:
    """``y = source * g`` (``mul``); ``foldable``: how many scaled copies of ``source`` pass their own checks."""

    mul: ir.Node
    source: ir.Value
    g: ir.Value
    foldable: int


class FoldNormScalesPass(RewritePass[_Scaled]):
    """Fold ``RMSNorm(x) * g`` into the consumers' weights.

    Pattern (``g`` a constant vector on the last axis, every consumer a MatMul with a constant weight)::

        y = n * g;  z_j = y @ W_j     ==>     z_j = n @ (diag(g) W_j)

    Must not fire when: any consumer of ``y`` is not a MatMul reading ``y`` as its left operand; a weight is
    not a rank-2 initializer or is used elsewhere (scaling it would change the other use, copying it would
    duplicate weights); ``g`` broadcasts over anything but the last axis; ``y`` is a graph output. With
    ``shared_only=True`` (the pair-merge pipeline) it fires only where at least two scaled copies of the
    same ``n`` exist — that is, where it lets two branches share one activation — so a plain model is left
    unchanged.

    Pattern (``pattern``): each ``Mul`` of a non-constant ``n`` by a constant floating-point vector ``g`` on the
    last axis, whose result is used (with ``shared_only``: only where ``n`` has two or more such copies). Check
    (``check``): the must-not-fire cases above, each with its reason. Rewrite (``rewrite``): the consumers read
    ``n`` and their weights become ``diag(g) W_j`` (lazily, when written).

    Invariant: same function (up to fp rounding of the pre-multiplied weights); weight shapes unchanged;
    the scale vectors disappear (``removed_parameters["folded_norm_scales"]`` counts their elements).
    ``activations`` lists the now-shared inputs ``n`` (used to scope the sibling-MatMul merge to the pairs).
    Fires once per ``g``.
    """

    name = "fold_norm_scales"

    def __init__(self, shared_only: bool = False) -> None:
        super().__init__()
        self.shared_only = shared_only
        self.activations: set[str] = set()

    @property
    def folded_parameters(self) -> int:
        return self.removed_parameters.get(REPORT_KEY, 0)

    def start(self, model: ir.Model) -> None:
        self.removed_parameters[REPORT_KEY] = 0

    def pattern(self, model: ir.Model) -> Iterator[_Scaled]:
        """Every scaled copy, grouped by the tensor it scales (in order of first appearance); all are matched
        and counted before any is folded."""
        graph = model.graph
        by_source: dict[int, list[tuple[ir.Node, ir.Value, ir.Value]]] = {}
        for n in list(graph):
            if n.op_type != "Mul" or n.domain not in ("", "ai.onnx"):
                continue
            found = _scale_of(graph, n)
            if found is not None:
                by_source.setdefault(id(found[0]), []).append((n, *found))
        groups = [g for g in by_source.values() if not self.shared_only or len(g) >= 2]
        counted = [sum(_problem(graph, mul, g) is None for mul, _, g in group) for group in groups]
        for group, foldable in zip(groups, counted, strict=True):
            for mul, source, g in group:
                yield _Scaled(mul, source, g, foldable)

    def check(self, model: ir.Model, candidate: _Scaled) -> str | None:
        why = _problem(model.graph, candidate.mul, candidate.g)
        if why is None and self.shared_only and candidate.foldable < 2:
            why = "only one scaled copy of this norm can be folded, so no activation would be shared"
        return why

    def describe(self, candidate: _Scaled) -> str:
        return str(candidate.mul.name)

    def rewrite(self, model: ir.Model, candidate: _Scaled) -> None:
        mul, source, g = candidate.mul, candidate.source, candidate.g
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
        self.removed_parameters[REPORT_KEY] += int(np.prod(tshape(g_t)))
        self.activations.add(str(source.name))
        remove_if_dead(model.graph, [mul])


def _scale_of(graph: ir.Graph, mul: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """``mul = source * g`` with ``g`` a constant floating-point vector on the last axis and ``source`` not a
    constant, its result used: (source, g); else None."""
    if not mul.outputs[0].uses():
        return None
    for g, src in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
        if g is None or src is None or not is_weight(g, graph) or src.const_value is not None:
            continue
        assert g.const_value is not None
        gshape = list(g.const_value.shape.numpy())
        if not gshape or any(d != 1 for d in gshape[:-1]) or not g.const_value.dtype.is_floating_point():
            continue
        return src, g
    return None


def _problem(graph: ir.Graph, mul: ir.Node, g: ir.Value) -> str | None:
    """Why the scale ``g`` of ``mul`` cannot move into its consumers' weights (None when it can)."""
    y = mul.outputs[0]
    if y.is_graph_output():
        return "the scaled norm is a graph output"
    assert g.const_value is not None
    k = tshape(g.const_value)[-1]
    for use in y.uses():
        c = use.node
        w = c.inputs[1] if len(c.inputs) == 2 else None
        if c.op_type != "MatMul" or use.idx != 0:
            return f"'{c.name}' ({c.op_type}) reads the scaled norm, not a MatMul reading it as its left operand"
        if not is_weight(w, graph, rank=2):
            return f"the weight of '{c.name}' is not a rank-2 initializer"
        assert w is not None and w.const_value is not None
        if len(w.uses()) != 1:
            return f"the weight of '{c.name}' is used elsewhere (scaling it would change the other use)"
        if tshape(w.const_value)[0] != k or w.const_value.dtype != g.const_value.dtype:
            return f"the weight of '{c.name}' differs from the scale in length or dtype"
    return None
