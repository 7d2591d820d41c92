"""merge_pairs end to end on tiny exports of every family, and on the SmolLM2 20:24 export (slow)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

from layerpair.exporter.onnx_export import save_model
from layerpair.exporter.validate import OrtRunner, TorchRunner, compare_runners, within_tolerance
from layerpair.graph_passes import (
    MATMULS_SAVED_PER_PAIR,
    GraphPassError,
    MergeAttentionPass,
    merge_pairs,
    pair_passes,
)
from layerpair.graph_passes.merge import run_passes
from layerpair.graph_passes.merge_attention import match_attention
from layerpair.iospec import IOSpec
from tests.conftest import ARCHS
from tests.graph_passes.conftest import PAIR, TinyExport

ATOL = 1e-4


def _merged(ex: TinyExport, tmp_path: Path) -> tuple[ir.Model, dict, Path]:
    model, report = merge_pairs(ir.load(str(ex.path)), ex.arch, [PAIR])
    out = tmp_path / "merged.onnx"
    save_model(model, out, external_data=True)
    return model, report, out


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_matches_unmerged_and_pytorch(
    arch: str, tiny_pair_exports: dict[str, TinyExport], tmp_path: Path
) -> None:
    ex = tiny_pair_exports[arch]
    model, report, out = _merged(ex, tmp_path)
    onnx.checker.check_model(str(out), full_check=True)
    spec = IOSpec.for_model(ex.arch, [PAIR], merged=True)
    assert [v.name for v in model.graph.inputs] == spec.input_names
    assert [v.name for v in model.graph.outputs] == spec.output_names
    merged = OrtRunner(out, spec, threads=1)
    for ref, ref_spec in ((OrtRunner(ex.path, ex.dec.io, threads=1), ex.dec.io), (TorchRunner(ex.dec), ex.dec.io)):
        res = compare_runners(merged, spec, ref, ref_spec)
        assert within_tolerance(res, ATOL) == []
        assert all(a.top1 == 1.0 for a in res.values())
    assert report["parameters"]["equal"]
    assert report["parameters"]["folded_norm_scales"] == 4 * ex.arch.hidden_size  # 2 branches x 2 norms
    assert report["rejections"] == {name: [] for name in report["passes"]}  # every candidate merged


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_pair_is_one_wide_layer(arch: str, tiny_pair_exports: dict[str, TinyExport], tmp_path: Path) -> None:
    """Op counts: the pair is one norm, one QKV MatMul, one attention, one o_proj, one norm, one gate/up, one
    down; the two single layers and the head are unchanged."""
    ex = tiny_pair_exports[arch]
    a = ex.arch
    before = Counter(n.op_type for n in ir.load(str(ex.path)).graph)
    model, report, _ = _merged(ex, tmp_path)
    after = Counter(n.op_type for n in model.graph)
    # 9 per layer + the head; a tied head is a Gemm reading the embedding table (no transposed copy)
    assert report["matmuls_before"] == before["MatMul"] == 36 + (0 if a.tie_word_embeddings else 1)
    assert after["MatMul"] == before["MatMul"] - MATMULS_SAVED_PER_PAIR == report["matmuls_after"]
    norms_per_layer = 4 if a.qk_norm else 2
    # whole graph = 2 single layers + the pair + the final norm
    assert after["ReduceMean"] == 2 * norms_per_layer + norms_per_layer + 1
    assert after["Softmax"] == 3 and after["Neg"] == 2 * 2 + 2  # rotary once on the wide q and k
    assert after["Sigmoid"] == 3  # one SwiGLU over the pair's concatenated gate and up (merge_gated_mlp)
    h, i, q, kv = a.hidden_size, a.intermediate_size, a.q_dim, a.kv_dim
    weights = Counter(
        tuple(n.inputs[1].const_value.shape)
        for n in model.graph
        if n.op_type == "MatMul" and n.inputs[1].const_value is not None
    )
    assert weights[(h, 2 * (q + 2 * kv))] == 1  # QKV of both branches
    assert weights[(2 * q, h)] == 1  # o_proj of both branches
    assert weights[(h, 4 * i)] == 1  # gate/up of both branches
    assert weights[(2 * i, h)] == 1  # down of both branches
    assert report["passes"] == {
        "share_rmsnorm": 2,  # the exporter writes each branch's norm of the shared input; now one per sub-layer
        "fold_norm_scales": 4,
        "merge_attention": 1,
        "merge_reducing_matmuls": 2,
        "merge_gated_mlp": 1,
        "merge_sibling_matmuls": 2,
        "cleanup": report["passes"]["cleanup"],
    }


def test_plain_model_passes_through_unchanged(tiny_plain_export: TinyExport) -> None:
    ex = tiny_plain_export
    model = ir.load(str(ex.path))
    ops = [n.op_type for n in model.graph]
    for p in pair_passes(ex.arch, [], cleanup=False):  # every rewrite, run on purpose
        p(model)
        assert p.fired == 0, p.name
    assert [n.op_type for n in model.graph] == ops
    merged, report = merge_pairs(ir.load(str(ex.path)), ex.arch, [])
    assert not any(report["passes"].values()) and report["nodes_after"] == report["nodes_before"]
    assert [n.op_type for n in merged.graph] == ops


def test_merge_attention_must_not_fire_on_sequential_layers(tiny_plain_export: TinyExport) -> None:
    """Layers 1 and 2 of an unpaired model look alike but 2 reads 1's output: merging would make a cycle."""
    ex = tiny_plain_export
    model = ir.load(str(ex.path))
    p = MergeAttentionPass(ex.arch, [PAIR])
    p(model)
    assert p.fired == 0
    with pytest.raises(GraphPassError, match="--no-merge"):
        merge_pairs(ir.load(str(ex.path)), ex.arch, [PAIR])


