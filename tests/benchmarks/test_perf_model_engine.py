"""benchmarks.perf_model.engine: the GPU kernel list read from a TensorRT engine of a tiny real export.

Tiny Llama (tests.conftest.tiny_config, see test_perf_model.py for its shapes), original (4 layers) and LP with
pair 1-2 merged (depth 3), exported with ``--trt`` (TensorRT-RTX 1.7, built ahead of time on the CPU).

Hand count of the engine's decode profile (TensorRT-RTX 1.7.1 compiles the whole graph with Myelin):

* per layer 6 GEMM kernels: fused q/k/v projection, QK^T, PV, o projection, fused gate/up, down;
* per layer 10 fused elementwise / data-movement kernels: RoPE + K-cache concat, RoPE of Q (in layer 0 the
  embedding gather + first RMSNorm kernel takes its place), masked softmax, V-cache concat, three GQA
  head-replication copies (MoveReplConc: K for QK^T, probabilities and V for PV), residual + RMSNorm after
  attention, SiLU x up, residual + RMSNorm after the MLP;
* outside the layers: the LM head GEMM and one host-to-device shape copy (and a host-side shape program that
  launches nothing).

So kernels = 16 * depth + 2 and GEMMs = 6 * depth + 1: 66 and 25 for the original, 50 and 19 for the LP
export (ONNX Runtime's optimized graph: 211 and 164 GPU kernels). No timing is asserted anywhere.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import onnx
import pytest

from benchmarks.perf_model.costs import totals
from benchmarks.perf_model.engine import (
    GEMM_LAYER_TYPES,
    SOURCE_BUILD_REPORT,
    SOURCE_INSPECTOR,
    EngineCosts,
    EngineKernels,
    engine_kernels,
    inspect_plan,
    parse_build_report,
    parse_inspector_json,
    rebuild_layer_report,
)
from benchmarks.perf_model.graph import load_graph
from tests.benchmarks.test_perf_model import HEADS, LAYERS, LINEAR, D
from tests.conftest import tiny_model

HAVE_RTX = importlib.util.find_spec("tensorrt_rtx") is not None and importlib.util.find_spec("polygraphy") is not None
needs_rtx = pytest.mark.skipif(
    not HAVE_RTX, reason="TensorRT-RTX not installed: pip install 'tensorrt-rtx-cu13==1.7.1.116' 'polygraphy==0.53.6'"
)
DEPTH = {"orig": LAYERS, "lp": LAYERS - 1}
KERNELS_PER_LAYER, GEMMS_PER_LAYER = 16, 6


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Original and LP exports of the tiny Llama with ``--trt`` (model.plan next to model.onnx)."""
    if not HAVE_RTX:
        pytest.skip("TensorRT-RTX not installed")
    from layerpair.cli import main

    root = tmp_path_factory.mktemp("perf_model_engine")
    tiny_model("llama").save_pretrained(root / "ckpt")
    out = {}
    for name, pairs in (("orig", "none"), ("lp", "1-2")):
        argv = [str(root / "ckpt"), "--pairs", pairs, "-o", str(root / name), "--trt", "--trt-backend"]
        argv += ["tensorrt-rtx", "--max-batch", "8", "--max-seq", "16", "--max-context", "256"]
        assert main(argv) == 0
        assert (root / name / "model.plan").exists()
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def build_reports(exports: dict[str, Path]) -> dict[str, tuple[EngineKernels, dict[str, object]]]:
    out = {}
    for name, d in exports.items():
        report = json.loads((d / "report.json").read_text())
        layers, facts = rebuild_layer_report(d, report)
        out[name] = (EngineKernels(SOURCE_BUILD_REPORT, str(d / "model.plan"), layers, 0), facts)
    return out


def _engine_costs(d: Path, kernels: EngineKernels) -> EngineCosts:
    nodes = load_graph(d / "model.onnx", threads=1)
    outs = [o.name for o in onnx.load(str(d / "model.onnx"), load_external_data=False).graph.output]
    return EngineCosts(kernels, nodes, outs)


