"""The acceptance runs on the embedded SmolLM2-135M-Instruct (loads the real GGUF; tens of seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from layerpair.exporter.model import Decoder
from layerpair.exporter.onnx_export import export_onnx
from layerpair.exporter.validate import OrtRunner, empty_past

pytestmark = pytest.mark.slow


def test_main_job_report(smollm2_lp_export: Path) -> None:
    report = json.loads((smollm2_lp_export / "report.json").read_text())
    assert report["architecture"] == "llama" and report["num_layers"] == 30
    assert report["pairs"] == [[20, 21], [22, 23]] and report["depth"] == 28
    for case in ("prefill", "decode", "padded"):
        a = report["agreement"][case]
        assert a["max_abs"] <= 1e-4, (case, a)
        assert a["top1"] == 1.0, (case, a)
    assert (smollm2_lp_export / "tokenizer").is_dir()


def test_gguf_fp32_cache_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second load of the embedded GGUF reads the cached fp32 copy: same architecture, bit-identical
    weights, same tokenizer (ids, chat template, EOS)."""
    from layerpair.evaluation.data import default_text
    from layerpair.exporter.loading import gguf_cache_dir, load_checkpoint, resolve_source

    monkeypatch.setenv("LAYERPAIR_CACHE_DIR", str(tmp_path))
    cache = gguf_cache_dir(resolve_source("smollm2-135m"))
    assert cache is not None and cache.parent.parent == tmp_path and not cache.exists()
    said: list[str] = []
    a = load_checkpoint("smollm2-135m", said.append, keep_model=True)
    assert (cache / "model.safetensors").is_file() and any("GGUF dequantised" in m for m in said)
    said.clear()
    b = load_checkpoint("smollm2-135m", said.append, keep_model=True)
    assert any("cached fp32 copy" in m for m in said), said
    assert a.arch == b.arch and a.kind == b.kind == "embedded"
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    text = default_text()[:20000]
    assert a.tokenizer(text)["input_ids"] == b.tokenizer(text)["input_ids"]
    assert (
        a.tokenizer.chat_template == b.tokenizer.chat_template and a.tokenizer.eos_token_id == b.tokenizer.eos_token_id
    )
    monkeypatch.setenv("LAYERPAIR_GGUF_CACHE", "0")
    assert gguf_cache_dir(resolve_source("smollm2-135m")) is None


def test_no_pairs_matches_transformers(smollm2_checkpoint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--pairs none: ONNX Runtime logits == transformers' own LlamaForCausalLM on SmolLM2 (RoPE base 100000)."""
    ck = smollm2_checkpoint
    assert ck.arch.rope.theta == 100000.0
    dec = Decoder.from_hf(ck.model, ck.arch)
    export_onnx(dec, tmp_path / "model.onnx")
    runner = OrtRunner(tmp_path / "model.onnx", dec.io)
    prompts = ["The capital of France is Paris, and the capital of Italy is", "Hello there, how are you today?"]
    enc = ck.tokenizer(prompts, return_tensors="np", padding=True, padding_side="left")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None).astype(np.int64)
    ours, _ = runner.step(ids, mask, pos, empty_past(dec.io, 2))
    with torch.no_grad():
        ref = ck.model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(pos)
        ).logits.numpy()
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1))[valid].all()