def test_merge_attention_must_not_fire_on_different_scales(tiny_pair_exports: dict[str, TinyExport]) -> None:
    ex = tiny_pair_exports["llama"]
    model = ir.load(str(ex.path))
    g = model.graph
    ins, outs = {v.name: v for v in g.inputs}, {v.name: v for v in g.outputs}
    b = PAIR[1]
    att = match_attention(
        ins[f"past_key_values.{b}.key"],
        ins[f"past_key_values.{b}.value"],
        outs[f"present.{b}.key"],
        outs[f"present.{b}.value"],
    )
    assert att is not None
    mul = next(u.node for u in att.scale.uses() if u.node.op_type == "Mul" and _feeds_layer(u.node, att.ctx))
    other = ir.Value(name="other_scale", type=att.scale.type, shape=att.scale.shape)
    other.const_value = ir.tensor(att.scale.const_value.numpy() * 0.5)
    g.register_initializer(other)
    mul.replace_input_with(list(mul.inputs).index(att.scale), other)
    p = MergeAttentionPass(ex.arch, [PAIR])
    p(model)
    assert p.fired == 0
    why = p.pair_outcomes[PAIR]  # check's reason, recorded per pair and among the pass's rejections
    assert why.startswith("the branches differ: different attention scale"), why
    assert p.rejections == [f"pair {PAIR[0]}-{PAIR[1]}: {why}"]


def _feeds_layer(n: ir.Node, ctx: ir.Value) -> bool:
    """True if ``ctx`` is downstream of ``n`` (walks a few nodes)."""
    frontier = [n]
    for _ in range(8):
        nxt = []
        for m in frontier:
            for o in m.outputs:
                if o is ctx:
                    return True
                nxt += [u.node for u in o.uses()]
        frontier = nxt
    return False