@needs_rtx
def test_builder_layer_report_kernel_counts_match_hand_counts(
    build_reports: dict[str, tuple[EngineKernels, dict[str, object]]],
) -> None:
    for name, (k, facts) in build_reports.items():
        c = k.counts()
        assert c["kernels"] == KERNELS_PER_LAYER * DEPTH[name] + 2, (name, c)
        assert c["gemm"] == GEMMS_PER_LAYER * DEPTH[name] + 1, (name, c)
        assert c["layers"] == c["kernels"] + 1  # the host-side shape program
        assert facts["same_size_as_plan"], facts  # the rebuild is the export's engine up to build IDs
    drop = build_reports["orig"][0].counts()["kernels"] - build_reports["lp"][0].counts()["kernels"]
    assert drop == KERNELS_PER_LAYER  # a merged pair runs one layer's kernels


@needs_rtx
def test_engine_layers_cost_every_weight_once_and_the_gemm_flops(
    exports: dict[str, Path], build_reports: dict[str, tuple[EngineKernels, dict[str, object]]]
) -> None:
    """The GEMM kernels read every linear weight once and do 2*B*weights + 4*B*H*(T+1)*D FLOPs per layer."""
    for name, d in exports.items():
        ec = _engine_costs(d, build_reports[name][0])
        assert not ec.unknown
        for b, t in ((1, 128), (8, 1000)):
            costs = ec.costs(b, t)
            gemm = [c for c in costs if c.op in GEMM_LAYER_TYPES]
            assert sum(c.weight for c in gemm) == 4 * LINEAR, name
            assert sum(c.flops for c in gemm) == 2 * b * LINEAR + LAYERS * 4 * b * HEADS * (t + 1) * D, name
            assert totals(costs).gpu_kernels == build_reports[name][0].counts()["kernels"]
        # What no engine layer names is shape and layout plumbing (a [B, H, 1, D] transpose is a reshape at
        # S = 1; Sub on two Shapes is the host-side past length): under 1 % of the bytes, and reported.
        cov = ec.coverage(1, 128)
        assert set(cov["their_ops"]) <= {"Reshape", "Shape", "Squeeze", "Unsqueeze", "Transpose", "Sub"}, cov
        assert cov["their_bytes_as_separate_nodes"] < 0.01 * totals(ec.costs(1, 128)).traffic, cov


@needs_rtx
def test_engine_kernels_says_inspection_not_run_without_a_gpu(exports: dict[str, Path]) -> None:
    from layerpair.engine.build import gpu_status

    usable, why = gpu_status()
    if usable:
        pytest.skip("a GPU is present: the inspector path is tested by test_engine_inspector_counts")
    said: list[str] = []
    k = engine_kernels(exports["lp"], said.append)
    assert k is not None and k.source == SOURCE_BUILD_REPORT
    assert k.inspection == {"ran": False, "reason": why, "rebuild": k.inspection["rebuild"]}
    assert any(m.endswith(f"engine inspection NOT run: {why}") for m in said)
    assert k.counts()["kernels"] == KERNELS_PER_LAYER * DEPTH["lp"] + 2
    assert "engine inspection NOT run" in k.to_json()["notes"][0]


@needs_rtx
def test_engine_inspector_counts(exports: dict[str, Path]) -> None:
    """model.plan itself through TensorRT's engine inspector: needs a GPU the backend can deserialize on."""
    for name, d in exports.items():
        layers, why = inspect_plan(d / "model.plan", "tensorrt-rtx")
        if layers is None:
            pytest.skip(f"engine inspection NOT run: {why}")
        k = EngineKernels(SOURCE_INSPECTOR, str(d / "model.plan"), layers, 0)
        assert k.counts()["kernels"] == KERNELS_PER_LAYER * DEPTH[name] + 2, name
        assert k.counts()["gemm"] == GEMMS_PER_LAYER * DEPTH[name] + 1, name


def test_engine_kernels_is_none_without_a_plan(tmp_path: Path) -> None:
    assert engine_kernels(tmp_path) is None


