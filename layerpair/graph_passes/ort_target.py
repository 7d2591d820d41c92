"""OrtFusionPass: the ``--target ort`` variant — fuse the merged graph into ONNX Runtime contrib ops.

The portable graph (standard ONNX ops only) stays the default: TensorRT parses it. For ONNX Runtime, onnxscript's
``ort_fusions`` rewrite RMSNorm into ``SimplifiedLayerNormalization``, residual + RMSNorm into
``SkipSimplifiedLayerNormalization``, rotary into ``RotaryEmbedding`` (com.microsoft), scaled MatMuls into
``FusedMatMul``. Status: attention is *not* fused into ``GroupQueryAttention`` — the exporter's grouped-query
attention (q viewed as [B,KVH,G,S,D], no K/V repeat) is not one of the patterns ``ort_fusions`` knows.
"""

from __future__ import annotations

import onnx_ir as ir

from layerpair.graph_passes.base import CountingPass


class OrtFusionPass(CountingPass):
    """Apply ``onnxscript.rewriter.ort_fusions.optimize_for_ort``.

    Pattern: onnxscript's rules (each an equation of standard ops == one contrib op; see its docs).
    Must not be used for TensorRT or any runtime other than ONNX Runtime (contrib ops are ORT-only).
    Invariant: same function under ONNX Runtime; graph inputs/outputs unchanged. ``fusions`` holds the
    per-rule counts; ``fired`` their sum.
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
