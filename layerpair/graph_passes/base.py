"""Shared pieces of the graph passes: the pass protocol and small structural helpers.

Every pass is an ``onnx_ir.passes.InPlacePass`` (``ir.Model -> ir.Model``, no file I/O) with the same report
attributes (``CountingPass``): ``fired`` (how often its rewrite fired), ``rejections`` (why each candidate it
matched was left alone), ``removed_parameters`` (parameters it removes on purpose, by report key) and
``pair_outcomes`` (per pair, for passes that work pair by pair). A rewrite is written in three parts
(``RewritePass``): ``pattern`` (the candidates it matches), ``check`` (None to accept a candidate, else the
reason it must not fire there) and ``rewrite`` (the change). Helpers here only *read* structure (producers,
consumers, constants); no helper looks at initializer names — names carry no meaning for correctness.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
import onnx_ir as ir

from layerpair.errors import LayerpairError

INT64_MAX = 2**63 - 1
#: ``pair_outcomes`` value of a pair the pass rewrote (otherwise the value is the reason it did not).
FIRED = "fired"

C = TypeVar("C")


class GraphPassError(LayerpairError):
    """A graph pass met a graph it cannot rewrite safely (the export is not written)."""


class CountingPass(ir.passes.InPlacePass):
    """In-place pass with the report attributes every pass shares (all reset on every call).

    ``needs_rewrites``: the driver (``merge.run_passes``) runs the pass only when an earlier pass fired (a tidy-up
    such as ``CleanupPass``: a model nothing was merged in comes back exactly as it went in). ``per_pair``: the
    pass fills ``pair_outcomes`` (``FIRED`` or why not, per pair), which the report lists per pair.
    """

    #: Report key; subclasses override.
    name = "pass"
    needs_rewrites = False
    per_pair = False

    def __init__(self) -> None:
        super().__init__()
        self.fired = 0
        self.rejections: list[str] = []
        self.removed_parameters: dict[str, int] = {}
        self.pair_outcomes: dict[tuple[int, int], str] = {}

    def reset(self) -> None:
        self.fired = 0
        self.rejections = []
        self.removed_parameters = {}
        self.pair_outcomes = {}


class RewritePass(CountingPass, Generic[C]):
    """A rewrite in three parts, run by ``call``: for each candidate of ``pattern`` (generated lazily, so a
    candidate is matched on the graph as the earlier rewrites left it), ``check`` returns None to accept it —
    then ``rewrite`` changes the graph and ``fired`` counts it — or the reason it must not fire there, recorded
    in ``rejections`` as ``"<where>: <reason>"`` (``where``: see ``describe``)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.reset()
        self.start(model)
        for candidate in self.pattern(model):
            reason = self.check(model, candidate)
            if reason is not None:
                self.rejections.append(f"{self.describe(candidate)}: {reason}")
                self.rejected(candidate, reason)
                continue
            self.rewrite(model, candidate)
            self.fired += 1
        self.finish(model)
        return ir.passes.PassResult(model, modified=self.fired > 0)

    def pattern(self, model: ir.Model) -> Iterator[C]:
        """The candidates the rewrite matches (structure only), in a fixed order."""
        raise NotImplementedError

    def check(self, model: ir.Model, candidate: C) -> str | None:
        """None when the rewrite may fire on ``candidate``, else the reason it must not."""
        return None

    def rewrite(self, model: ir.Model, candidate: C) -> None:
        raise NotImplementedError

    def describe(self, candidate: C) -> str:
        """Where a candidate is, for the report (a node's name by default)."""
        return str(getattr(candidate, "name", candidate))

    def start(self, model: ir.Model) -> None:
        """Before the first candidate."""

    def rejected(self, candidate: C, reason: str) -> None:
        """After ``check`` rejected ``candidate`` (recorded in ``rejections`` already)."""

    def finish(self, model: ir.Model) -> None:
        """After the last candidate: new nodes are appended, so restore topological order."""
        if self.fired:
            model.graph.sort()


# ---- reading structure ---------------------------------------------------------------------------


def producer(v: ir.Value | None, op_type: str | None = None) -> ir.Node | None:
    """The node producing ``v`` (optionally only if it is ``op_type`` in the default domain)."""
    if v is None:
        return None
    node = v.producer()
    if node is None or (op_type is not None and (node.op_type != op_type or node.domain not in ("", "ai.onnx"))):
        return None
    return node


def const(v: ir.Value | None) -> np.ndarray | None:
    """Value of a small constant (initializer or Constant node output), else None."""
    if v is None:
        return None
    if v.const_value is not None:
        return v.const_value.numpy()
    node = producer(v, "Constant")
    if node is not None and "value" in node.attributes:
        t = node.attributes["value"].as_tensor()
        return t.numpy()
    return None


