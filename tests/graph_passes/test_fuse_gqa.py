"""FuseGroupQueryAttentionPass and ``to_ort`` (``--target ort``) on tiny exports of every family: fires on every
layer and every merged pair, leaves attention that is not the exporter's alone (and ``to_ort`` then fails), and
the fused graph computes what the unfused one does under ONNX Runtime (prefill, decode, chunked, padded batch)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from layerpair.exporter.onnx_export import save_model
from layerpair.exporter.validate import OrtRunner, TorchRunner, compare_runners, within_tolerance
from layerpair.graph_passes import GraphPassError, merge_pairs
from layerpair.graph_passes.fuse_gqa import FuseGroupQueryAttentionPass
from layerpair.graph_passes.ort_target import to_ort
from layerpair.iospec import IOSpec
from tests.conftest import ARCHS
from tests.graph_passes.conftest import PAIR, TinyExport

#: Fused vs unfused under ONNX Runtime: measured 1e-7..2e-6 on the tiny models (summation order in the kernels).
ATOL = 1e-5


def _ort(ex: TinyExport, merged: bool, rotary: str = "gqa") -> tuple[ir.Model, ir.Model, IOSpec, dict]:
    """(unfused, fused, spec, to_ort report): the tiny export, merged or not, then rewritten for ONNX Runtime; the
    spec is the fused graph's (``rotary_positions`` as the report says)."""
    pairs = [PAIR] if merged else []
    spec = IOSpec.for_model(ex.arch, pairs, merged=merged)
    unfused = ir.load(str(ex.path))
    if merged:
        unfused, _ = merge_pairs(unfused, ex.arch, pairs)
    fused = ir.load(str(ex.path))
    if merged:
        fused, _ = merge_pairs(fused, ex.arch, pairs)
    fused, report = to_ort(fused, spec, rotary)
    return unfused, fused, replace(spec, rotary_positions=report["rotary"]["positions"]), report


