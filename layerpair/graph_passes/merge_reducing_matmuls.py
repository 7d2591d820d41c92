"""MergeReducingMatMulsPass: two MatMuls whose results are summed become one MatMul over the joint input."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx_ir as ir

from layerpair.graph_passes.base import (
    INT64_MAX,
    RewritePass,
    attr_int,
    is_weight,
    lazy_initializer,
    node,
    producer,
    remove_if_dead,
    replace_value,
    small_initializer,
    tshape,
)

REPORT_KEY = "summed_biases"


@dataclass(frozen=True)
class _Proj:
    """``x @ W [+ b]``: the MatMul, its weight and, when present, the bias Add and the bias."""

    matmul: ir.Node
    weight: ir.TensorProtocol  # [K, N]
    bias_add: ir.Node | None
    bias: ir.Value | None  # [N]

    @property
    def bias_tensor(self) -> ir.TensorProtocol | None:
        return self.bias.const_value if self.bias is not None else None

    @property
    def nodes(self) -> list[ir.Node]:
        """Outermost first, so ``remove_if_dead`` frees them in one sweep."""
        return ([self.bias_add] if self.bias_add is not None else []) + [self.matmul]


@dataclass(frozen=True)
class _Sum:
    """``outer = [residual +] pa + pb`` (``inner``: the Add of the residual and ``pa``, when present)."""

    outer: ir.Node
    pa: _Proj
    pb: _Proj
    inner: ir.Node | None
    residual: ir.Value | None


class MergeReducingMatMulsPass(RewritePass[_Sum]):
    """Merge the output projections of a pair (o_proj, down_proj).

    Pattern (``Wa`` [Ka, N], ``Wb`` [Kb, N] constant; ``ba``, ``bb`` optional constant biases [N]; the inner
    sum optional)::

        (r + (a @ Wa + ba)) + (b @ Wb + bb)   ==>   r + (concat(a, b) @ [Wa; Wb] + (ba + bb))
        (a @ Wa + ba) + (b @ Wb + bb)         ==>   concat(a, b) @ [Wa; Wb] + (ba + bb)

    A missing bias counts as zero (one biased branch keeps its own bias; none: no Add). The summed bias is
    computed once, in float32, and stored in the weights' dtype (Llama ``attention_bias`` / ``mlp_bias``).

    When ``a`` and ``b`` are consecutive last-axis outputs of one ``Split`` (the wide attention's per-branch
    context), ``concat(a, b)`` is that Split's input (or a Slice of it) — no Concat remains.

    Must not fire when: a MatMul result, a biased projection or the inner sum has another use (it would have
    to be kept, so nothing is saved — this is what keeps a plain model's residual stream ``(x + attn) + mlp``
    untouched); a weight is not a rank-2 initializer used only here; a bias is not a rank-1 initializer of
    length N used only here (then the projection is not matched at all); N or dtypes differ; ``a`` or ``b``
    is not rank-3+ on the same leading dims (checked through shapes when known).

    Pattern (``pattern``): each ``Add`` (graph order, both operand orders) of two projections, or of a residual
    sum and a projection — the single-use, rank-2-weight and bias conditions above. Check (``check``): N and
    dtypes agree and ``a``, ``b`` are two tensors, else the reason. Rewrite (``rewrite``): the stacked MatMul.

    Invariant: same function up to the order of the fp32 sum (and, with two biases, one rounding of
    ``ba + bb`` in the weights' dtype); the parameter count drops by exactly N per merged pair of biases
    (``removed_parameters["summed_biases"]``), weights are stacked lazily. Fires once per merged sum.
    """

    name = "merge_reducing_matmuls"

    @property
    def summed_bias_parameters(self) -> int:
        return self.removed_parameters.get(REPORT_KEY, 0)

    def start(self, model: ir.Model) -> None:
        self.removed_parameters[REPORT_KEY] = 0

    def pattern(self, model: ir.Model) -> Iterator[_Sum]:
        graph = model.graph
        for add in list(graph):
            if add.graph is graph and add.op_type == "Add" and add.domain in ("", "ai.onnx"):
                yield from self._sums(graph, add)

    def check(self, model: ir.Model, candidate: _Sum) -> str | None:
        ta, tb = candidate.pa.weight, candidate.pb.weight
        a, b = candidate.pa.matmul.inputs[0], candidate.pb.matmul.inputs[0]
        if a is None or b is None or a is b:
            return "both projections read the same tensor (or none)"
        if ta.shape[1] != tb.shape[1] or ta.dtype != tb.dtype:
            return f"the weights differ in N or dtype ({tshape(ta)} {ta.dtype} vs {tshape(tb)} {tb.dtype})"
        return None

    def describe(self, candidate: _Sum) -> str:
        return str(candidate.outer.name)

    def rewrite(self, model: ir.Model, candidate: _Sum) -> None:
        c = candidate
        self._merge(model.graph, c.outer, c.pa, c.pb, c.inner, c.residual)

    def _proj(self, graph: ir.Graph, v: ir.Value | None) -> _Proj | None:
        """``v = x @ W`` or ``v = x @ W + b``, every intermediate single-use, else None."""
        if v is None or len(v.uses()) != 1 or v.is_graph_output():
            return None
        bias_add = producer(v, "Add")
        bias: ir.Value | None = None
        if bias_add is not None:
            for y, b in ((bias_add.inputs[0], bias_add.inputs[1]), (bias_add.inputs[1], bias_add.inputs[0])):
                if producer(y, "MatMul") is not None and is_weight(b, graph, rank=1) and b is not None:
                    v, bias = y, b
                    break
            if bias is None or v is None or len(bias.uses()) != 1 or len(v.uses()) != 1 or v.is_graph_output():
                return None
        mm = producer(v, "MatMul")
        if mm is None:
            return None
        w = mm.inputs[1]
        if not is_weight(w, graph, rank=2) or w is None or len(w.uses()) != 1:
            return None
        assert w.const_value is not None  # is_weight
        if bias is not None:
            assert bias.const_value is not None  # is_weight
            bt = bias.const_value
            if tshape(bt) != (tshape(w.const_value)[1],) or bt.dtype != w.const_value.dtype:
                return None
        return _Proj(mm, w.const_value, bias_add if bias is not None else None, bias)

    def _sums(self, graph: ir.Graph, outer: ir.Node) -> Iterator[_Sum]:
        """``outer`` as a sum of two projections, for each operand order; none after one was merged."""
        lhs, rhs = outer.inputs[0], outer.inputs[1]
        for p, q in ((lhs, rhs), (rhs, lhs)):
            pb = self._proj(graph, q)
            if pb is None:
                continue
            pa = self._proj(graph, p)
            inner: ir.Node | None = None
            residual: ir.Value | None = None
            if pa is None:
                inner = producer(p, "Add")
                if inner is None or p is None or len(p.uses()) != 1 or p.is_graph_output():
                    continue
                for r, m in ((inner.inputs[0], inner.inputs[1]), (inner.inputs[1], inner.inputs[0])):
                    pa = self._proj(graph, m)
                    if pa is not None:
                        residual = r
                        break
                if pa is None:
                    continue
            fired = self.fired
            yield _Sum(outer, pa, pb, inner, residual)
            if self.fired != fired:
                return

    def _merge(
        self,
        graph: ir.Graph,
        outer: ir.Node,
        pa: _Proj,
        pb: _Proj,
        inner: ir.Node | None,
        residual: ir.Value | None,
    ) -> None:
        """The checked sum as one MatMul over the joint input (``check`` accepted it)."""
        ta, tb = pa.weight, pb.weight
        a, b = pa.matmul.inputs[0], pb.matmul.inputs[0]
        assert a is not None and b is not None
        tag = f"lp_red_{outer.outputs[0].name}"
        new_nodes: list[ir.Node] = []
        joint = self._covering(graph, a, b, tag, new_nodes)
        if joint is None:
            new_nodes.append(node("Concat", [a, b], f"{tag}/concat", axis=-1))
            joint = new_nodes[-1].outputs[0]
        n_out = tshape(ta)[1]
        w = lazy_initializer(
            graph, f"{tag}.weight", partial(_stack, ta, tb), ta.dtype, (tshape(ta)[0] + tshape(tb)[0], n_out)
        )
        new_nodes.append(node("MatMul", [joint, w], f"{tag}/matmul"))
        y = new_nodes[-1].outputs[0]
        biases = [p.bias_tensor for p in (pa, pb) if p.bias_tensor is not None]
        if biases:
            bias = lazy_initializer(graph, f"{tag}.bias", partial(_sum, biases), ta.dtype, (n_out,))
            new_nodes.append(node("Add", [y, bias], f"{tag}/bias"))
            y = new_nodes[-1].outputs[0]
            self.removed_parameters[REPORT_KEY] += n_out * (len(biases) - 1)
        if residual is not None:
            new_nodes.append(node("Add", [residual, y], f"{tag}/residual"))
            y = new_nodes[-1].outputs[0]
        graph.extend(new_nodes)
        replace_value(graph, outer.outputs[0], y)
        split = producer(a, "Split")  # dead when the MatMul now reads the tensor it split
        old = [outer] + ([inner] if inner is not None else []) + [n for p in (pa, pb) for n in p.nodes]
        remove_if_dead(graph, old + ([split] if split else []))

    @staticmethod
    def _covering(graph: ir.Graph, a: ir.Value, b: ir.Value, tag: str, new_nodes: list[ir.Node]) -> ir.Value | None:
        """``concat(a, b)`` as a view of the tensor a and b were split from, if they are adjacent pieces."""
        split = producer(a, "Split")
        if split is None or producer(b, "Split") is not split or attr_int(split, "axis", 0) != -1:
            return None
        outs = list(split.outputs)
        ia, ib = outs.index(a), outs.index(b)
        if ib != ia + 1:
            return None
        src = split.inputs[0]
        if len(outs) == 2:
            return src
        sizes = split.inputs[1].const_value if len(split.inputs) > 1 and split.inputs[1] is not None else None
        if sizes is None or src is None:
            return None
        off = np.concatenate([[0], np.cumsum(sizes.numpy())]).astype(np.int64)
        starts = small_initializer(graph, f"{tag}.starts", off[ia : ia + 1])
        ends = small_initializer(graph, f"{tag}.ends", np.array([off[ib + 1] if ib + 1 < len(outs) else INT64_MAX]))
        axes = small_initializer(graph, f"{tag}.axes", np.array([-1], np.int64))
        new_nodes.append(node("Slice", [src, starts, ends, axes], f"{tag}/slice"))
        return new_nodes[-1].outputs[0]


def _stack(ta: ir.TensorProtocol, tb: ir.TensorProtocol) -> np.ndarray:
    return np.concatenate([ta.numpy(), tb.numpy()], axis=0)  # [Ka+Kb, N]


def _sum(biases: list[ir.TensorProtocol]) -> np.ndarray:
    """``ba + bb`` rounded once into the biases' dtype (summed in float32)."""
    arrays = [t.numpy() for t in biases]
    return np.sum([a.astype(np.float32) for a in arrays], axis=0).astype(arrays[0].dtype)
