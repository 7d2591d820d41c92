"""Export memory stays bounded by the weights: a regression guard with a generous fixed bound, not a benchmark
(benchmarks/scale.py measures the real cost side by side with the genai builder)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as tf

from tests.conftest import run_cli

# Interpreter + torch + transformers + onnxruntime + onnx_ir + one transient tensor: the job peaked at 840 MB for
# 329 MB of fp32 weights (2026-12-02), i.e. ~510 MB on top of one copy of the weights. The bound leaves ~190 MB of
# slack, less than a second copy of the weights (what holding the PyTorch model next to an ONNX Runtime session
# costs); the old tracing exporter needed ~8x the weight bytes.
OVERHEAD_MB = 700
PER_WEIGHT_BYTE = 1.3


def test_export_peak_rss_is_bounded_by_the_weights(tmp_path: Path) -> None:
    """~86 M parameters (345 MB as fp32): the whole job (load, export, validate, merge, validate) must peak below
    OVERHEAD_MB + 1.3x the fp32 weight bytes, and report the peak of every stage."""
    cfg = tf.LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=6,
        num_attention_heads=12,
        num_key_value_heads=3,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt")
    weight_mb = 4 * sum(p.numel() for p in model.parameters()) / 2**20
    del model
    r = run_cli(str(tmp_path / "ckpt"), "--pairs", "2:4", "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    stages = {"load", "reference", "export", "validate", "merge", "validate_merged"}
    assert stages <= set(report["peak_rss_mb_by_stage"]) and stages <= set(report["timings_s"])
    assert report["peak_rss_mb"] <= OVERHEAD_MB + PER_WEIGHT_BYTE * weight_mb, (report["peak_rss_mb"], weight_mb)
