"""``--target ort``: the (merged) graph rewritten with ONNX Runtime's fused contrib ops, for ONNX Runtime only.

The portable graph (standard ONNX ops only) stays the default: TensorRT parses it. ``to_ort(model, spec)`` runs,
in order:

1. ``FuseGroupQueryAttentionPass`` (``fuse_gqa.py``): every cache slot's attention — each single layer's and each
   merged pair's wide one (2H / 2·KVH heads) — becomes ``RotaryEmbedding`` x2 + ``GroupQueryAttention``. All or
   nothing: a slot it leaves alone fails the export (``GraphPassError``) with the pass's reason.
2. ``MergeSiblingMatMulsPass`` on the fused attentions' inputs: each single layer's q/k/v projections become one
   packed QKV MatMul (a merged pair's already are), as the genai builder packs QKV; gate and up stay apart, and a
   merged pair's packed gate/up is split back into two MatMuls (``UnpackGatedMatMulPass``,
   ``unpack_gated_matmul.py``): the genai builder's layout, faster on ONNX Runtime's CPU MatMul (no Split).
2b. ``PackedRotaryGqaPass`` (``gqa_packed_rotary.py``): GQA reads that packed QKV and rotates q and k itself at
   cache-index positions (Split and both RotaryEmbeddings gone), on every attention or on none. ``rotary``:
   "auto" (the default) does so where every attention allows it (not Qwen3: its per-head q/k norm sits between)
   and otherwise keeps the RotaryEmbeddings, saying why; "gqa" fails instead; "separate" keeps them (they read
   ``position_ids`` as given).
2c. ``UntieHeadPass`` (``untie_head.py``; ``untie=True``, not for ``--quant-fp32-head``): a tied LM head's Gemm on
   the embedding becomes a MatMul on its own transposed copy (+V*E*4 bytes on disk; ``--quant`` quantizes it).
3. ``ScaleUnitNormsPass``: a merged pair's unit-scale norms get an all-ones scale, so that step 4 matches them.
4. ``OrtFusionPass``: onnxscript's ``optimize_for_ort`` on what is left — RMSNorm into
   ``SimplifiedLayerNormalization``, residual + RMSNorm into ``SkipSimplifiedLayerNormalization`` (its own attention
   fusions find nothing: the attention is fused already).
5. ``CleanupPass`` (dead nodes, constants, order, shape inference).
6. ``DropUnusedNormStatsPass`` (``unused_norm_outputs.py``): the fused norms' unread mean / inv_std_var outputs
   are left unnamed, so ONNX Runtime does not compute them.

The I/O is unchanged (the one I/O spec): GQA's extra inputs are computed inside the graph from ``attention_mask``
(through the exporter's keep mask) and ``position_ids``.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common

from layerpair.graph_passes.base import FIRED, CountingPass, GraphPassError
from layerpair.graph_passes.cleanup import CleanupPass
from layerpair.graph_passes.fuse_gqa import FuseGroupQueryAttentionPass
from layerpair.graph_passes.gqa_packed_rotary import PackedRotaryGqaPass, check_site
from layerpair.graph_passes.merge_sibling_matmuls import MergeSiblingMatMulsPass
from layerpair.graph_passes.scale_unit_norms import ScaleUnitNormsPass
from layerpair.graph_passes.unpack_gated_matmul import UnpackGatedMatMulPass
from layerpair.graph_passes.untie_head import UntieHeadPass
from layerpair.graph_passes.unused_norm_outputs import DropUnusedNormStatsPass
from layerpair.iospec import IOSpec

#: fp32 bound (logits and caches, max abs) a ``--target ort`` export is validated to against PyTorch, instead of
#: 1e-4: the fused kernels sum in their own order. Measured on SmolLM2-135M (logits ~30, hidden states at the
#: first position ~1e3): the portable graph 7.3e-5, GroupQueryAttention + RotaryEmbedding alone 8.0e-5, with
#: SkipSimplifiedLayerNormalization 1.15e-4 (pairs 20:24; relative 3.5e-6), 9.1e-5 unmerged; tiny models 3e-7.
ORT_TARGET_ATOL = 2e-4


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


def to_ort(model: ir.Model, spec: IOSpec, rotary: str = "auto", untie: bool = True) -> tuple[ir.Model, dict[str, Any]]:
    """Rewrite ``model`` (in place) for ONNX Runtime; the report's ``ort_target`` section.

    ``rotary``: "auto" | "gqa" | "separate" (step 2b); ``untie``: step 2c (False for ``--quant-fp32-head``).
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
    packed = MergeSiblingMatMulsPass(scope=gqa.attention_inputs)  # q/k/v only: GQA reads the pieces of the split
    packed(model)
    unpacked = UnpackGatedMatMulPass()  # a merged pair's gate/up: two MatMuls again, as a single layer's
    unpacked(model)
    rotated, why_not = _pack_rotary(model, spec, rotary)
    head = UntieHeadPass()
    if untie:  # not for --quant-fp32-head: the quantizer leaves a Gemm alone, so the head stays float32
        head(model)
    ones = ScaleUnitNormsPass()
    ones(model)
    _reinfer_shapes(model)  # onnxscript's norm fusions check [B,S,D] shapes
    fusions = OrtFusionPass()
    fusions(model)
    CleanupPass()(model)
    stats = DropUnusedNormStatsPass()  # last: a later pass could name the outputs again
    stats(model)
    if ([v.name for v in g.inputs], [v.name for v in g.outputs]) != io_before:
        raise GraphPassError("--target ort changed the graph's inputs/outputs", "report this model as a bug")
    pairs = sum(len(s.layers) == 2 for s in spec.slots)
    ops = Counter(n.op_type for n in g)
    return model, {
        "target": "ort",
        "attention_fused": {"layers": len(spec.slots) - pairs, "pairs": pairs, "slots": gqa.fired},
        "packed_matmuls": packed.fired,
        "gated_matmuls_unpacked": unpacked.fired,
        "rotary": {"mode": rotary, "positions": "cache_index" if rotated else "position_ids", "in_gqa": rotated}
        | ({"why_separate": why_not} if why_not else {}),
        "scaled_unit_norms": ones.fired,
        "ort_fusions": fusions.fusions,
        "unread_norm_stats_dropped": stats.fired,
        "lm_head_untied": head.fired,
        "nodes_before": nodes_before,
        "nodes_after": len(g),
        "atol_floor": ORT_TARGET_ATOL,
        "contrib_ops": {op: n for op, n in sorted(ops.items()) if _is_contrib(g, op)},
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _pack_rotary(model: ir.Model, spec: IOSpec, rotary: str) -> tuple[int, str]:
    """``PackedRotaryGqaPass`` on every attention or on none (a graph rotates at one kind of position): (how many,
    why none). ``auto`` falls back to the separate rotary with the reason; ``gqa`` (asked for) fails instead."""
    if rotary == "separate":
        return 0, "--ort-rotary separate"
    sites = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    why = [f"{n.name}: {r}" for n in sites if isinstance(r := check_site(n), str)]
    if why and rotary == "gqa":
        raise GraphPassError(
            f"--ort-rotary gqa: {len(why)} of {len(spec.slots)} attentions cannot take packed QKV with their own "
            "rotary: " + "; ".join(why),
            "drop --ort-rotary (auto: RotaryEmbedding where GroupQueryAttention cannot rotate) and report this model",
        )
    if why:
        return 0, "; ".join(why)
    rot = PackedRotaryGqaPass()
    rot(model)
    if rot.fired != len(spec.slots):  # check_site accepted every one: a bug, not the user's model
        raise GraphPassError(f"PackedRotaryGqaPass fired on {rot.fired} of {len(spec.slots)}", "report this model")
    return rot.fired, ""


def _reinfer_shapes(model: ir.Model) -> None:
    """Shapes inferred afresh from the graph inputs through the contrib ops' outputs (set by the fusion): stale
    ones (a ``unk__`` dim where the exporter's Reshapes hid the sequence axis) would keep the residual stream's two
    Add inputs from agreeing on [batch, sequence, hidden]."""
    for n in model.graph:
        if n.domain in ("", "ai.onnx"):
            for v in n.outputs:
                if not v.is_graph_output():
                    v.shape = None
    common.ShapeInferencePass()(model)


def _is_contrib(g: ir.Graph, op_type: str) -> bool:
    return any(n.op_type == op_type and n.domain == "com.microsoft" for n in g)
