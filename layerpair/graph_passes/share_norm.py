"""ShareRMSNormPass: identical unit-scale RMSNorms of one tensor become one."""

from __future__ import annotations

import onnx_ir as ir

from layerpair.graph_passes.base import CountingPass, remove_if_dead
from layerpair.graph_passes.patterns import UnitRMSNorm, match_unit_rmsnorm


class ShareRMSNormPass(CountingPass):
    """Share the normalisation of a pair's two branches.

    Pattern::

        n1 = x / sqrt(mean(x^2, -1) + eps),  n2 = x / sqrt(mean(x^2, -1) + eps)   ==>   n2 := n1

    Must not fire when the two norms read different tensors, use different epsilons, or when the duplicate
    is a graph output (renaming an output would change the signature). Scaled norms (``g * n``) are matched
    only by their unit part: the scales stay (``FoldNormScalesPass`` moves them into the weights).

    Invariant: every consumer sees bit-identical values (the kept norm computes exactly what the removed
    one did). Fires once per removed duplicate.
    """

    name = "share_rmsnorm"

    def rewrite(self, graph: ir.Graph) -> None:
        first: dict[tuple[int, float, int | None, int | None], UnitRMSNorm] = {}
        for n in list(graph):
            if n.op_type not in ("Mul", "Cast") or n.graph is not graph:
                continue
            users = [u.node for u in n.outputs[0].uses()]
            if n.op_type == "Mul" and users and all(u.op_type == "Cast" for u in users):
                continue  # the norm ends at its down-cast (16-bit graphs): matched there, counted once
            norm = match_unit_rmsnorm(n.outputs[0])
            if norm is None:
                continue
            key = (id(norm.x), norm.eps, norm.compute_cast, norm.out_cast)
            kept = first.setdefault(key, norm)
            if kept is norm or norm.out.is_graph_output():
                continue
            norm.out.replace_all_uses_with(kept.out)
            remove_if_dead(graph, norm.nodes)
            self.fired += 1
