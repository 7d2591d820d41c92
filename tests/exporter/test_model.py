"""The reference decoder against transformers' own models, and the pair semantics against the equations."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from layerpair.arch import ArchSpec
from layerpair.exporter.model import Decoder
from tests.conftest import ARCHS, tiny_model


def _padded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_transformers_logits(arch: str) -> None:
    hf = tiny_model(arch)
    dec = Decoder.from_hf(hf, ArchSpec.from_hf_config(hf.config))
    ids, mask, pos = _padded_batch(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out = dec(ids, mask, pos, *dec.empty_past(2))[0]
    valid = mask.bool()
    assert (ref - out)[valid].abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_cache_steps_equal_full_forward(arch: str) -> None:
    """Prefill 7 tokens then decode 5 one by one through the returned cache == one forward over 12 tokens."""
    hf = tiny_model(arch)  # mistral: sliding window 6 < 12, so the window is exercised
    dec = Decoder.from_hf(hf, ArchSpec.from_hf_config(hf.config), pairs=[(1, 2)])
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(12)[None]
    with torch.no_grad():
        full = dec(ids, torch.ones(1, 12, dtype=torch.long), pos, *dec.empty_past(1))[0]
        out = dec(ids[:, :7], torch.ones(1, 7, dtype=torch.long), pos[:, :7], *dec.empty_past(1))
        logits = [out[0]]
        past = list(out[1:])
        for t in range(7, 12):
            out = dec(ids[:, t : t + 1], torch.ones(1, t + 1, dtype=torch.long), pos[:, t : t + 1], *past)
            logits.append(out[0])
            past = list(out[1:])
    assert (torch.cat(logits, 1) - full).abs().max().item() < 1e-5


def test_pair_semantics_by_hand() -> None:
    """Pair (1,2): h = x + A1(N1 x) + A2(N2 x); y = h + M1(P1 h) + M2(P2 h) — rebuilt from the layer modules."""
    hf = tiny_model("llama")
    arch = ArchSpec.from_hf_config(hf.config)
    lp = Decoder.from_hf(hf, arch, pairs=[(1, 2)])
    seq = Decoder.from_hf(hf, arch)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(1, 9, dtype=torch.long)
    pos = torch.arange(9)[None]
    captured: dict[str, torch.Tensor] = {}
    # Capture the pair's input x (= output of layer 0 block) from the sequential model via a hook on layer 1's norm.
    hook = seq.layers[1].input_layernorm.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    with torch.no_grad():
        seq(ids, mask, pos, *seq.empty_past(1))
    hook.remove()
    x = captured["x"]
    keep = torch.tril(torch.ones(9, 9, dtype=torch.bool))[None, None]
    cos, sin = lp._rotary(pos, x.dtype)
    empty = torch.zeros(1, arch.num_kv_heads, 0, arch.head_dim)
    with torch.no_grad():
        l1, l2 = lp.layers[1], lp.layers[2]
        h = x + l1.self_attn(l1.input_layernorm(x), cos, sin, empty, empty, keep)[0]
        h = h + l2.self_attn(l2.input_layernorm(x), cos, sin, empty, empty, keep)[0]
        y = h + l1.mlp(l1.post_attention_layernorm(h)) + l2.mlp(l2.post_attention_layernorm(h))
        # Finish the network sequentially from y: layer 3, final norm, tied/untied head.
        l3 = lp.layers[3]
        h3 = y + l3.self_attn(l3.input_layernorm(y), cos, sin, empty, empty, keep)[0]
        y3 = h3 + l3.mlp(l3.post_attention_layernorm(h3))
        logits = lp.norm(y3) @ lp.lm_head
        out = lp(ids, mask, pos, *lp.empty_past(1))
    assert (out[0] - logits).abs().max().item() < 1e-5
    # And it really is a different function from the sequential model.
    with torch.no_grad():
        assert (out[0] - seq(ids, mask, pos, *seq.empty_past(1))[0]).abs().max().item() > 1e-3
    # Each branch keeps its own cache slot, in original layer order: 4 layers -> 8 presents.
    assert len(out) == 1 + 2 * arch.num_layers


def test_decoder_resolves_mkl_vml_dispatch_first_on_real_single_elements(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a Decoder — even a meta-device skeleton — first calls every op ATen sends to MKL's VML, on one real
    CPU element (never split across threads), so no later multi-threaded first call can race MKL's dispatch
    (pytorch/pytorch#188792); once per process."""
    from layerpair.exporter import model

    arch = ArchSpec.from_hf_config(tiny_model("llama").config)
    seen: list[tuple[str, str, int, str]] = []

    def recorder(name: str) -> Any:
        real = getattr(torch, name)
        return lambda x: (seen.append((name, x.device.type, x.numel(), str(x.dtype))), real(x))[1]

    for name in model.VML_OPS:
        monkeypatch.setattr(torch, name, recorder(name))
    model.resolve_vml_dispatch.cache_clear()
    Decoder.skeleton(arch)
    Decoder.skeleton(arch)
    assert sorted(seen) == sorted((n, "cpu", 1, dt) for n in model.VML_OPS for dt in ("torch.float32", "torch.float64"))
    assert {"cos", "sin", "exp", "sqrt"} <= {n for n, *_ in seen}