def test_fp16_graph_merges_with_its_fp32_islands(tiny_pair_exports: dict[str, TinyExport], tmp_path: Path) -> None:
    """--dtype float16: norms and softmax run in fp32 between Casts; the merged pair keeps those islands."""
    from layerpair.exporter.onnx_export import export_onnx
    from layerpair.exporter.precision import typed_decoder

    ex = tiny_pair_exports["qwen3"]  # q/k norms: the most casts
    path16 = tmp_path / "fp16.onnx"
    export_onnx(typed_decoder(ex.dec, "float16"), path16)
    model, report = merge_pairs(ir.load(str(path16)), ex.arch, [PAIR])
    assert report["matmuls_after"] == report["matmuls_before"] - MATMULS_SAVED_PER_PAIR
    assert all(n.inputs[0].dtype == ir.DataType.FLOAT for n in model.graph if n.op_type in ("Softmax", "ReduceMean"))
    out = tmp_path / "fp16_merged.onnx"
    save_model(model, out, external_data=True)
    spec = IOSpec.for_model(ex.arch, [PAIR], merged=True, dtype="float16")
    uspec = IOSpec.for_model(ex.arch, [PAIR], merged=False, dtype="float16")
    res = compare_runners(OrtRunner(out, spec, threads=1), spec, OrtRunner(path16, uspec, threads=1), uspec)
    for a in res.values():  # fp16 rounding of the folded weights: normwise, as exporter/precision.py states it
        assert a.max_rel <= 2e-2 and a.top1 == 1.0


@pytest.mark.slow
def test_smollm2_20_24_merged_export(smollm2_lp_export: Path) -> None:
    """The acceptance run: ``layerpair-export smollm2-135m --pairs 20:24`` merges by default."""
    report = json.loads((smollm2_lp_export / "report.json").read_text())
    assert report["merged"] is True
    assert report["passes"]["merge_attention"] == 2
    assert report["matmuls_after"] == report["matmuls_before"] - 2 * MATMULS_SAVED_PER_PAIR
    assert report["parameters_check"]["equal"]
    for case in ("prefill", "decode", "padded"):
        for key in ("agreement", "agreement_unmerged"):
            a = report[key][case]
            assert a["max_abs"] <= ATOL and a["present_max_abs"] <= ATOL and a["top1"] == 1.0
    names = [s["layers"] for s in report["io"]["cache_slots"]]
    assert [20, 21] in names and [22, 23] in names and [20] not in names
    model = onnx.load(str(smollm2_lp_export / "model.onnx"), load_external_data=False)
    assert [v.name for v in model.graph.input] == [t["name"] for t in report["io"]["inputs"]]
    assert "past_key_values.20_21.key" in {v.name for v in model.graph.input}


def test_ort_target_fuses_and_keeps_function(tiny_pair_exports: dict[str, TinyExport], tmp_path: Path) -> None:
    from layerpair.graph_passes.ort_target import OrtFusionPass

    ex = tiny_pair_exports["llama"]
    model, _, merged_path = _merged(ex, tmp_path)
    p = OrtFusionPass()
    p(model)
    ops = Counter(n.op_type for n in model.graph)
    assert p.fusions.get("rms_normalization", 0) > 0 and ops["SimplifiedLayerNormalization"] > 0
    assert ops["ReduceMean"] < 7
    out = tmp_path / "ort.onnx"
    save_model(model, out, external_data=True)
    spec = IOSpec.for_model(ex.arch, [PAIR], merged=True)
    res = compare_runners(OrtRunner(out, spec, threads=1), spec, OrtRunner(merged_path, spec, threads=1), spec)
    assert within_tolerance(res, ATOL) == []


def test_the_driver_runs_every_pass_through_one_protocol(tiny_pair_exports: dict[str, TinyExport]) -> None:
    """``run_passes``: no special case by type — a pass that ``needs_rewrites`` (cleanup) is skipped when nothing
    fired before it, and each pass reports ``fired``, ``rejections`` and ``removed_parameters`` alike."""
    ex = tiny_pair_exports["llama"]
    passes = pair_passes(ex.arch, [PAIR])
    assert [p.needs_rewrites for p in passes] == [False] * (len(passes) - 1) + [True]
    fired, seconds = run_passes(ir.load(str(ex.path)), passes[-1:])  # cleanup alone: nothing merged before it
    assert fired == {} and seconds == {}
    fired, _ = run_passes(ir.load(str(ex.path)), passes)
    assert fired["merge_attention"] == 1 and fired["cleanup"] > 0
    assert all(p.rejections == [] for p in passes)
    removed = {k: n for p in passes for k, n in p.removed_parameters.items()}
    assert removed["folded_norm_scales"] == 4 * ex.arch.hidden_size and removed["summed_biases"] == 0
