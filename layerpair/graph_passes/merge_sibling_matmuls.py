"""MergeSiblingMatMulsPass: MatMuls of one activation with constant weights become one wide MatMul."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx_ir as ir

from layerpair.graph_passes.base import (
    RewritePass,
    attr_int,
    consumers_of,
    is_weight,
    lazy_initializer,
    node,
    remove_if_dead,
    replace_value,
    small_initializer,
    tshape,
)


@dataclass
class _Sibling:
    matmul: ir.Node
    weight: ir.Value  # [K, N]
    bias_add: ir.Node | None
    bias: ir.Value | None  # [N]

    @property
    def out(self) -> ir.Value:
        return (self.bias_add or self.matmul).outputs[0]

    @property
    def tensor(self) -> ir.TensorProtocol:
        assert self.weight.const_value is not None  # checked when the sibling was matched
        return self.weight.const_value

    @property
    def width(self) -> int:
        return tshape(self.tensor)[1]


@dataclass(frozen=True)
class _Group:
    """Two or more siblings reading ``x``, in graph order."""

    x: ir.Value
    siblings: list[_Sibling]


class MergeSiblingMatMulsPass(RewritePass[_Group]):
    """Merge the projections that read one activation.

    Pattern (``W_j`` constant [K, N_j], optional constant bias ``b_j`` [N_j] added right after)::

        z_j = x @ W_j (+ b_j),  j = 1..k      ==>     [z_1 .. z_k] = Split(x @ [W_1 .. W_k] (+ [b_1 .. b_k]))

    Siblings whose outputs are exactly the inputs of one last-axis ``Concat`` are laid out next to each
    other in the Concat's order and the Concat's output is read straight from the split (so a wide q, k or v
    built by the attention merge costs nothing). Biases (Qwen2 and Llama ``attention_bias`` q/k/v, Llama
    ``mlp_bias`` gate/up) are concatenated in the same order when every sibling has one; when only some do,
    the MatMuls still merge and each bias ``Add`` stays on its own piece of the split (no zero bias is
    invented: that would change the parameter count). A bias is a sibling's own only if it is a rank-1
    initializer of width ``N_j`` read by that one ``Add`` alone.

    Must not fire when: fewer than two siblings; a weight is not a rank-2 initializer, is used elsewhere,
    or differs in K or dtype; a sibling's output is a graph output; the activation is outside ``scope``
    (value names; None = everywhere).

    Pattern (``pattern``): the activations (in ``scope``) read by two or more siblings — MatMuls with their own
    rank-2 initializer weight (used nowhere else) whose output is not a graph output; all groups are found
    before any is merged. Check (``check``): the siblings' weights agree in K and dtype, else the reason.
    Rewrite (``rewrite``): the wide MatMul and its split.

    Invariant: same function, per output column the same dot products (each bias element is added to its
    own column); parameter count unchanged (weights and biases are concatenated lazily, never duplicated).
    Fires once per merged group.
    """

    name = "merge_sibling_matmuls"

    def __init__(self, scope: Collection[str] | None = None) -> None:
        super().__init__()
        self.scope = scope

    def pattern(self, model: ir.Model) -> Iterator[_Group]:
        graph = model.graph
        groups: dict[int, tuple[ir.Value, list[_Sibling]]] = {}
        for n in list(graph):
            if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx"):
                continue
            x = n.inputs[0]
            if x is None or (self.scope is not None and x.name not in self.scope):
                continue
            s = self._sibling(graph, n)
            if s is not None:
                groups.setdefault(id(x), (x, []))[1].append(s)
        found = [_Group(x, sibs) for x, sibs in groups.values() if len(sibs) >= 2]
        yield from found

    def check(self, model: ir.Model, candidate: _Group) -> str | None:
        kinds = {(tshape(s.tensor)[0], s.tensor.dtype) for s in candidate.siblings}
        if len(kinds) != 1:
            got = ", ".join(f"K={k} {dtype}" for k, dtype in sorted(kinds, key=str))
            return f"the weights of the MatMuls reading it differ in K or dtype ({got})"
        return None

    def describe(self, candidate: _Group) -> str:
        return str(candidate.x.name)

    def rewrite(self, model: ir.Model, candidate: _Group) -> None:
        self._merge(model.graph, candidate.x, candidate.siblings)

    @staticmethod
    def _sibling(graph: ir.Graph, mm: ir.Node) -> _Sibling | None:
        w = mm.inputs[1]
        if not is_weight(w, graph, rank=2) or w is None or len(w.uses()) != 1:
            return None
        out = mm.outputs[0]
        if out.is_graph_output():
            return None
        users = consumers_of(out)
        if len(users) == 1 and len(out.uses()) == 1 and users[0].op_type == "Add":
            add = users[0]
            b = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            assert w.const_value is not None
            if (
                is_weight(b, graph, rank=1)
                and b is not None
                and len(b.uses()) == 1
                and b.const_value is not None
                and tshape(b.const_value)[0] == tshape(w.const_value)[1]
                and not add.outputs[0].is_graph_output()
            ):
                return _Sibling(mm, w, add, b)
        return _Sibling(mm, w, None, None)

    def _merge(self, graph: ir.Graph, x: ir.Value, sibs: list[_Sibling]) -> None:
        """One wide MatMul (+ bias) of ``x``, split back into the siblings' outputs (or Concats of them)."""
        with_bias = all(s.bias is not None for s in sibs)
        if not with_bias:  # each bias Add stays, reading its own piece of the split
            sibs = [_Sibling(s.matmul, s.weight, None, None) for s in sibs]
        segments = self._segments(sibs)
        order = [s for run, _ in segments for s in run]
        tag = f"lp_sib_{x.name}"
        new_nodes = _wide_matmul(graph, x, order, with_bias, tag)
        y = new_nodes[-1].outputs[0]  # [..., sum of the widths]
        if len(segments) > 1:
            seg_widths = [sum(s.width for s in run) for run, _ in segments]
            split = small_initializer(graph, f"{tag}.split", np.array(seg_widths, np.int64))
            new_nodes.append(node("Split", [y, split], f"{tag}/split", num_outputs=len(segments), axis=-1))
            pieces = list(new_nodes[-1].outputs)
        else:
            pieces = [y]
        graph.extend(new_nodes)
        old: list[ir.Node] = []
        for (run, cat_out), piece in zip(segments, pieces, strict=True):
            replace_value(graph, cat_out if cat_out is not None else run[0].out, piece)
            if cat_out is not None:
                producer_node = cat_out.producer()
                assert producer_node is not None
                old.append(producer_node)
            for s in run:
                old += [s.matmul] + ([s.bias_add] if s.bias_add is not None else [])
        remove_if_dead(graph, old)

    def _segments(self, sibs: list[_Sibling]) -> list[tuple[list[_Sibling], ir.Value | None]]:
        """The siblings in wide-weight order, as runs: a last-axis Concat fed only by siblings becomes one
        contiguous run in Concat order (paired with the Concat's output, which the split then replaces); every
        other sibling is a run of its own (paired with None)."""
        by_out = {id(s.out): s for s in sibs}
        segments: list[tuple[list[_Sibling], ir.Value | None]] = []
        placed: set[int] = set()
        for s in sibs:
            if id(s.out) in placed:
                continue
            cat = self._concat_of_siblings(s.out, by_out)
            if cat is not None:
                run = [by_out[id(v)] for v in cat.inputs if v is not None]
                segments.append((run, cat.outputs[0]))
                placed.update(id(r.out) for r in run)
            else:
                segments.append(([s], None))
                placed.add(id(s.out))
        return segments

    @staticmethod
    def _concat_of_siblings(out: ir.Value, by_out: dict[int, _Sibling]) -> ir.Node | None:
        users = consumers_of(out)
        if len(users) != 1 or len(out.uses()) != 1 or users[0].op_type != "Concat":
            return None
        cat = users[0]
        if attr_int(cat, "axis", 0) != -1 or len(cat.inputs) < 2:
            return None
        if any(v is None or id(v) not in by_out for v in cat.inputs):
            return None
        if len({id(v) for v in cat.inputs}) != len(cat.inputs):
            return None
        return cat


