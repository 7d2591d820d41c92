"""ShareRMSNormPass and FoldNormScalesPass on hand-built graphs."""

from __future__ import annotations

import numpy as np
import pytest

from layerpair.graph_passes import FoldNormScalesPass, ShareRMSNormPass
from tests.graph_passes.graphs import GraphBuilder, check, ops, rand, run

X = rand(2, 3, 8)


def _two_norms(eps_b: float = 1e-6, same_input: bool = True) -> GraphBuilder:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8])
    y = g.input("y", [2, 3, 8])
    na, nb = g.rmsnorm(x), g.rmsnorm(x if same_input else y, eps=eps_b)
    g.op("Mul", [g.init(rand(8)), na], out="out_a")
    g.op("Mul", [g.init(rand(8)), nb], out="out_b")
    g.output("out_a")
    g.output("out_b")
    return g


FEEDS = {"x": X, "y": rand(2, 3, 8)}


def test_share_rmsnorm_fires_on_two_norms_of_one_tensor() -> None:
    m = _two_norms().model()
    before = run(m, FEEDS)
    p = ShareRMSNormPass()
    p(m)
    assert p.fired == 1
    assert ops(m)["ReduceMean"] == 1 and ops(m)["Mul"] == 3  # one unit norm, two scales
    check(m)
    for a, b in zip(before, run(m, FEEDS), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", ["different_eps", "different_input"])
def test_share_rmsnorm_must_not_fire(case: str) -> None:
    g = _two_norms(eps_b=1e-5) if case == "different_eps" else _two_norms(same_input=False)
    m = g.model()
    p = ShareRMSNormPass()
    p(m)
    assert p.fired == 0 and ops(m)["ReduceMean"] == 2


def _scaled_norm_into(consumers: str, n_scales: int = 1, g_shape: tuple[int, ...] = (8,)) -> GraphBuilder:
    """x -> RMSNorm -> * g_j -> MatMuls (or another consumer)."""
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8])
    n = g.rmsnorm(x)
    outs = []
    for j in range(n_scales):
        y = g.op("Mul", [n, g.init(1 + 0.1 * rand(*g_shape))])
        w = g.init(rand(8, 5))
        outs.append(g.op("MatMul", [y, w], out=f"z{j}a"))
        if consumers == "matmuls":
            outs.append(g.op("MatMul", [y, g.init(rand(8, 4))], out=f"z{j}b"))
        elif consumers == "add":
            outs.append(g.op("Add", [y, x], out=f"z{j}b"))
        elif consumers == "shared_weight":
            outs.append(g.op("MatMul", [x, w], out=f"z{j}b"))
    for o in outs:
        g.output(o)
    return g


def test_fold_norm_scales_fires_and_keeps_function() -> None:
    m = _scaled_norm_into("matmuls").model()
    before = run(m, {"x": X})
    p = FoldNormScalesPass()
    p(m)
    assert p.fired == 1 and p.folded_parameters == p.removed_parameters["folded_norm_scales"] == 8
    assert p.rejections == []
    assert ops(m) == {"Pow": 1, "ReduceMean": 1, "Add": 1, "Sqrt": 1, "Reciprocal": 1, "Mul": 1, "MatMul": 2}
    check(m)
    for a, b in zip(before, run(m, {"x": X}), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["add", "shared_weight", "broadcast_rows"])
def test_fold_norm_scales_must_not_fire(case: str) -> None:
    if case == "broadcast_rows":  # g of shape [3,1] scales rows (positions), not features
        g = _scaled_norm_into("matmuls", g_shape=(3, 1))
    else:
        g = _scaled_norm_into(case)
    m = g.model()
    p = FoldNormScalesPass()
    p(m)
    assert p.fired == 0
    assert ops(m)["Mul"] == 2
    reason = {  # the check's reason for each must-not-fire case; a [3,1] scale is not matched at all
        "add": "(Add) reads the scaled norm, not a MatMul",
        "shared_weight": "is used elsewhere (scaling it would change the other use)",
    }.get(case)
    assert (reason is None) == (p.rejections == [])
    assert reason is None or any(reason in r for r in p.rejections), p.rejections


def test_fold_shared_only_needs_two_scaled_copies() -> None:
    one = _scaled_norm_into("matmuls", n_scales=1).model()
    p = FoldNormScalesPass(shared_only=True)
    p(one)
    assert p.fired == 0 and p.rejections == []  # one copy is not a candidate: nothing to share
    two = _scaled_norm_into("matmuls", n_scales=2).model()
    before = run(two, {"x": X})
    p = FoldNormScalesPass(shared_only=True)
    p(two)
    assert p.fired == 2 and len(p.activations) == 1
    assert ops(two)["Mul"] == 1
    check(two)
    for a, b in zip(before, run(two, {"x": X}), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_share_rmsnorm_matches_16bit_norms_computed_in_fp32() -> None:
    """16-bit graphs: ``Cast(RMSNorm(Cast(x, fp32)), fp16)`` — the casts are part of the norm."""
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8])
    for j in range(2):
        up = g.op("Cast", [x], to=1)
        n = g.op("Cast", [g.rmsnorm(up)], to=10)
        g.op("Cast", [g.op("Mul", [g.init(np.ones(8, np.float16)), n])], out=f"out{j}", to=1)
        g.output(f"out{j}")
    m = g.model()
    before = run(m, {"x": X})
    p = ShareRMSNormPass()
    p(m)
    assert p.fired == 1 and ops(m)["ReduceMean"] == 1
    check(m)
    for a, b in zip(before, run(m, {"x": X}), strict=True):
        np.testing.assert_array_equal(a, b)
