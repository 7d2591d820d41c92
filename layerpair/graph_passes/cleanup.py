"""CleanupPass: dead nodes, duplicate initializers, constant folding, topological order, shape inference."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common

from layerpair.graph_passes.base import RewritePass, float_param_count

REPORT_KEY = "deduplicated"


@dataclass(frozen=True)
class _Step:
    name: str
    run: Callable[[ir.Model], object]


class CleanupPass(RewritePass[_Step]):
    """Tidy the graph after the rewrites, with onnx_ir's and onnxscript's own passes.

    Pattern: not a rewrite but a sequence — ``RemoveUnusedNodes`` (dead nodes and initializers),
    ``DeduplicateInitializers`` (small constants, <= ``dedup_limit`` elements: the rewrites create their own
    shape/axes constants), onnxscript ``fold_constants`` (constant sub-expressions; large weights are never
    folded, ``fold_limit``), ``TopologicalSort``, and ONNX shape inference (value shapes for TensorRT and
    for reading the graph).

    Must not: change the graph inputs/outputs (names, order, dims) or touch large weights' data (they stay
    lazy/external). Invariant: same function.

    Pattern (``pattern``): the steps, in that order (shape inference only with ``infer_shapes``). Check
    (``check``): a step that cannot run says why (onnxscript not installed: no constant folding). Rewrite
    (``rewrite``): the step. Runs only after a rewrite fired (``needs_rewrites``). ``fired`` counts removed or
    folded nodes and initializers; ``removed_parameters["deduplicated"]`` the parameters kept once.
    """

    name = "cleanup"
    needs_rewrites = True

    def __init__(self, dedup_limit: int = 1024, fold_limit: int = 1024, infer_shapes: bool = True) -> None:
        super().__init__()
        self.dedup_limit = dedup_limit
        self.fold_limit = fold_limit
        self.infer_shapes = infer_shapes
        self._size = 0

    @property
    def deduplicated_parameters(self) -> int:
        return self.removed_parameters.get(REPORT_KEY, 0)

    def start(self, model: ir.Model) -> None:
        self.removed_parameters[REPORT_KEY] = 0
        self._size = len(model.graph) + len(model.graph.initializers)

    def pattern(self, model: ir.Model) -> Iterator[_Step]:
        yield _Step("remove_unused_nodes", common.RemoveUnusedNodesPass())
        yield _Step("deduplicate_initializers", self._deduplicate)
        yield _Step("fold_constants", self._fold_constants)
        yield _Step("remove_unused_nodes", common.RemoveUnusedNodesPass())
        yield _Step("topological_sort", common.TopologicalSortPass())
        if self.infer_shapes:
            yield _Step("shape_inference", common.ShapeInferencePass())

    def check(self, model: ir.Model, candidate: _Step) -> str | None:
        if candidate.name == "fold_constants" and importlib.util.find_spec("onnxscript") is None:
            return "onnxscript not installed: constant folding skipped"
        return None

    def describe(self, candidate: _Step) -> str:
        return candidate.name

    def rewrite(self, model: ir.Model, candidate: _Step) -> None:
        candidate.run(model)

    def finish(self, model: ir.Model) -> None:
        """``fired``: how many nodes and initializers the steps removed (the graph is sorted by a step)."""
        self.fired = self._size - (len(model.graph) + len(model.graph.initializers))

    def _deduplicate(self, model: ir.Model) -> None:
        n = float_param_count(model.graph)
        common.DeduplicateInitializersPass(size_limit=self.dedup_limit)(model)
        self.removed_parameters[REPORT_KEY] = n - float_param_count(model.graph)  # kept once, read by every user

    def _fold_constants(self, model: ir.Model) -> None:
        from onnxscript.optimizer import fold_constants

        fold_constants(model, input_size_limit=self.fold_limit, output_size_limit=self.fold_limit)
