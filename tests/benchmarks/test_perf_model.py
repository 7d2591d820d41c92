"""benchmarks.perf_model: counts read off a tiny real export agree with hand counts; the model's arithmetic.

Tiny Llama (tests.conftest.tiny_config): hidden 64, intermediate 96, 4 heads / 2 KV heads of 16, vocab 128,
4 layers, untied head. Per layer the linear weights are q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x96 each,
down 96x64 = 30720 parameters; the LM head 128x64 = 8192. No timing is asserted anywhere.
"""

from __future__ import annotations

import pytest

from benchmarks.perf_model.costs import MATMUL_OPS, Cost, graph_costs, totals
from benchmarks.perf_model.cpu_check import compare
from benchmarks.perf_model.devices import Device
from benchmarks.perf_model.graph import Node, Tensor, fit_dims, load_graph, optimized_model
from benchmarks.perf_model.predict import step_time
from benchmarks.perf_model.units import layer_split, node_units
from tests.conftest import tiny_model

LAYERS, HIDDEN, INTER, HEADS, KVH, D, VOCAB = 4, 64, 96, 4, 2, 16, 128
LINEAR_PER_LAYER = HIDDEN * HIDDEN * 2 + HIDDEN * KVH * D * 2 + 3 * HIDDEN * INTER  # 30720
LINEAR = LAYERS * LINEAR_PER_LAYER + VOCAB * HIDDEN  # 131072 parameters read by MatMuls per step


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Node]]:
    """Original and LP (pair 1-2, merged) exports of the tiny Llama through the CLI, as ORT runs them."""
    from layerpair.cli import main

    root = tmp_path_factory.mktemp("perf_model")
    tiny_model("llama").save_pretrained(root / "ckpt")
    out = {}
    for name, pairs in (("orig", "none"), ("lp", "1-2")):
        assert main([str(root / "ckpt"), "--pairs", pairs, "-o", str(root / name)]) == 0
        opt = optimized_model(root / name / "model.onnx", root / f"opt-{name}.onnx", threads=1)
        out[name] = load_graph(opt, threads=1)
    return out


def _matmuls(nodes: list[Node], b: int, t: int) -> list[Cost]:
    return [c for c in graph_costs(nodes, b, t) if c.op in MATMUL_OPS]


@pytest.mark.parametrize(("b", "t"), [(1, 128), (8, 1000)])
def test_matmul_bytes_and_flops_match_hand_counts(graphs: dict[str, list[Node]], b: int, t: int) -> None:
    """Weights read = every linear weight once; FLOPs = 2·B·weights + 4·B·H·(T+1)·D per layer (QK^T and PV).

    (8, 1000) lies far outside the probe points (B <= 3, T <= 20): it checks the fitted shapes too.
    """
    attn = LAYERS * 4 * b * HEADS * (t + 1) * D
    for name, nodes in graphs.items():
        mm = _matmuls(nodes, b, t)
        assert sum(c.weight for c in mm) == 4 * LINEAR, name
        assert sum(c.flops for c in mm) == 2 * b * LINEAR + attn, name


def test_kernel_counts(graphs: dict[str, list[Node]]) -> None:
    """9 MatMul-type kernels per layer (7 projections, QK^T, PV) + the head; a merged pair has 12 fewer."""
    orig, lp = (totals(graph_costs(graphs[k], 1, 16)) for k in ("orig", "lp"))
    assert orig.matmuls == 9 * LAYERS + 1
    assert lp.matmuls == orig.matmuls - 12
    assert lp.nodes < orig.nodes and lp.gpu_kernels < orig.gpu_kernels
    split = layer_split(graphs["orig"], graph_costs(graphs["orig"], 1, 16))
    assert split.layers == LAYERS and split.interior_units_equal
    assert split.nodes_outside + LAYERS * split.nodes_per_layer == orig.nodes


