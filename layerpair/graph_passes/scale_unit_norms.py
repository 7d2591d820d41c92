"""ScaleUnitNormsPass: an RMSNorm without a scale gets an explicit all-ones one (``--target ort`` only), so that
onnxscript's ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` fusions match it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from layerpair.graph_passes.base import RewritePass, const, consumers_of, node, small_initializer
from layerpair.graph_passes.patterns import UnitRMSNorm, match_unit_rmsnorm


def _is_scaled(unit: UnitRMSNorm) -> bool:
    """The norm's output is multiplied by a constant (its scale) and read by nothing else."""
    users = consumers_of(unit.out)
    return len(users) == 1 and users[0].op_type == "Mul" and any(const(v) is not None for v in users[0].inputs)


class ScaleUnitNormsPass(RewritePass[UnitRMSNorm]):
    """Give each unit-scale RMSNorm an explicit scale of ones.

    Pattern (``x`` [..., h] fp32; ``1_h`` an all-ones [h] constant, one per width, shared)::

        y = x * 1/sqrt(mean(x^2, -1) + eps)        ==>     y = (x * 1/sqrt(mean(x^2, -1) + eps)) * 1_h

    A merged pair's shared norms are unit-scale (``FoldNormScalesPass`` moved their scales into the weights), and
    onnxscript's RMSNorm fusion only matches a norm followed by its scale ``Mul``.

    Must not fire when: the norm already has a constant scale (its one consumer is a ``Mul`` by a constant); the
    last dimension of ``x`` is not static (the ones vector needs its width); the graph is 16-bit (casts around the
    norm: not needed by ``--target ort``, which is fp32 only).

    Invariant: same function, exactly (``v * 1.0 == v``); adds one [h] constant per width (no weight is changed).
    """

    name = "scale_unit_norms"

    def __init__(self) -> None:
        super().__init__()
        self._ones: dict[int, ir.Value] = {}

    def start(self, model: ir.Model) -> None:
        self._ones = {}

    def pattern(self, model: ir.Model) -> Iterator[UnitRMSNorm]:
        for n in list(model.graph):
            if n.op_type == "Mul" and n.domain in ("", "ai.onnx"):
                unit = match_unit_rmsnorm(n.outputs[0])
                if unit is not None and not _is_scaled(unit):
                    yield unit

    def check(self, model: ir.Model, candidate: UnitRMSNorm) -> str | None:
        if candidate.compute_cast is not None or candidate.out_cast is not None:
            return "16-bit norm (computed in fp32 by casts)"
        shape = candidate.x.shape
        if shape is None or len(shape) == 0 or not isinstance(shape[-1], int):
            return "the normalized axis has no static width"
        return None

    def describe(self, candidate: UnitRMSNorm) -> str:
        return str(candidate.out.name)

    def rewrite(self, model: ir.Model, candidate: UnitRMSNorm) -> None:
        shape = candidate.x.shape
        assert shape is not None and isinstance(shape[-1], int)  # check
        width = shape[-1]
        if width not in self._ones:
            self._ones[width] = small_initializer(model.graph, f"ort_norm_ones_{width}", np.ones(width, np.float32))
        users = [(u.node, u.idx) for u in candidate.out.uses()]  # before the new Mul becomes one
        scaled = node("Mul", [candidate.out, self._ones[width]], f"{candidate.out.name}/ones")
        for user, idx in users:
            user.replace_input_with(idx, scaled.outputs[0])
        if candidate.out.is_graph_output():
            raise RuntimeError(f"a norm output '{candidate.out.name}' is a graph output")  # not in a decoder graph
        scaled.outputs[0].type, scaled.outputs[0].shape = candidate.out.type, candidate.out.shape
        model.graph.insert_after(candidate.nodes[-1], scaled)
