"""MergeGatedMLPPass: a merged pair's two SwiGLU branches become one over the concatenated gate and up (same logits,
bit for bit; 4 nodes fewer per pair); a Concat that is not two gated branches of one input is left alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from layerpair.graph_passes.base import CountingPass
from layerpair.graph_passes.cleanup import CleanupPass
from layerpair.graph_passes.fold_norm_scales import FoldNormScalesPass
from layerpair.graph_passes.merge import merge_pairs, run_passes
from layerpair.graph_passes.merge_attention import MergeAttentionPass
from layerpair.graph_passes.merge_gated_mlp import MergeGatedMLPPass
from layerpair.graph_passes.merge_reducing_matmuls import MergeReducingMatMulsPass
from layerpair.graph_passes.merge_sibling_matmuls import MergeSiblingMatMulsPass
from layerpair.graph_passes.share_norm import ShareRMSNormPass
from layerpair.iospec import IOSpec
from tests.graph_passes.conftest import PAIR, TinyExport, prefill_logits
from tests.graph_passes.graphs import run


def _without_gated_merge(ex: TinyExport) -> ir.Model:
    """The pair merged as before this pass existed: two SwiGLUs on a 4-way Split, joined by a Concat."""
    model = ir.load(str(ex.path))
    fold = FoldNormScalesPass(shared_only=True)
    passes: list[CountingPass] = [ShareRMSNormPass(), fold, MergeAttentionPass(ex.arch, [PAIR])]
    passes += [MergeSiblingMatMulsPass(scope=fold.activations), MergeReducingMatMulsPass(), CleanupPass()]
    run_passes(model, passes)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_one_swiglu_per_pair_same_logits_bit_for_bit(tiny_pair_exports: dict[str, TinyExport], arch: str) -> None:
    ex = tiny_pair_exports[arch]
    spec = IOSpec.for_model(ex.arch, [PAIR], merged=True)
    old = _without_gated_merge(ex)
    new, report = merge_pairs(ir.load(str(ex.path)), ex.arch, [PAIR])
    assert report["passes"]["merge_gated_mlp"] == 1 and report["rejections"]["merge_gated_mlp"] == []
    ops_old, ops_new = ([n.op_type for n in m.graph] for m in (old, new))
    assert len(ops_old) - len(ops_new) == 4 and ops_new.count("Sigmoid") == 3 and ops_old.count("Sigmoid") == 4
    splits = [len(n.outputs) for n in new.graph if n.op_type == "Split" and "mlp" in str(n.name)]
    assert splits == [2]  # G and U of the wide gate/up MatMul, no Concat before the stacked down projection
    assert np.array_equal(prefill_logits(new, spec), prefill_logits(old, spec))


def _gated(share_x: bool = True, axis: int = -1, act: str = "Sigmoid", gate_out: bool = False) -> ir.Model:
    """Concat over 2 branches of ``Mul(Mul(g, act(g)), u)``, ``g``/``u`` MatMuls of ``x`` (or of x1/x2)."""
    K, N = 4, 3
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor(f"W{i}", TensorProto.FLOAT, [K, N], rng.standard_normal(K * N)) for i in range(4)]
    nodes, outs = [], []
    for j in range(2):
        x = "x" if share_x else f"x{j}"
        nodes += [
            helper.make_node("MatMul", [x, f"W{2 * j}"], [f"g{j}"]),
            helper.make_node("MatMul", [x, f"W{2 * j + 1}"], [f"u{j}"]),
            helper.make_node(act, [f"g{j}"], [f"s{j}"]),
            helper.make_node("Mul", [f"g{j}", f"s{j}"], [f"a{j}"]),
            helper.make_node("Mul", [f"a{j}", f"u{j}"], [f"m{j}"]),
        ]
        outs.append(f"m{j}")
    nodes.append(helper.make_node("Concat", outs, ["y"], axis=axis))
    xs = ["x"] if share_x else ["x0", "x1"]
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 2, K]) for x in xs]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if gate_out:  # the first gate is also read by another node
        nodes.append(helper.make_node("Neg", ["g0"], ["n"]))
        outputs.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "gated", inputs, outputs, inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def _run(model: ir.Model) -> np.ndarray:
    """Output ``y`` (the graph's first) with every input fed the same [1,2,4] ramp."""
    x = np.linspace(-2, 2, 8, dtype=np.float32).reshape(1, 2, 4)
    return run(model, {str(v.name): x for v in model.graph.inputs})[0]


def test_fires_on_the_hand_built_form_and_keeps_the_function() -> None:
    before = _run(_gated())
    model = _gated()
    p = MergeGatedMLPPass()
    p(model)
    assert p.fired == 1 and p.rejections == []
    assert [n.op_type for n in model.graph].count("Sigmoid") == 1
    assert np.array_equal(_run(model), before)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"share_x": False}, "do not read one tensor"),
        ({"axis": 1}, "not on the last axis"),
        ({"act": "Tanh"}, None),  # not SiLU: never matched
        ({"gate_out": True}, None),  # a gate read by another node: never matched
    ],
)
def test_must_not_fire(kwargs: dict[str, object], reason: str | None) -> None:
    model = _gated(**kwargs)  # type: ignore[arg-type]
    ops = [n.op_type for n in model.graph]
    p = MergeGatedMLPPass()
    p(model)
    assert p.fired == 0 and [n.op_type for n in model.graph] == ops
    if reason is None:
        assert p.rejections == []
    else:
        assert len(p.rejections) == 1 and reason in p.rejections[0]
