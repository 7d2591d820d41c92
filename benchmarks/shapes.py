"""Model shapes for speed runs, built from ``ArchSpec`` directly (random weights: speed does not depend on them).

Shapes follow the public configs: SmolLM2-135M, Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B; ``tiny*`` are CI sizes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from layerpair.arch import ArchSpec, RopeSpec
from layerpair.exporter.model import Decoder
from layerpair.iospec import IOSpec

_LLAMA3_ROPE = RopeSpec(
    theta=500000.0,
    rope_type="llama3",
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)


def _llama(
    layers: int,
    hidden: int,
    inter: int,
    heads: int,
    kv: int,
    head_dim: int,
    vocab: int,
    tied: bool,
    rope: RopeSpec,
    eps: float = 1e-5,
) -> ArchSpec:
    return ArchSpec(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=inter,
        rms_norm_eps=eps,
        rope=rope,
        tie_word_embeddings=tied,
    )


SHAPES: dict[str, ArchSpec] = {
    "smollm2-135m": _llama(30, 576, 1536, 9, 3, 64, 49152, True, RopeSpec(theta=100000.0)),
    "llama-3.2-1b": _llama(16, 2048, 8192, 32, 8, 64, 128256, True, _LLAMA3_ROPE),
    "llama-3.2-3b": _llama(28, 3072, 8192, 24, 8, 128, 128256, True, _LLAMA3_ROPE),
    "llama-3.1-8b": _llama(32, 4096, 14336, 32, 8, 128, 128256, False, _LLAMA3_ROPE),
    # CI sizes: hidden 64, a handful of layers.
    "tiny": _llama(4, 64, 96, 4, 2, 16, 128, True, RopeSpec(theta=10000.0)),
    "tiny-6": _llama(6, 64, 96, 4, 2, 16, 128, True, RopeSpec(theta=10000.0)),
    "tiny-wide": _llama(4, 128, 192, 4, 2, 32, 256, False, RopeSpec(theta=10000.0)),
}


def pairs_ending_at(end: int, count: int) -> tuple[tuple[int, int], ...]:
    """``count`` adjacent pairs just below layer ``end`` (exclusive): (end-2k, end-2k+1), …, (end-2, end-1)."""
    start = end - 2 * count
    if start < 0:
        raise ValueError(f"{count} pairs do not fit below layer {end}")
    return tuple((i, i + 1) for i in range(start, end, 2))


def default_pairs(arch: ArchSpec, count: int) -> tuple[tuple[int, int], ...]:
    """Pairs in the upper middle of the stack (where the paper pairs), leaving the last 2 layers single.

    For SmolLM2 (30 layers) and 2 pairs this is (24,25),(26,27); the CLI default 20:24 has the same count,
    and position does not change speed.
    """
    return pairs_ending_at(arch.num_layers - 2, count)


def random_decoder(
    arch: ArchSpec, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> Decoder:
    """An unpaired ``Decoder`` with N(0, 0.02) projections and unit norms, allocated directly on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        dec = Decoder(arch, ())
    dec = dec.to(dtype)
    dec.inv_freq = dec.inv_freq.float()  # rotary stays fp32, as in Decoder.from_hf
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return dec.eval()


def with_pairs(dec: Decoder, pairs: Sequence[tuple[int, int]]) -> Decoder:
    """The same weights (shared, not copied) run with a different pair plan.

    Pairing only changes the execution plan (``blocks``); the unmerged cache layout is per layer either way.
    """
    new = copy.copy(dec)  # shallow: parameter storage is shared
    first = {a: b for a, b in pairs}
    second = set(first.values())
    n = dec.arch.num_layers
    object.__setattr__(new, "pairs", tuple(pairs))
    object.__setattr__(new, "io", IOSpec.for_model(dec.arch, tuple(pairs), merged=False))
    object.__setattr__(new, "blocks", [(i, first[i]) if i in first else (i,) for i in range(n) if i not in second])
    return new