def _wide_matmul(graph: ir.Graph, x: ir.Value, order: list[_Sibling], with_bias: bool, tag: str) -> list[ir.Node]:
    """``x @ W_KN (+ b_N)`` with ``W_KN = [W_1 .. W_k]`` and ``b_N = [b_1 .. b_k]`` in ``order``, both
    concatenated lazily (written tensor by tensor, never held twice); the new nodes, last one the result."""
    weights = [s.tensor for s in order]
    k = tshape(weights[0])[0]
    widths = [s.width for s in order]
    w_new = lazy_initializer(graph, f"{tag}.weight", partial(_concat, weights, 1), weights[0].dtype, (k, sum(widths)))
    new_nodes = [node("MatMul", [x, w_new], f"{tag}/matmul")]
    if with_bias:
        biases = [s.bias.const_value for s in order if s.bias is not None and s.bias.const_value is not None]
        b_new = lazy_initializer(graph, f"{tag}.bias", partial(_concat, biases, 0), biases[0].dtype, (sum(widths),))
        new_nodes.append(node("Add", [new_nodes[-1].outputs[0], b_new], f"{tag}/bias"))
    return new_nodes


def _concat(tensors: list[ir.TensorProtocol], axis: int) -> np.ndarray:
    return np.concatenate([t.numpy() for t in tensors], axis=axis)
