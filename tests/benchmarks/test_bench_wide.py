"""WideDecoder (the merged-equivalent PyTorch module the benchmarks time) computes the same function as the
reference pair-parallel Decoder: dynamic cache in the merged I/O layout, and static-cache decode."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ lives at the repo root
shapes: Any = importlib.import_module("benchmarks.shapes")
wide: Any = importlib.import_module("benchmarks.wide")

from layerpair.exporter.validate import TorchRunner, compare_runners  # noqa: E402

ATOL = 1e-5


def _arch(kind: str) -> Any:
    base = shapes.SHAPES["tiny-6"]
    if kind == "llama":
        return base
    if kind == "qwen2":
        return dataclasses.replace(base, model_type="qwen2", qkv_bias=True)
    if kind == "qwen3":
        return dataclasses.replace(base, model_type="qwen3", qk_norm=True, qkv_bias=True, o_bias=True)
    if kind == "mlp_bias":
        return dataclasses.replace(base, mlp_bias=True)
    raise ValueError(kind)


def _decoder(arch: Any) -> Any:
    dec = shapes.random_decoder(arch, seed=3)
    with torch.no_grad():
        for name, p in dec.named_parameters():  # non-unit norms: the scale folding must be exercised
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return dec


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mlp_bias"])
@pytest.mark.parametrize("pairs", [(), ((1, 2),), ((1, 2), (3, 4))])
def test_wide_matches_decoder(kind: str, pairs: tuple[tuple[int, int], ...]) -> None:
    dec = _decoder(_arch(kind))
    ref = shapes.with_pairs(dec, pairs)
    merged = wide.WideDecoder(dec, pairs)
    assert [s.layers for s in merged.io.slots] == [b for b in ref.blocks]
    res = compare_runners(TorchRunner(merged), merged.io, TorchRunner(ref), ref.io)
    for name, a in res.items():
        assert a.max_abs <= ATOL, (name, a)
        assert a.present_max_abs <= ATOL, (name, a)
        assert a.top1 == 1.0, (name, a)


def test_with_pairs_shares_weights_and_changes_only_the_plan() -> None:
    dec = _decoder(_arch("llama"))
    lp = shapes.with_pairs(dec, ((1, 2),))
    assert lp.embed_tokens is dec.embed_tokens
    assert dec.blocks == [(i,) for i in range(6)] and lp.blocks == [(0,), (1, 2), (3,), (4,), (5,)]
    ids = torch.randint(0, 128, (1, 5))
    mask, pos = torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None]
    with torch.no_grad():
        a = dec(ids, mask, pos, *dec.empty_past(1))[0]
        b = lp(ids, mask, pos, *lp.empty_past(1))[0]
    assert not torch.allclose(a, b)  # pairing really changes the function


def test_static_decode_matches_growing_cache() -> None:
    gpu: Any = importlib.import_module("benchmarks.gpu")
    eq = gpu.equivalence("cpu")
    for key in ("dynamic_max_abs", "dynamic_present_max_abs", "prefill_max_abs", "static_decode_max_abs"):
        assert eq[key] <= ATOL, (key, eq)


def test_shared_blocks_are_not_copied() -> None:
    dec = _decoder(_arch("llama"))
    base, merged = wide.wide_pair(dec, ((1, 2),))
    assert merged.blocks[0] is base.blocks[0] and merged.blocks[2] is base.blocks[3]
    assert merged.blocks[1].n == 2 and merged.blocks[1].kv_heads == 2 * dec.arch.num_kv_heads


def test_default_pairs_and_limit() -> None:
    common: Any = importlib.import_module("benchmarks.common")
    arch = shapes.SHAPES["smollm2-135m"]
    assert shapes.default_pairs(arch, 2) == ((24, 25), (26, 27))
    assert common.latency_limit(30, 2) == pytest.approx(30 / 28)
    with pytest.raises(ValueError):
        shapes.default_pairs(shapes.SHAPES["tiny"], 2)