@pytest.mark.parametrize("rotary", ["gqa", "separate"])
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fires_on_every_layer_and_pair_and_matches_unfused(
    arch: str, merged: bool, rotary: str, tiny_pair_exports: dict[str, TinyExport], tmp_path: Path
) -> None:
    """Both rotary forms. ``gqa``: GroupQueryAttention reads packed QKV and rotates at cache index; its keys of
    left-padded rows are rotated otherwise by design, so the comparison skips those (and says how many)."""
    ex = tiny_pair_exports[arch]
    if rotary == "gqa" and arch == "qwen3":  # per-head q/k norm between the Split and the rotary: asked, refused
        with pytest.raises(GraphPassError, match=r"cannot take packed QKV.*drop --ort-rotary"):
            _ort(ex, merged, rotary)
        rotary = "auto"  # and the default falls back, saying why
    unfused, fused, spec, report = _ort(ex, merged, rotary)
    pairs = 1 if merged else 0
    assert report["attention_fused"] == {"layers": 4 - 2 * pairs, "pairs": pairs, "slots": 4 - pairs}
    assert report["packed_matmuls"] == 4 - 2 * pairs  # q/k/v of each single layer; gate/up stay apart
    assert report["gated_matmuls_unpacked"] == pairs  # a merged pair's gate/up: two MatMuls again
    assert not any(n.op_type == "Split" for n in fused.graph if "mlp" in str(n.name))
    in_gqa = len(spec.slots) if rotary == "gqa" else 0
    positions = "cache_index" if in_gqa else "position_ids"
    assert {k: v for k, v in report["rotary"].items() if k != "why_separate"} == {
        "mode": rotary, "positions": positions, "in_gqa": in_gqa}  # fmt: skip
    assert ("why_separate" in report["rotary"]) is (in_gqa == 0)
    ops = Counter((n.domain, n.op_type) for n in fused.graph)
    assert ops[("com.microsoft", "GroupQueryAttention")] == len(spec.slots)
    assert ops[("com.microsoft", "RotaryEmbedding")] == 2 * len(spec.slots) - 2 * in_gqa
    assert sum(n.attributes["do_rotary"].as_int() for n in fused.graph if n.op_type == "GroupQueryAttention") == in_gqa
    assert ops[("", "Softmax")] == 0 and report["nodes_after"] < report["nodes_before"]
    # residual Adds go into the norms after them (shapes re-inferred through the contrib ops): all 6 when merged;
    # unmerged, the pair's two branches (three-term residual sums) leave only 4 in the usual form
    assert ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] == (6 if merged else 4)
    skips = [n for n in fused.graph if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert all(not o.name for n in skips for o in n.outputs[1:3])  # unread statistics: not computed
    assert report["unread_norm_stats_dropped"] >= 2 * len(skips)
    assert report["lm_head_untied"] == (arch == "qwen3")  # the tiny Qwen3 ties its embeddings: a MatMul now
    assert [v.name for v in fused.graph.inputs] == spec.input_names
    assert [v.name for v in fused.graph.outputs] == spec.output_names
    path = tmp_path / "fused.onnx"
    save_model(fused, path, external_data=True)
    ours = OrtRunner(path, spec, threads=1)
    res = compare_runners(ours, spec, OrtRunner(unfused, spec, threads=1), spec)
    assert within_tolerance(res, ATOL) == []  # logits and every present, pad positions included
    assert res["padded"].positions > 0 and res["chunked"].positions > 0
    # gqa: the padded batch's second row (3 steps) and the chunk after a masked slot (1 step) keep other keys
    assert res["padded"].keys_not_compared == (3 if in_gqa else 0)
    assert res["chunked"].keys_not_compared == (1 if in_gqa else 0)
    res = compare_runners(ours, spec, TorchRunner(ex.dec), ex.dec.io)  # and the PyTorch pair-parallel model
    assert within_tolerance(res, 1e-4) == []


def _softmax(model: ir.Model, layer: int) -> ir.Node:
    return [n for n in model.graph if n.op_type == "Softmax"][layer]


def test_leaves_foreign_attention_alone_and_to_ort_fails(tiny_plain_export: TinyExport) -> None:
    """Layer 1's softmax over another axis is not the exporter's attention: that slot is rejected with the reason,
    the others fuse, and ``to_ort`` refuses the graph naming the slot."""
    ex = tiny_plain_export
    spec = IOSpec.for_model(ex.arch)
    model = ir.load(str(ex.path))
    _softmax(model, 1).attributes["axis"] = ir.AttrInt64("axis", 3)
    p = FuseGroupQueryAttentionPass(spec)
    p(model)
    assert p.fired == 3 and set(p.slot_outcomes) == {"0", "1", "2", "3"}
    assert "softmax is not over the last axis" in p.slot_outcomes["1"]
    model = ir.load(str(ex.path))
    _softmax(model, 1).attributes["axis"] = ir.AttrInt64("axis", 3)
    with pytest.raises(GraphPassError, match="slot 1: attention is not the exporter's"):
        to_ort(model, spec)


def test_does_not_fire_on_a_non_absorbing_mask_fill(tiny_plain_export: TinyExport) -> None:
    """A mask fill of -1e4 is not absorbing in fp32 (score + fill != fill): an additive bias would differ."""
    ex = tiny_plain_export
    model = ir.load(str(ex.path))
    where = next(n for n in model.graph if n.op_type == "Where" and n.inputs[2] is not None)
    fill = where.inputs[2]
    assert fill is not None and fill.const_value is not None
    fill.const_value = ir.tensor(np.array(-1e4, np.float32))
    p = FuseGroupQueryAttentionPass(IOSpec.for_model(ex.arch))
    p(model)
    assert p.fired == 0 and all("not absorbing" in why for why in p.slot_outcomes.values())


def test_target_ort_with_trt_is_an_input_error(tmp_path: Path) -> None:
    """Fails in the preflight, before torch is imported or anything is exported."""
    out = tmp_path / "out"
    code = (
        "import sys; from layerpair.cli import main; rc = main(sys.argv[1:]); print('torch:', 'torch' in sys.modules)"
    )
    code += "; sys.exit(rc)"
    for extra, msg in ((["--trt"], "cannot be combined with --trt"), (["--dtype", "fp16"], "fp32 only")):
        argv = ["smollm2-135m", "--pairs", "20:24", "--target", "ort", *extra, "-o", str(out)]
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --target ort") and msg in lines[0], r.stderr
        assert "torch: False" in r.stdout
        assert not out.exists()


def test_ort_rotary_without_target_ort_is_an_input_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from layerpair.cli import main

    out = tmp_path / "out"
    assert main(["smollm2-135m", "--pairs", "none", "--ort-rotary", "gqa", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --ort-rotary gqa only applies to --target ort — add --target ort, or drop --ort-rotary"]
    assert not out.exists()


@pytest.mark.parametrize("pairs", [["--pairs", "1-2"], ["--pairs", "none"], ["--pairs", "1-2", "--no-merge"]])
def test_cli_target_ort_exports_a_validated_fused_graph(
    pairs: list[str], tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """The whole job with --target ort: every slot fused, the written file validated against PyTorch, the report
    says how many layers and pairs were fused and which bound held."""
    import json

    import onnx

    from layerpair.cli import main
    from layerpair.graph_passes.ort_target import ORT_TARGET_ATOL

    out = tmp_path / "out"
    assert main([str(tiny_checkpoints["llama"]), *pairs, "--target", "ort", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    merged = "--no-merge" not in pairs and "1-2" in pairs
    assert report["target"] == "ort" and report.get("merged", False) is merged
    assert report["ort_target"]["attention_fused"] == {"layers": 2 if merged else 4, "pairs": int(merged),
                                                       "slots": 3 if merged else 4}  # fmt: skip
    rotary = report["ort_target"]["rotary"]  # the default: GroupQueryAttention rotates (cache-index positions)
    assert rotary == {"mode": "auto", "positions": "cache_index", "in_gqa": 3 if merged else 4}
    assert report["agreement"]["padded"]["keys_not_compared"] == 3
    assert report["tolerance"] == {"logits_max_abs": ORT_TARGET_ATOL, "present_max_abs": ORT_TARGET_ATOL}
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert [v.name for v in graph.input] == [t["name"] for t in report["io"]["inputs"]]
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.node) == (3 if merged else 4)
    for case in ("prefill", "decode", "chunked", "padded"):
        assert report["agreement"][case]["max_abs"] <= 1e-5  # tiny model: 1e-7-level


@pytest.mark.parametrize(("arch", "padding_only"), [("llama", True), ("mistral", False)])
def test_bias_is_padding_only_unless_a_window_needs_the_mask(
    arch: str, padding_only: bool, tiny_pair_exports: dict[str, TinyExport]
) -> None:
    """Without sliding windows the bias is the padding alone (causal=1 does the rest) and the exporter's causal chain
    is gone; the tiny Mistral's window (6) keeps the whole keep mask as the bias. Both match the unfused graph
    (``test_fires_on_every_layer_and_pair_and_matches_unfused``)."""
    _, fused, _, _ = _ort(tiny_pair_exports[arch], merged=True)
    ops = Counter(n.op_type for n in fused.graph)
    gqa = [n for n in fused.graph if n.op_type == "GroupQueryAttention"]
    biases = {id(n.inputs[10]) for n in gqa}
    assert len(biases) == 1  # one bias for every attention
    where = gqa[0].inputs[10].producer()
    assert where is not None and where.op_type == "Where"
    cond = where.inputs[0].producer()
    assert cond is not None and cond.op_type == ("Unsqueeze" if padding_only else "And")
    assert (ops["LessOrEqual"] == 0) is padding_only
