"""ShareRMSNormPass: identical unit-scale RMSNorms of one tensor become one."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import onnx_ir as ir

from layerpair.graph_passes.base import RewritePass, remove_if_dead
from layerpair.graph_passes.patterns import UnitRMSNorm, match_unit_rmsnorm


@dataclass(frozen=True)
class _Duplicate:
    norm: UnitRMSNorm  # computes exactly what ``kept`` does
    kept: UnitRMSNorm  # the first such norm in graph order


class ShareRMSNormPass(RewritePass[_Duplicate]):
    """Share the normalisation of a pair's two branches.

    Pattern::

        n1 = x / sqrt(mean(x^2, -1) + eps),  n2 = x / sqrt(mean(x^2, -1) + eps)   ==>   n2 := n1

    Must not fire when the two norms read different tensors, use different epsilons, or when the duplicate
    is a graph output (renaming an output would change the signature). Scaled norms (``g * n``) are matched
    only by their unit part: the scales stay (``FoldNormScalesPass`` moves them into the weights).

    Pattern (``pattern``): each unit norm that duplicates an earlier one (same tensor, epsilon and casts);
    check (``check``): rejects a duplicate that is a graph output; rewrite (``rewrite``): its consumers read the
    first norm, and the duplicate's nodes go.

    Invariant: every consumer sees bit-identical values (the kept norm computes exactly what the removed
    one did). Fires once per removed duplicate.
    """

    name = "share_rmsnorm"

    def pattern(self, model: ir.Model) -> Iterator[_Duplicate]:
        """Each unit RMSNorm (matched at its last node) that computes what an earlier one of the same tensor,
        epsilon and casts does, with that earlier norm."""
        graph = model.graph
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
            kept = first.setdefault((id(norm.x), norm.eps, norm.compute_cast, norm.out_cast), norm)
            if kept is not norm:
                yield _Duplicate(norm, kept)

    def check(self, model: ir.Model, candidate: _Duplicate) -> str | None:
        if candidate.norm.out.is_graph_output():
            return "the duplicate norm is a graph output (renaming it would change the signature)"
        return None

    def rewrite(self, model: ir.Model, candidate: _Duplicate) -> None:
        candidate.norm.out.replace_all_uses_with(candidate.kept.out)
        remove_if_dead(model.graph, candidate.norm.nodes)

    def describe(self, candidate: _Duplicate) -> str:
        return str(candidate.norm.out.name)
