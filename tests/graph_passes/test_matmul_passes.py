"""MergeSiblingMatMulsPass and MergeReducingMatMulsPass on hand-built graphs."""

from __future__ import annotations

import numpy as np
import pytest

from layerpair.graph_passes import MergeReducingMatMulsPass, MergeSiblingMatMulsPass
from layerpair.graph_passes.base import float_param_count
from tests.graph_passes.graphs import GraphBuilder, check, ops, rand, run

X = rand(2, 3, 8)
FEEDS = {"x": X}


def _siblings(widths: tuple[int, ...] = (4, 5, 6), bias: bool = False, concat_first_two: bool = False) -> GraphBuilder:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8])
    outs = []
    for n in widths:
        z = g.op("MatMul", [x, g.init(rand(8, n))])
        if bias:
            z = g.op("Add", [z, g.init(rand(n))])
        outs.append(z)
    if concat_first_two:
        outs = [g.op("Concat", outs[:2], axis=-1), *outs[2:]]
    for j, o in enumerate(outs):
        g.output(g.op("Relu", [o], out=f"out{j}"))
    return g


def _assert_same(before: list[np.ndarray], after: list[np.ndarray], atol: float = 0.0) -> None:
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("bias", [False, True])
def test_sibling_matmuls_fire(bias: bool) -> None:
    m = _siblings(bias=bias).model()
    before, params = run(m, FEEDS), float_param_count(m.graph)
    p = MergeSiblingMatMulsPass()
    p(m)
    assert p.fired == 1
    assert ops(m) == {"MatMul": 1, "Split": 1, "Relu": 3, **({"Add": 1} if bias else {})}
    assert float_param_count(m.graph) == params  # weights concatenated, not copied or dropped
    check(m)
    _assert_same(before, run(m, FEEDS), atol=1e-5)


def test_sibling_matmuls_lay_out_a_concat_contiguously() -> None:
    m = _siblings(concat_first_two=True).model()
    before = run(m, FEEDS)
    p = MergeSiblingMatMulsPass()
    p(m)
    assert p.fired == 1
    assert ops(m) == {"MatMul": 1, "Split": 1, "Relu": 2}  # the Concat is gone: a piece of the split
    check(m)
    _assert_same(before, run(m, FEEDS), atol=1e-5)


@pytest.mark.parametrize("case", ["single", "weight_is_input", "weight_shared", "out_of_scope"])
def test_sibling_matmuls_must_not_fire(case: str) -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8])
    if case == "single":
        outs = [g.op("MatMul", [x, g.init(rand(8, 4))])]
    elif case == "weight_is_input":
        w = g.input("w", [8, 4])
        outs = [g.op("MatMul", [x, w]), g.op("MatMul", [x, g.init(rand(8, 4))])]
    elif case == "weight_shared":
        w = g.init(rand(8, 4))
        outs = [g.op("MatMul", [x, w]), g.op("MatMul", [x, g.init(rand(8, 4))]), g.op("MatMul", [g.op("Relu", [x]), w])]
    else:
        outs = [g.op("MatMul", [x, g.init(rand(8, 4))]), g.op("MatMul", [x, g.init(rand(8, 4))])]
    for j, o in enumerate(outs):
        g.output(g.op("Relu", [o], out=f"out{j}"))
    m = g.model()
    n_matmul = ops(m)["MatMul"]
    p = MergeSiblingMatMulsPass(scope={"not_x"} if case == "out_of_scope" else None)
    p(m)
    assert p.fired == 0 and ops(m)["MatMul"] == n_matmul


def _reducing(split_source: bool = False, residual: bool = True, inner_used: bool = False) -> GraphBuilder:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8])
    r = g.input("r", [2, 3, 6])
    if split_source:
        a, b = g.op("Split", [x, g.init(np.array([3, 5], np.int64))], n_out=2, axis=-1).split(",")
    else:
        a, b = g.op("Relu", [x]), g.op("Sigmoid", [x])
    ka, kb = (3, 5) if split_source else (8, 8)
    ma, mb = g.op("MatMul", [a, g.init(rand(ka, 6))]), g.op("MatMul", [b, g.init(rand(kb, 6))])
    inner = g.op("Add", [r, ma]) if residual else ma
    g.op("Add", [inner, mb], out="out")
    g.output("out")
    if inner_used:
        g.output(g.op("Relu", [inner], out="side"))
    return g


