"""The reference Decoder run block by block over whole windows (no cache), with the pair plan as an argument.

One set of weights serves every pair set: the search evaluates hundreds of candidate plans without building
a Decoder for each, and resumes from cached hidden states at the first block a candidate changes. The ops
are the Decoder's own (its layer modules, norms, masks and rotary), so ``logits_from_ids(dec, ids, pairs)``
equals ``Decoder(arch, pairs)(ids, ...)`` — tests/evaluation/test_forward.py checks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from layerpair.exporter.model import Decoder, Layer

Pairs = tuple[tuple[int, int], ...]


def blocks_from_pairs(num_layers: int, pairs: Sequence[tuple[int, int]]) -> list[tuple[int, ...]]:
    """Execution plan, as Decoder builds it: singles and pairs in layer order."""
    first = {a: b for a, b in pairs}
    second = set(first.values())
    return [(i, first[i]) if i in first else (i,) for i in range(num_layers) if i not in second]


@dataclass
class WindowContext:
    """Masks and rotary for a batch of full windows starting at position 0, empty cache."""

    cos: Tensor  # [B,1,W,D]
    sin: Tensor
    keep: dict[int | None, Tensor]  # window -> [B,1,W,W]


def window_context(dec: Decoder, B: int, W: int) -> WindowContext:
    dtype = dec.embed_tokens.dtype
    mask = torch.ones(B, W, dtype=torch.long)
    pos = torch.arange(W).expand(B, W)
    cos, sin = dec._rotary(pos, dtype)
    return WindowContext(cos, sin, dec._keep_masks(mask, W))


def attn_ctx(layer: Layer, xn: Tensor, c: WindowContext, arch_window: int | None) -> Tensor:
    """The attention output *before* o_proj (and its bias): [B,W,H*D]. Used by healing as LS features.

    Same math as ``Attention.forward`` on an empty cache, but through torch's fused scaled-dot-product kernel:
    the reference's explicit where-mask + fp32 softmax is the form the exporter and the graph passes need, and
    costs ~4x more on CPU over whole 512-token windows (the eval is dominated by it). The boolean mask keeps
    causality, sliding windows and padding exactly; results differ from the reference by float rounding only
    (tests/evaluation/test_metrics.py checks the block runner against Decoder.forward).
    """
    at: Any = layer.self_attn
    q_BHWD, k_BKWD, v_BKWD = at.project(xn, c.cos, c.sin)
    ctx_BHWD = F.scaled_dot_product_attention(
        q_BHWD, k_BKWD, v_BKWD, attn_mask=c.keep[arch_window], scale=at.arch.attn_scale, enable_gqa=True
    )
    B, H, W, D = ctx_BHWD.shape
    return ctx_BHWD.transpose(1, 2).reshape(B, W, H * D)


def attention(layer: Layer, x: Tensor, c: WindowContext, arch_window: int | None) -> Tensor:
    """The attention branch of ``layer`` on residual ``x``: o_proj(attn(norm(x))) [B,W,hidden]."""
    return layer.self_attn.output(attn_ctx(layer, layer.input_layernorm(x), c, arch_window))


def run_block(dec: Decoder, block: tuple[int, ...], x: Tensor, c: WindowContext) -> Tensor:
    """One block exactly as Decoder.forward runs it: a single layer, or a pair reading the same input."""
    layers: Any = dec.layers
    ls: list[Layer] = [layers[i] for i in block]
    h = x
    for layer in ls:
        h = h + attention(layer, x, c, dec.arch.window(layer.index))
    y = h
    for layer in ls:
        y = y + layer.mlp(layer.post_attention_layernorm(h))
    return y


def embed(dec: Decoder, ids_BW: Tensor) -> Tensor:
    return torch.nn.functional.embedding(ids_BW, dec.embed_tokens)


def head(dec: Decoder, x: Tensor) -> Tensor:
    """Final norm + LM head -> fp32 logits [B,W,V]."""
    x = dec.norm(x)
    logits = x @ dec.embed_tokens.t() if dec.lm_head is None else x @ dec.lm_head
    return logits.float()


def hidden_states(
    dec: Decoder, ids_BW: Tensor, pairs: Sequence[tuple[int, int]], c: WindowContext | None = None
) -> dict[int, Tensor]:
    """Residual stream at every block boundary: {layer index where a block starts: input}, plus {L: output}."""
    c = c or window_context(dec, *ids_BW.shape)
    x = embed(dec, ids_BW)
    out: dict[int, Tensor] = {}
    with torch.no_grad():
        for block in blocks_from_pairs(dec.arch.num_layers, pairs):
            out[block[0]] = x
            x = run_block(dec, block, x, c)
    out[dec.arch.num_layers] = x
    return out


def hidden_until(dec: Decoder, ids_BW: Tensor, stop: int, pairs: Sequence[tuple[int, int]], c: WindowContext) -> Tensor:
    """Residual stream at the input of layer ``stop`` (a block boundary of the plan ``pairs``)."""
    x = embed(dec, ids_BW)
    with torch.no_grad():
        for block in blocks_from_pairs(dec.arch.num_layers, pairs):
            if block[0] >= stop:
                break
            x = run_block(dec, block, x, c)
    return x


def logits_from_hidden(
    dec: Decoder, x: Tensor, start: int, pairs: Sequence[tuple[int, int]], c: WindowContext
) -> Tensor:
    """Run the plan of ``pairs`` from layer ``start`` (a block boundary) on residual ``x``, then the head."""
    with torch.no_grad():
        for block in blocks_from_pairs(dec.arch.num_layers, pairs):
            if block[0] >= start:
                x = run_block(dec, block, x, c)
        return head(dec, x)


def logits_from_ids(dec: Decoder, ids_BW: Tensor, pairs: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """fp32 logits [B,W,V] of full windows under the plan ``pairs`` (default: the Decoder's own pairs)."""
    c = window_context(dec, *ids_BW.shape)
    return logits_from_hidden(dec, embed(dec, ids_BW), 0, dec.pairs if pairs is None else pairs, c)