def test_parse_build_report_assigns_profiles_in_order() -> None:
    """Profile 1's layers follow profile 0's; only some of them carry the '[profile 1]' mark."""
    text = "\n".join(
        [
            "Layers:",
            "Name: [ShapeHostToDeviceCopy 0], LayerType: ShapeHostToDevice, Inputs: [], StreamId: 0, Metadata: ",
            "Name: /a/MatMul_1_U2+/a/MatMul_2_U3_myl1_1, LayerType: gemm, Inputs: [ { Name: x, Dimensions: [-1,64] }"
            "], TacticName: t, StreamId: 0, Metadata: [ONNX Layer: /a/MatMul_1][ONNX Layer: /a/MatMul_2]",
            "Name: __mye1_0_myl1_0, LayerType: shape_call, Inputs: [], Metadata: ",
            "Name: [ShapeHostToDeviceCopy 0] [profile 1], LayerType: ShapeHostToDevice, Inputs: [], Metadata: ",
            "Name: __myl_Add_myl3_1, LayerType: kgen, Inputs: [ { Name: x [profile 1] } ], "
            "Metadata: [ONNX Layer: /a/Add]",
            "Name: __myl_Tran_myl3_2, LayerType: kgen, Inputs: [ { Name: y } ], Metadata: [ONNX Layer: /a/Transpose]",
            "",
            "I/O Tensors:",
        ]
    )
    layers = parse_build_report(text)
    assert [(x.type, x.profile) for x in layers] == [
        ("ShapeHostToDevice", 0),
        ("gemm", 0),
        ("shape_call", 0),
        ("ShapeHostToDevice", 1),
        ("kgen", 1),
        ("kgen", 1),
    ]
    assert layers[1].onnx_nodes == ("/a/MatMul_1", "/a/MatMul_2")
    k = EngineKernels(SOURCE_BUILD_REPORT, None, layers, 0)
    assert k.counts() == {
        "layers": 3,
        "kernels": 2,
        "gemm": 1,
        "by_type": {"ShapeHostToDevice": 1, "gemm": 1, "shape_call": 1},
        "without_onnx_nodes": 2,
    }


def test_parse_inspector_json() -> None:
    """The engine inspector's JSON (ProfilingVerbosity.DETAILED: dicts; LAYER_NAMES_ONLY: names)."""
    info = {
        "Layers": [
            {"Name": "/a/MatMul_1_myl1_1", "LayerType": "gemm", "Metadata": "[ONNX Layer: /a/MatMul_1]"},
            {"Name": "k [profile 1]", "LayerType": "kgen", "Inputs": [], "Metadata": "[ONNX Layer: /a/Add]"},
            "names_only_layer",
        ],
        "Bindings": ["input_ids"],
    }
    layers = parse_inspector_json(json.dumps(info))
    assert [(x.name, x.type, x.profile, x.onnx_nodes) for x in layers] == [
        ("/a/MatMul_1_myl1_1", "gemm", 0, ("/a/MatMul_1",)),
        ("k [profile 1]", "kgen", 1, ("/a/Add",)),
        ("names_only_layer", "unknown", 1, ()),
    ]


@needs_rtx
def test_perf_model_takes_gpu_kernels_from_the_engine(exports: dict[str, Path], tmp_path: Path) -> None:
    """``python -m benchmarks.perf_model``'s kernel lists: the engine's where model.plan exists, with its source
    recorded; ``--kernels ort`` keeps ONNX Runtime's graph. Predictions only: nothing is timed."""
    import argparse

    from benchmarks.perf_model.__main__ import gpu_kernel_lists
    from benchmarks.perf_model.graph import optimized_model
    from benchmarks.perf_model.sweeps import single_gpu

    models = {}
    for name, key in (("original", "orig"), ("lp", "lp")):
        onnx_path = exports[key] / "model.onnx"
        opt = optimized_model(onnx_path, tmp_path / f"opt-{key}.onnx", threads=1)
        models[name] = (onnx_path, {}, load_graph(opt, threads=1))
    a = argparse.Namespace(orig=exports["orig"], lp=exports["lp"], threads=1, kernels="auto")
    fns, info = gpu_kernel_lists(a, models, lambda msg: None)
    for name, key in (("original", "orig"), ("lp", "lp")):
        assert info[name]["source"] in (SOURCE_BUILD_REPORT, SOURCE_INSPECTOR)
        assert info[name]["counts"]["kernels"] == KERNELS_PER_LAYER * DEPTH[key] + 2
        assert info[name]["engine_totals_at_readme_context"]["gpu_kernels"] == info[name]["counts"]["kernels"]
        assert info[name]["ort_counts_at_readme_context"]["gpu_kernels"] > info[name]["counts"]["kernels"]
    rows = single_gpu(fns["original"], fns["lp"], LAYERS, 1)
    assert all(r["ratio"] > 1 for r in rows)  # 16 fewer kernels and the same bytes: faster on every device
    a.kernels = "ort"
    _, info = gpu_kernel_lists(a, models, lambda msg: None)
    assert {v["source"] for v in info.values()} == {"onnxruntime-optimized-graph"}
