from __future__ import annotations

import math

import pytest
import transformers as tf

from layerpair.arch import ArchSpec, RopeSpec
from layerpair.errors import UnsupportedModelError
from tests.conftest import ARCHS, tiny_config


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_reads_every_family(arch: str) -> None:
    spec = ArchSpec.from_hf_config(tiny_config(arch))
    assert spec.model_type == arch
    assert spec.num_layers == 4 and spec.num_heads == 4 and spec.num_kv_heads == 2 and spec.num_groups == 2
    assert spec.qkv_bias == (arch == "qwen2")
    assert spec.qk_norm == (arch == "qwen3")
    assert spec.tie_word_embeddings == (arch == "qwen3")
    assert spec.sliding_windows == ((6,) * 4 if arch == "mistral" else ())


def test_parameter_count_matches_transformers() -> None:
    from tests.conftest import tiny_model

    for arch in ARCHS:
        model = tiny_model(arch)
        spec = ArchSpec.from_hf_config(model.config)
        assert spec.num_parameters() == sum(p.numel() for p in model.parameters()), arch


def test_rope_theta_comes_from_rope_parameters() -> None:
    # SmolLM2 uses base 100000; reading the legacy default (10000) was a real bug elsewhere.
    cfg = tf.LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    assert ArchSpec.from_hf_config(cfg).rope.theta == 100000.0


def test_llama3_inv_freq_by_hand() -> None:
    rope = RopeSpec(
        theta=10000.0,
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    inv = rope.inv_freq(8)
    base = [1.0 / 10000 ** (i / 8) for i in range(0, 8, 2)]
    # wavelengths 2π/f: 6.28 and 62.8 are < 64/4=16? 6.28 yes -> unchanged; 62.8 between 16 and 64 -> smoothed;
    # 628 and 6283 > 64 -> divided by 8.
    assert inv[0] == base[0]
    smooth = (64 / (2 * math.pi / base[1]) - 1) / (4 - 1)
    assert inv[1] == pytest.approx((1 - smooth) * base[1] / 8 + smooth * base[1])
    assert inv[2] == pytest.approx(base[2] / 8) and inv[3] == pytest.approx(base[3] / 8)


def test_unsupported_architecture_lists_supported() -> None:
    with pytest.raises(UnsupportedModelError) as e:
        ArchSpec.from_hf_config(tf.GPT2Config())
    msg = str(e.value)
    assert "gpt2" in msg and all(a in msg for a in ARCHS)


def test_unsupported_rope_type() -> None:
    cfg = tf.LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
    with pytest.raises(UnsupportedModelError, match="rope_type 'yarn'"):
        ArchSpec.from_hf_config(cfg)
