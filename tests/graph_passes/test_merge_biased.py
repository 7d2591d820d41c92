"""Biased pairs merge fully: Llama ``attention_bias`` (q/k/v and o_proj biases), Llama ``mlp_bias`` (gate, up
and down biases) and Qwen2 (q/k/v biases), each built by transformers with random non-zero biases."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx_ir as ir
import pytest
import torch

from layerpair.arch import ArchSpec
from layerpair.exporter.model import Decoder
from layerpair.exporter.onnx_export import export_onnx, save_model
from layerpair.exporter.validate import OrtRunner, TorchRunner, compare_runners, within_tolerance
from layerpair.graph_passes import MATMULS_SAVED_PER_PAIR, merge_pairs
from layerpair.graph_passes.verify import wide_pair_problems
from layerpair.iospec import IOSpec
from tests.conftest import tiny_model
from tests.graph_passes.conftest import PAIR

ATOL = 1e-4
CASES = {
    "llama-attention_bias": ("llama", {"attention_bias": True}),
    "llama-mlp_bias": ("llama", {"mlp_bias": True}),
    "qwen2": ("qwen2", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_biased_pair_merges_and_matches_pytorch(case: str, tmp_path: Path) -> None:
    arch_name, overrides = CASES[case]
    hf = tiny_model(arch_name, **overrides)
    arch = ArchSpec.from_hf_config(hf.config)
    assert (arch.qkv_bias, arch.o_bias, arch.mlp_bias) == {
        "llama-attention_bias": (True, True, False),
        "llama-mlp_bias": (False, False, True),
        "qwen2": (True, False, False),
    }[case]
    _reference_matches_transformers(hf, arch)
    dec = Decoder.from_hf(hf, arch, [PAIR])
    path = tmp_path / "model.onnx"
    export_onnx(dec, path)
    model, report = merge_pairs(ir.load(str(path)), arch, [PAIR])
    assert wide_pair_problems(model.graph, arch, PAIR) == []
    assert report["pairs"]["1-2"]["wide"]
    assert report["matmuls_after"] == report["matmuls_before"] - MATMULS_SAVED_PER_PAIR
    assert report["passes"]["merge_reducing_matmuls"] == 2 and report["passes"]["merge_sibling_matmuls"] == 2
    _assert_one_bias_per_wide_projection(model, arch)
    summed = arch.hidden_size * (int(arch.o_bias) + int(arch.mlp_bias))  # ba + bb: one [h] bias per sum
    assert report["parameters"]["summed_biases"] == summed
    out = tmp_path / "merged.onnx"
    save_model(model, out, external_data=True)
    spec = IOSpec.for_model(arch, [PAIR], merged=True)
    res = compare_runners(OrtRunner(out, spec, threads=1), spec, TorchRunner(dec), dec.io)
    assert within_tolerance(res, ATOL) == []


def _reference_matches_transformers(hf: torch.nn.Module, arch: ArchSpec) -> None:
    """The PyTorch reference the merged graph is held to is transformers' own model on these biased configs."""
    dec = Decoder.from_hf(hf, arch)
    ids = torch.randint(0, arch.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    mask, pos = torch.ones_like(ids), torch.arange(10)[None]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out = dec(ids, mask, pos, *dec.empty_past(1))[0]
    assert (ref - out).abs().max().item() < 1e-5


def _assert_one_bias_per_wide_projection(model: ir.Model, arch: ArchSpec) -> None:
    """The pair's wide projections carry one bias each, of the wide width (q/k/v, gate/up) or ``h`` (o, down)."""
    h, i, q, kv = arch.hidden_size, arch.intermediate_size, arch.q_dim, arch.kv_dim
    bias_widths = Counter(
        v.const_value.shape[0]
        for n in model.graph
        if n.op_type == "Add"
        for v in n.inputs
        if v is not None and v.const_value is not None and len(v.const_value.shape) == 1 and v.name.startswith("lp_")
    )
    expected: Counter[int] = Counter()
    if arch.qkv_bias:
        expected[2 * (q + 2 * kv)] += 1
    if arch.o_bias:
        expected[h] += 1
    if arch.mlp_bias:
        expected[4 * i] += 1
        expected[h] += 1
    assert bias_widths == expected
