"""DropUnusedNormStatsPass: unread statistics outputs of fused norms lose their names (ONNX Runtime then skips
them); a read one or a graph output keeps it; the function is unchanged under ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from layerpair.decode import session
from layerpair.graph_passes.base import node
from layerpair.graph_passes.unused_norm_outputs import MS_DOMAIN, DropUnusedNormStatsPass


def _model(read_stat: bool) -> ir.Model:
    """y, mean, inv_std, sum = SkipSimplifiedLayerNormalization(x, skip, gamma); out = y (+ inv_std if read)."""
    f32 = ir.TensorType(ir.DataType.FLOAT)
    x, skip = (ir.Value(name=n, type=f32, shape=ir.Shape([1, 2, 8])) for n in ("x", "skip"))
    gamma = ir.Value(name="gamma", type=f32, shape=ir.Shape([8]), const_value=ir.tensor(np.full(8, 2, np.float32)))
    norm = ir.Node(MS_DOMAIN, "SkipSimplifiedLayerNormalization", [x, skip, gamma], num_outputs=4, name="norm")
    for i, o in enumerate(norm.outputs):
        o.name, o.type = f"norm_{i}", f32
    nodes = [norm]
    out = norm.outputs[0]
    if read_stat:  # y * inv_std (shape [1,2,1]): a reader of output 2
        nodes.append(node("Mul", [out, norm.outputs[2]], "reader"))
        out = nodes[-1].outputs[0]
    ident = node("Identity", [out], "out")
    ident.outputs[0].type = f32
    g = ir.Graph([x, skip], [ident.outputs[0], norm.outputs[3]], nodes=[*nodes, ident], initializers=[gamma],
                 opset_imports={"": 20, MS_DOMAIN: 1})  # fmt: skip
    return ir.Model(g, ir_version=10)


def _run(model: ir.Model) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((1, 2, 8), dtype=np.float32) for n in ("x", "skip")}
    return session(model, 1).run(None, feeds)


def test_unread_stats_are_dropped_and_the_function_is_unchanged() -> None:
    before = _run(_model(False))
    model = _model(False)
    p = DropUnusedNormStatsPass()
    p(model)
    norm = next(n for n in model.graph if n.name == "norm")
    assert p.fired == 2 and [o.name for o in norm.outputs] == ["norm_0", "", "", "norm_3"]  # sum: a graph output
    after = _run(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_read_stat_is_kept() -> None:
    model = _model(True)
    p = DropUnusedNormStatsPass()
    p(model)
    norm = next(n for n in model.graph if n.name == "norm")
    assert p.fired == 1 and [o.name for o in norm.outputs] == ["norm_0", "", "norm_2", "norm_3"]
    assert p.rejections == ["norm output 2: read by another node"]
