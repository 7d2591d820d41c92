"""UnpackGatedMatMulPass: a packed gate/up MatMul and its 2-way Split become two MatMuls on column slices (same
outputs, bit for bit); a Split that is not a gated MLP's gate/up (a packed QKV) stays."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from layerpair.graph_passes.unpack_gated_matmul import UnpackGatedMatMulPass
from tests.graph_passes.graphs import run


def _packed(gated: bool = True, axis: int = -1, extra_reader: bool = False) -> ir.Model:
    """y = silu(G) * U with G, U = Split(x @ W, [3, 3]); or (``gated=False``) two plain outputs of the Split."""
    K = 4
    w = np.random.default_rng(0).standard_normal((K, 6)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["z"]),
        helper.make_node("Split", ["z", "sizes"], ["g", "u"], axis=axis),
    ]
    outs = ["y"]
    if gated:
        nodes += [
            helper.make_node("Sigmoid", ["g"], ["s"]),
            helper.make_node("Mul", ["g", "s"], ["a"]),
            helper.make_node("Mul", ["a", "u"], ["y"]),
        ]
    else:
        nodes += [helper.make_node("Add", ["g", "u"], ["y"])]
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["z"], ["n"]))
        outs.append("n")
    inits = [helper.make_tensor("W", TensorProto.FLOAT, [K, 6], w.ravel()),
             helper.make_tensor("sizes", TensorProto.INT64, [2], [3, 3])]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "packed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, K])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
        inits,
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def _run(model: ir.Model) -> np.ndarray:
    return run(model, {"x": np.linspace(-2, 2, 8, dtype=np.float32).reshape(1, 2, 4)})[0]


def test_unpacks_gate_and_up_and_keeps_the_outputs() -> None:
    before = _run(_packed())
    model = _packed()
    p = UnpackGatedMatMulPass()
    p(model)
    assert p.fired == 1 and p.rejections == []
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMul") == 2 and "Split" not in ops
    shapes = sorted(tuple(v.const_value.shape) for v in model.graph.initializers.values() if v.const_value.size > 2)
    assert shapes == [(4, 3), (4, 3)]  # the packed weight is gone, its two halves remain
    assert np.array_equal(_run(model), before)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"gated": False}, "not a gated MLP"),
        ({"axis": 2}, "not on the last axis"),
        ({"extra_reader": True}, "another reader"),
    ],
)
def test_must_not_fire(kwargs: dict[str, object], reason: str) -> None:
    model = _packed(**kwargs)  # type: ignore[arg-type]
    ops = [n.op_type for n in model.graph]
    p = UnpackGatedMatMulPass()
    p(model)
    assert p.fired == 0 and [n.op_type for n in model.graph] == ops
    assert len(p.rejections) == 1 and reason in p.rejections[0]