def is_weight(v: ir.Value | None, graph: ir.Graph, rank: int | None = None) -> bool:
    """True if ``v`` is an initializer (not a graph input) with known data and the given rank."""
    if v is None or v.const_value is None or v.is_graph_input() or v.name not in graph.initializers:
        return False
    return rank is None or len(v.const_value.shape) == rank


def single_use(v: ir.Value, graph: ir.Graph) -> bool:
    """Exactly one use, and not a graph output (so rewiring its one consumer cannot change the signature)."""
    return len(v.uses()) == 1 and not v.is_graph_output()


def consumers_of(v: ir.Value) -> list[ir.Node]:
    return list(dict.fromkeys(u.node for u in v.uses()))


def attr_int(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return int(a.as_int()) if a is not None else default


def attr_ints(node: ir.Node, name: str) -> tuple[int, ...] | None:
    a = node.attributes.get(name)
    return tuple(a.as_ints()) if a is not None else None


def tshape(t: ir.TensorProtocol) -> tuple[int, ...]:
    """A tensor's (always static) shape as ints."""
    return tuple(int(d) for d in t.shape.numpy())


def scalar(v: ir.Value | None) -> float | None:
    arr = const(v)
    if arr is None or arr.size != 1:
        return None
    return float(arr.reshape(()))


# ---- building ------------------------------------------------------------------------------------


def lazy_initializer(
    graph: ir.Graph, name: str, fn: Callable[[], np.ndarray], dtype: ir.DataType, shape: Sequence[int]
) -> ir.Value:
    """Register an initializer whose data is computed only when read (saving streams it to disk).

    Keeps external data lazy: a concatenated or scaled weight is never held next to its sources in memory
    before the model is written.
    """
    tensor = ir.LazyTensor(lambda: ir.tensor(fn()), dtype=dtype, shape=ir.Shape(list(shape)), name=name)
    value = ir.Value(name=unique_name(graph, name), type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))
    value.const_value = tensor
    graph.register_initializer(value)
    return value


def small_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """An initializer for a small constant (shapes, axes, scalars)."""
    t = ir.tensor(array)
    value = ir.Value(name=unique_name(graph, name), type=ir.TensorType(t.dtype), shape=ir.Shape(list(tshape(t))))
    value.const_value = t
    graph.register_initializer(value)
    return value


def unique_name(graph: ir.Graph, base: str) -> str:
    taken = graph.initializers
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"


def node(op_type: str, inputs: Sequence[ir.Value | None], name: str, num_outputs: int = 1, **attrs: Any) -> ir.Node:
    """A default-domain node with named outputs ``name`` (or ``name_i``)."""
    n = ir.Node(
        "",
        op_type,
        inputs,
        attributes=ir.convenience.convert_attributes(attrs) if attrs else (),  # type: ignore[arg-type]
        num_outputs=num_outputs,
        name=name,
    )
    for i, out in enumerate(n.outputs):
        out.name = name if num_outputs == 1 else f"{name}_{i}"
    return n


def float_param_count(graph: ir.Graph) -> int:
    """Elements in floating-point initializers (the model's parameters), read from shapes, not data."""
    total = 0
    for v in graph.initializers.values():
        t = v.const_value
        if t is not None and t.dtype.is_floating_point():
            total += int(np.prod(tshape(t), dtype=np.int64))
    return total


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Point every use of ``old`` at ``new``; a graph output keeps its name, type and shape (moved to ``new``)."""
    if old.is_graph_output():
        idx = list(graph.outputs).index(old)
        name = old.name
        old.name = None
        new.name, new.type, new.shape = name, old.type, old.shape
        graph.outputs[idx] = new
    old.replace_all_uses_with(new)


def remove_if_dead(graph: ir.Graph, nodes: Sequence[ir.Node]) -> None:
    """Remove those of ``nodes`` whose outputs are unused (repeating until none is left), then the
    initializers they alone read."""
    pending = list(dict.fromkeys(nodes))
    changed = True
    while changed:
        changed = False
        for n in list(pending):
            if n.graph is not graph:
                pending.remove(n)
                continue
            if any(o.uses() or o.is_graph_output() for o in n.outputs):
                continue
            inputs = list(n.inputs)
            graph.remove(n, safe=True)
            pending.remove(n)
            changed = True
            for v in inputs:
                if v is not None and v.name is not None and v.name in graph.initializers and not v.uses():
                    if not v.is_graph_output():
                        del graph.initializers[v.name]