@pytest.mark.parametrize("split_source", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_reducing_matmuls_fire(split_source: bool, residual: bool) -> None:
    m = _reducing(split_source, residual).model()
    feeds = {"x": X, "r": rand(2, 3, 6)}
    before = run(m, feeds)
    p = MergeReducingMatMulsPass()
    p(m)
    assert p.fired == 1
    expected = {"MatMul": 1, "Add": 1} if residual else {"MatMul": 1}
    expected.update({"Concat": 1, "Relu": 1, "Sigmoid": 1} if not split_source else {})  # split: no concat
    assert ops(m) == expected
    check(m)
    _assert_same(before, run(m, feeds), atol=1e-5)


def test_reducing_matmuls_must_not_fire_when_the_partial_sum_is_used() -> None:
    """The plain residual stream ``(x + attn) + mlp``: the partial sum feeds the MLP's norm."""
    m = _reducing(inner_used=True).model()
    p = MergeReducingMatMulsPass()
    p(m)
    assert p.fired == 0 and ops(m)["MatMul"] == 2


def _biased_reducing(biases: str, residual: bool = True, bias_shared: bool = False) -> GraphBuilder:
    """``(r + (a @ Wa + ba)) + (b @ Wb + bb)`` (Llama attention_bias / mlp_bias): ``biases`` in "ab", "a", "b"."""
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8])
    r = g.input("r", [2, 3, 6])
    a, b = g.op("Relu", [x]), g.op("Sigmoid", [x])
    shared = g.init(rand(6) + 1.0) if bias_shared else ""
    projections = []
    for name, src in (("a", a), ("b", b)):
        y = g.op("MatMul", [src, g.init(rand(8, 6))])
        if name in biases:  # bias first on one side: the pass must accept either operand order
            bias = shared if bias_shared else g.init(rand(6) + 1.0)
            y = g.op("Add", [y, bias] if name == "a" else [bias, y])
        projections.append(y)
    inner = g.op("Add", [r, projections[0]]) if residual else projections[0]
    g.op("Add", [inner, projections[1]], out="out")
    g.output("out")
    if bias_shared:
        g.output(g.op("Add", [r, shared], out="side"))
    return g


@pytest.mark.parametrize("biases", ["ab", "a", "b"])
@pytest.mark.parametrize("residual", [False, True])
def test_reducing_matmuls_fire_with_biases(biases: str, residual: bool) -> None:
    """One MatMul and one bias ``ba + bb`` (a missing bias counts as zero); parameters drop by N per summed pair."""
    m = _biased_reducing(biases, residual).model()
    feeds = {"x": X, "r": rand(2, 3, 6)}
    before, params = run(m, feeds), float_param_count(m.graph)
    p = MergeReducingMatMulsPass()
    p(m)
    assert p.fired == 1
    assert ops(m) == {"MatMul": 1, "Add": 2 if residual else 1, "Concat": 1, "Relu": 1, "Sigmoid": 1}
    summed = 6 if biases == "ab" else 0
    assert p.summed_bias_parameters == summed and float_param_count(m.graph) == params - summed
    check(m)
    _assert_same(before, run(m, feeds), atol=1e-5)


def test_reducing_matmuls_must_not_fire_on_a_shared_bias() -> None:
    """A bias read elsewhere too is not a projection's own bias: summing it in would change the other use."""
    m = _biased_reducing("ab", bias_shared=True).model()
    p = MergeReducingMatMulsPass()
    p(m)
    assert p.fired == 0 and ops(m)["MatMul"] == 2


def test_reducing_matmuls_must_not_fire_on_a_biased_residual_stream() -> None:
    """A plain model's ``(x + (attn + bo)) + (mlp + bd)``: the partial sum feeds the MLP's norm."""
    g = _biased_reducing("ab")
    inner = next(n for n in g.nodes if n.op_type == "Add" and n.input[0] == "r").output[0]
    g.output(g.op("Relu", [inner], out="side"))
    m = g.model()
    p = MergeReducingMatMulsPass()
    p(m)
    assert p.fired == 0 and ops(m)["MatMul"] == 2