@pytest.mark.parametrize(("b", "t"), [(1, 128), (8, 1000)])
def test_kv_cache_bytes(graphs: dict[str, list[Node]], b: int, t: int) -> None:
    """Each K/V write reads past [B, KVH, T, D] + new [B, KVH, 1, D], writes [B, KVH, T+1, D] (fp32); the
    merged pair writes one slot of 2·KVH heads instead of two: same bytes."""
    for name, nodes in graphs.items():
        costs = graph_costs(nodes, b, t)
        kv = [c for n, c in zip(nodes, costs, strict=True) if any(o.name.startswith("present.") for o in n.outputs)]
        assert sum(c.traffic for c in kv) == 2 * LAYERS * 2 * (b * KVH * (t + 1) * D * 4), name


def test_embedding_gather_reads_one_row_per_token(graphs: dict[str, list[Node]]) -> None:
    gathers = [c for c in graph_costs(graphs["orig"], 8, 64) if c.op == "Gather" and c.weight]
    assert [c.weight for c in gathers] == [8 * HIDDEN * 4]


def test_fit_dims_rejects_a_dimension_that_is_not_bilinear() -> None:
    good = {(1, 4): (1, 5), (1, 12): (1, 13), (2, 4): (2, 5), (2, 12): (2, 13), (3, 20): (3, 21)}
    assert fit_dims(good) == [(0, 1, 0, 0), (1, 0, 1, 0)]
    bad = {**good, (3, 20): (3, 22)}
    with pytest.raises(ValueError, match="not bilinear"):
        fit_dims(bad)


def test_step_time_roofline_by_hand() -> None:
    """max(bytes/bw, flops/peak) + launch per kernel; alias ops launch nothing on a GPU but cost a CPU node."""
    costs = [
        Cost("MatMul", 800, 200, 800, 1e3, True),
        Cost("Mul", 10, 10, 0, 5e6, True),
        Cost("Reshape", 0, 0, 0, 0.0, False),
    ]
    cpu = Device("c", 1e3, 1e6, "float32", 0.5, None, None, "test")
    assert step_time(costs, cpu) == pytest.approx((1.0 + 0.5) + (5.0 + 0.5) + 0.5)
    gpu = Device("g", 1e3, 1e6, "bfloat16", 0.5, 0.25, None, "test")
    assert step_time(costs, gpu) == pytest.approx((0.5 + 0.5) + (5.0 + 0.5))
    assert step_time(costs, gpu, cuda_graphs=True) == pytest.approx((0.5 + 0.25) + (5.0 + 0.25))


def test_node_units_count_k_cache_writes_upstream() -> None:
    def t(name: str) -> Tensor:
        return Tensor(name, 4, [(1, 0, 0, 0)])

    chain = [
        Node("Gather", "emb", [t("ids")], [t("h0")]),
        Node("Concat", "k0", [t("h0")], [t("present.0.key")]),
        Node("Add", "a0", [t("present.0.key"), t("h0")], [t("h1")]),
        Node("Concat", "k1", [t("h1")], [t("present.1.key")]),
        Node("MatMul", "head", [t("present.1.key")], [t("logits")]),
    ]
    assert node_units(chain) == [0, 1, 1, 2, 2]


def test_compare_uses_per_timing_predictions() -> None:
    def rnd(o: float, lp: float, po: float, plp: float) -> dict[str, object]:
        m = {"seconds_per_token": 0.0, "predicted": {"predicted_s": 0.0}}
        return {
            "predicted_common": {"original": po, "lp": plp},
            "models": {
                "original": {**m, "seconds_per_token": o, "predicted": {"predicted_s": po}},
                "lp": {**m, "seconds_per_token": lp, "predicted": {"predicted_s": plp}},
            },
        }

    res = compare([rnd(1.0, 1.0, 1.1, 1.0), rnd(2.0, 1.9, 2.0, 2.0), rnd(1.0, 0.9, 1.2, 1.2)])
    assert res["models"]["original"]["rel_error"] == pytest.approx(0.1)
    assert res["lp_over_original"]["measured"] == pytest.approx(0.95)
    assert res["lp_over_original"]["predicted"] == pytest.approx(1.0)
    assert not res["lp_over_original"]["within_tolerance"]
    assert res["all_within_tolerance"] is False
