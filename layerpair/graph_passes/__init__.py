"""Graph passes: rewrite each layer pair's two parallel branches into one wide fused layer.

Pure ``ir.Model -> ir.Model``: nothing here reads or writes a file. ``merge_pairs(model, arch, pairs)`` runs the
pass list (``merge.pair_passes``) through one driver (``merge.run_passes``); each pass is an ``onnx_ir`` in-place
pass in its own module, written as ``pattern`` / ``check`` (None, or the reason it must not fire) / ``rewrite``
(``base.RewritePass``), and reports ``fired``, ``rejections`` and ``removed_parameters`` alike.
"""

from layerpair.graph_passes.base import CountingPass, GraphPassError
from layerpair.graph_passes.cleanup import CleanupPass
from layerpair.graph_passes.fold_norm_scales import FoldNormScalesPass
from layerpair.graph_passes.merge import MATMULS_SAVED_PER_PAIR, merge_pairs, merge_report, pair_passes
from layerpair.graph_passes.merge_attention import MergeAttentionPass
from layerpair.graph_passes.merge_reducing_matmuls import MergeReducingMatMulsPass
from layerpair.graph_passes.merge_sibling_matmuls import MergeSiblingMatMulsPass
from layerpair.graph_passes.ort_target import OrtFusionPass
from layerpair.graph_passes.share_norm import ShareRMSNormPass

__all__ = [
    "MATMULS_SAVED_PER_PAIR",
    "CleanupPass",
    "CountingPass",
    "FoldNormScalesPass",
    "GraphPassError",
    "MergeAttentionPass",
    "MergeReducingMatMulsPass",
    "MergeSiblingMatMulsPass",
    "OrtFusionPass",
    "ShareRMSNormPass",
    "merge_pairs",
    "merge_report",
    "pair_passes",
]
