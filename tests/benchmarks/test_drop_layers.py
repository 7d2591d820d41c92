"""benchmarks.drop_layers: the control checkpoint holds exactly the kept layers (renumbered), loads as a shallower
model, and an index the model does not have is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from benchmarks.drop_layers import drop_layers
from tests.conftest import tiny_model


def test_drops_the_named_layers_and_keeps_the_others(tmp_path: Path) -> None:
    hf = tiny_model("llama")
    hf.save_pretrained(tmp_path / "src")
    depth = hf.config.num_hidden_layers
    assert drop_layers(tmp_path / "src", tmp_path / "dst", [1]) == depth - 1
    out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst", dtype=torch.float32)
    assert out.config.num_hidden_layers == depth - 1
    before, after = hf.state_dict(), out.state_dict()
    for new, old in enumerate(i for i in range(depth) if i != 1):
        for key in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(after[f"model.layers.{new}.{key}"], before[f"model.layers.{old}.{key}"])
    ids = torch.arange(6)[None]
    with torch.no_grad():
        assert not torch.allclose(out(ids).logits, hf(ids).logits)  # a layer really is gone


def test_refuses_a_layer_the_model_does_not_have(tmp_path: Path) -> None:
    hf = tiny_model("llama")
    hf.save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="cannot drop layers"):
        drop_layers(tmp_path / "src", tmp_path / "dst", [hf.config.num_hidden_layers])
    assert not (tmp_path / "dst").exists()
