"""CleanupPass: dead nodes, duplicate initializers, constant folding, topological order, shape inference."""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common

from layerpair.graph_passes.base import CountingPass, float_param_count


class CleanupPass(CountingPass):
    """Tidy the graph after the rewrites, with onnx_ir's and onnxscript's own passes.

    Pattern: not a rewrite but a sequence — ``RemoveUnusedNodes`` (dead nodes and initializers),
    ``DeduplicateInitializers`` (small constants, <= ``dedup_limit`` elements: the rewrites create their own
    shape/axes constants), onnxscript ``fold_constants`` (constant sub-expressions; large weights are never
    folded, ``fold_limit``), ``TopologicalSort``, and ONNX shape inference (value shapes for TensorRT and
    for reading the graph).

    Must not: change the graph inputs/outputs (names, order, dims) or touch large weights' data (they stay
    lazy/external). Invariant: same function. ``fired`` counts removed or folded nodes and initializers.
    """

    name = "cleanup"

    def __init__(self, dedup_limit: int = 1024, fold_limit: int = 1024, infer_shapes: bool = True) -> None:
        super().__init__()
        self.dedup_limit = dedup_limit
        self.fold_limit = fold_limit
        self.infer_shapes = infer_shapes
        self.deduplicated_parameters = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        before = len(g) + len(g.initializers)
        common.RemoveUnusedNodesPass()(model)
        n = float_param_count(g)
        common.DeduplicateInitializersPass(size_limit=self.dedup_limit)(model)
        self.deduplicated_parameters = n - float_param_count(g)  # kept once, read by every former user
        try:
            from onnxscript.optimizer import fold_constants

            fold_constants(model, input_size_limit=self.fold_limit, output_size_limit=self.fold_limit)
        except ImportError:  # pragma: no cover - onnxscript is a dependency of torch.onnx's exporter
            logging.getLogger(__name__).warning("onnxscript not installed: constant folding skipped")
        common.RemoveUnusedNodesPass()(model)
        common.TopologicalSortPass()(model)
        if self.infer_shapes:
            common.ShapeInferencePass()(model)
        self.fired = before - (len(g) + len(g.initializers))
        return ir.passes.PassResult(model, modified=True)
