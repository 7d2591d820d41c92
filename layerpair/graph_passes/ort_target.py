"""``--target ort``: the (merged) graph rewritten with ONNX Runtime's fused contrib ops, for ONNX Runtime only.

The portable graph (standard ONNX ops only) stays the default: TensorRT parses it. ``to_ort(model, spec)`` runs,
in order:

1. ``FuseGroupQueryAttentionPass`` (``fuse_gqa.py``): every cache slot's attention — each single layer's and each
   merged pair's wide one (2H / 2·KVH heads) — becomes ``RotaryEmbedding`` x2 + ``GroupQueryAttention``. All or
   nothing: a slot it leaves alone fails the export (``GraphPassError``) with the pass's reason.
2. ``OrtFusionPass``: onnxscript's ``optimize_for_ort`` on what is left — RMSNorm into
   ``SimplifiedLayerNormalization``, residual + RMSNorm into ``SkipSimplifiedLayerNormalization`` (its own attention
   fusions find nothing: the attention is fused already).
3. ``CleanupPass`` (dead nodes, constants, order, shape inference).

The I/O is unchanged (the one I/O spec): GQA's extra inputs are computed inside the graph from ``attention_mask``
(through the exporter's keep mask) and ``position_ids``.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import onnx_ir as ir

from layerpair.graph_passes.base import FIRED, CountingPass, GraphPassError
from layerpair.graph_passes.cleanup import CleanupPass
from layerpair.graph_passes.fuse_gqa import FuseGroupQueryAttentionPass
from layerpair.iospec import IOSpec


class OrtFusionPass(CountingPass):
    """Apply ``onnxscript.rewriter.ort_fusions.optimize_for_ort``.

    Pattern: onnxscript's rules (each an equation of standard ops == one contrib op; see its docs).
    Must not be used for TensorRT or any runtime other than ONNX Runtime (contrib ops are ORT-only).
    Invariant: same function under ONNX Runtime; graph inputs/outputs unchanged. ``fusions`` holds the
    per-rule counts; ``fired`` their sum. Its attention rules do not match the exporter's attention form: that is
    ``FuseGroupQueryAttentionPass``'s job, run first.
    """

    name = "ort_fusions"

    def __init__(self) -> None:
        super().__init__()
        self.fusions: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        self.reset()
        out, counts = optimize_for_ort(model)
        if out is not model:  # keep the in-place contract of CountingPass
            raise ir.passes.PassError("optimize_for_ort returned a new model; expected an in-place rewrite")
        self.fusions = {k: int(v) for k, v in counts.items() if v}
        self.fired = sum(self.fusions.values())
        return ir.passes.PassResult(model, modified=self.fired > 0)


def to_ort(model: ir.Model, spec: IOSpec) -> tuple[ir.Model, dict[str, Any]]:
    """Rewrite ``model`` (in place) for ONNX Runtime; the report's ``ort_target`` section.

    Raises ``GraphPassError`` naming each cache slot whose attention was not fused, and why, or when the I/O
    changed. ``attention_fused``: how many single layers and merged pairs now run ``GroupQueryAttention``."""
    t0 = time.perf_counter()
    g = model.graph
    nodes_before, io_before = len(g), ([v.name for v in g.inputs], [v.name for v in g.outputs])
    gqa = FuseGroupQueryAttentionPass(spec)
    gqa(model)
    missed = {tag: why for tag, why in gqa.slot_outcomes.items() if why != FIRED}
    if missed or gqa.fired != len(spec.slots):
        raise GraphPassError(
            "--target ort: attention not fused into GroupQueryAttention for "
            + "; ".join(f"slot {tag}: {why}" for tag, why in missed.items()),
            "export without --target ort (the portable graph runs on ONNX Runtime too) and report this model",
        )
    fusions = OrtFusionPass()
    fusions(model)
    CleanupPass()(model)
    if ([v.name for v in g.inputs], [v.name for v in g.outputs]) != io_before:
        raise GraphPassError("--target ort changed the graph's inputs/outputs", "report this model as a bug")
    pairs = sum(len(s.layers) == 2 for s in spec.slots)
    ops = Counter(n.op_type for n in g)
    return model, {
        "target": "ort",
        "attention_fused": {"layers": len(spec.slots) - pairs, "pairs": pairs, "slots": gqa.fired},
        "ort_fusions": fusions.fusions,
        "nodes_before": nodes_before,
        "nodes_after": len(g),
        "contrib_ops": {op: n for op, n in sorted(ops.items()) if _is_contrib(g, op)},
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _is_contrib(g: ir.Graph, op_type: str) -> bool:
    return any(n.op_type == op_type and n.domain == "com.microsoft" for n in g)
