"""``WideDecoder``: the merged-equivalent of a pair-parallel ``Decoder`` as a PyTorch module.

What the pair-merge graph passes (issue 3) do to the ONNX graph, done here to the weights so that PyTorch
(eager and CUDA graphs) can run the merged form:

* norm scales are folded into the following weights (``RMSNorm(x)·g @ W == RMSNorm₁(x) @ diag(g)W``), so a
  pair's two input norms become one unit-scale norm;
* q/k/v of every branch become one MatMul ``[h, n·(q+2kv)]`` (columns: q_a q_b k_a k_b v_a v_b);
* attention runs once over n·H query heads and n·KVH key/value heads, heads of a then b, so the grouped-query
  mapping ``h // G`` stays right and the pair's cache is one K and one V with n·KVH heads — the merged
  ``IOSpec`` layout (``past_key_values.{a}_{b}.key``);
* o_proj and down_proj become one MatMul over the stacked rows ``[Wa; Wb]`` (their sum is the residual add);
* gate/up of every branch become one MatMul ``[h, 2·n·I]`` (columns: gate_a gate_b up_a up_b).

Single layers get the same fusions (n = 1), so ``WideDecoder(dec, ())`` is the fair baseline for
``WideDecoder(dec, pairs)``: the two differ only in pairing.

Two entry points:

* ``forward(ids, mask, pos, *past)`` — same signature as ``Decoder`` with a growing (concatenated) cache in the
  merged ``IOSpec`` layout; validated against ``Decoder`` with ``compare_runners``.
* ``decode_static(ids, pos, cache_pos, caches)`` — one decode token against preallocated caches
  ``[B, n·KVH, T_max, D]`` written in place at ``cache_pos``: fixed shapes, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layerpair.arch import ArchSpec
from layerpair.exporter.model import Decoder, rotate_half
from layerpair.iospec import IOSpec


def _unit_rms(x: Tensor, eps: float) -> Tensor:
    """RMSNorm without scale (the scale lives in the next weights); fp32 inside, like the Decoder."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class WideBlock(nn.Module):
    """One layer (n = 1) or one merged pair (n = 2) with fused, norm-folded weights."""

    def __init__(self, dec: Decoder, layers: tuple[int, ...]) -> None:
        super().__init__()
        a = dec.arch
        self.arch = a
        self.layers = layers
        self.n = len(layers)
        windows = {a.window(i) for i in layers}
        if len(windows) != 1:
            raise ValueError(f"layers {layers} have different sliding windows {windows}; cannot merge them")
        self.window = windows.pop()
        src = [dec.layers[i] for i in layers]  # type: ignore[index]
        with torch.no_grad():
            g_in = [s.input_layernorm.weight[:, None] for s in src]  # [h,1] each
            g_post = [s.post_attention_layernorm.weight[:, None] for s in src]
            att = [s.self_attn for s in src]
            mlp = [s.mlp for s in src]
            # [h, n·(q+2kv)]: q_a q_b k_a k_b v_a v_b
            self.w_qkv = nn.Parameter(
                torch.cat(
                    [g * x.q_proj for g, x in zip(g_in, att, strict=True)]
                    + [g * x.k_proj for g, x in zip(g_in, att, strict=True)]
                    + [g * x.v_proj for g, x in zip(g_in, att, strict=True)],
                    dim=1,
                ),
                requires_grad=False,
            )
            self.b_qkv = (
                nn.Parameter(
                    torch.cat([x.q_bias for x in att] + [x.k_bias for x in att] + [x.v_bias for x in att]), False
                )
                if a.qkv_bias
                else None
            )
            self.w_o = nn.Parameter(torch.cat([x.o_proj for x in att], dim=0), requires_grad=False)  # [n·q, h]
            self.b_o = nn.Parameter(sum(x.o_bias for x in att), False) if a.o_bias else None  # type: ignore[misc]
            # Qwen3 per-head q/k norm: one weight row per head of the wide tensor (branch a's heads, then b's).
            self.q_norm_w = (
                nn.Parameter(torch.cat([x.q_norm.weight.expand(a.num_heads, -1) for x in att]), False)
                if a.qk_norm
                else None
            )  # [n·H, D]
            self.k_norm_w = (
                nn.Parameter(torch.cat([x.k_norm.weight.expand(a.num_kv_heads, -1) for x in att]), False)
                if a.qk_norm
                else None
            )  # [n·KVH, D]
            # [h, 2·n·I]: gate_a gate_b up_a up_b
            self.w_gu = nn.Parameter(
                torch.cat(
                    [g * m.gate_proj for g, m in zip(g_post, mlp, strict=True)]
                    + [g * m.up_proj for g, m in zip(g_post, mlp, strict=True)],
                    dim=1,
                ),
                requires_grad=False,
            )
            self.b_gu = (
                nn.Parameter(torch.cat([m.gate_bias for m in mlp] + [m.up_bias for m in mlp]), False)
                if a.mlp_bias
                else None
            )
            self.w_down = nn.Parameter(torch.cat([m.down_proj for m in mlp], dim=0), requires_grad=False)  # [n·I, h]
            self.b_down = nn.Parameter(sum(m.down_bias for m in mlp), False) if a.mlp_bias else None  # type: ignore[misc]

    @property
    def kv_heads(self) -> int:
        return self.n * self.arch.num_kv_heads

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, n = self.arch, self.n
        B, S, _ = x.shape
        H, KVH, D = n * a.num_heads, n * a.num_kv_heads, a.head_dim
        qkv = _unit_rms(x, a.rms_norm_eps) @ self.w_qkv
        if self.b_qkv is not None:
            qkv = qkv + self.b_qkv
        q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
        q_BSHD, k_BSKD = q.view(B, S, H, D), k.view(B, S, KVH, D)
        if self.q_norm_w is not None and self.k_norm_w is not None:
            q_BSHD = self.q_norm_w * _unit_rms(q_BSHD, a.rms_norm_eps)
            k_BSKD = self.k_norm_w * _unit_rms(k_BSKD, a.rms_norm_eps)
        q_BHSD, k_BKSD = q_BSHD.transpose(1, 2), k_BSKD.transpose(1, 2)
        v_BKSD = v.view(B, S, KVH, D).transpose(1, 2)
        q_BHSD = q_BHSD * cos + rotate_half(q_BHSD) * sin  # rotary once, on the wide tensors
        k_BKSD = k_BKSD * cos + rotate_half(k_BKSD) * sin
        return q_BHSD, k_BKSD, v_BKSD

    def _attend_mlp(self, x: Tensor, q_BHSD: Tensor, k_BKTD: Tensor, v_BKTD: Tensor, keep_B1ST: Tensor) -> Tensor:
        a, n = self.arch, self.n
        B, H, S, D = q_BHSD.shape
        KVH, G = n * a.num_kv_heads, a.num_groups
        q_BKGSD = q_BHSD.reshape(B, KVH, G, S, D)
        scores = (q_BKGSD @ k_BKTD.unsqueeze(2).transpose(-1, -2)) * a.attn_scale  # [B,KVH,G,S,T]
        scores32 = torch.where(keep_B1ST.unsqueeze(1), scores.float(), torch.finfo(torch.float32).min)
        probs = torch.softmax(scores32, dim=-1).to(q_BHSD.dtype)
        ctx = (probs @ v_BKTD.unsqueeze(2)).reshape(B, H, S, D).transpose(1, 2).reshape(B, S, H * D)
        attn = ctx @ self.w_o  # = sum over branches of ctx_b @ Wo_b
        if self.b_o is not None:
            attn = attn + self.b_o
        h = x + attn
        gu = _unit_rms(h, a.rms_norm_eps) @ self.w_gu
        if self.b_gu is not None:
            gu = gu + self.b_gu
        g, u = gu.chunk(2, dim=-1)  # [B,S,n·I] each
        down = (F.silu(g) * u) @ self.w_down
        if self.b_down is not None:
            down = down + self.b_down
        return h + down

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, k_past: Tensor, v_past: Tensor, keep_B1ST: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        q_BHSD, k_BKSD, v_BKSD = self._qkv(x, cos, sin)
        k_BKTD = torch.cat([k_past, k_BKSD], dim=2)
        v_BKTD = torch.cat([v_past, v_BKSD], dim=2)
        return self._attend_mlp(x, q_BHSD, k_BKTD, v_BKTD, keep_B1ST), k_BKTD, v_BKTD

    def step_static(
        self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, cache_pos: Tensor, keep: Tensor
    ) -> Tensor:
        """x [B,1,h]; caches [B,n·KVH,T_max,D] written in place at ``cache_pos`` ([1] long)."""
        q_BHSD, k_BKSD, v_BKSD = self._qkv(x, cos, sin)
        k_cache.index_copy_(2, cache_pos, k_BKSD)
        v_cache.index_copy_(2, cache_pos, v_BKSD)
        return self._attend_mlp(x, q_BHSD, k_cache, v_cache, keep)


class WideDecoder(nn.Module):
    """Merged-equivalent of ``Decoder(arch, pairs)``; ``io`` is the merged ``IOSpec``."""

    def __init__(self, dec: Decoder, pairs: Sequence[tuple[int, int]], share_from: WideDecoder | None = None) -> None:
        """Build from ``dec``'s weights (any pair plan; only ``pairs`` here matters).

        ``share_from``: reuse that WideDecoder's single-layer blocks (no copy) where this one also has them —
        keeps the memory of an original + merged comparison at one copy plus the pair blocks.
        """
        super().__init__()
        a = dec.arch
        self.arch: ArchSpec = a
        self.pairs = tuple(pairs)
        self.io = IOSpec.for_model(a, self.pairs, merged=True)
        self.embed_tokens = dec.embed_tokens  # shared
        self.norm = dec.norm
        self.lm_head = dec.lm_head
        self.register_buffer("inv_freq", dec.inv_freq, persistent=False)
        reuse = {blk.layers: blk for blk in share_from.blocks} if share_from is not None else {}  # type: ignore[union-attr]
        self.blocks = nn.ModuleList(reuse.get(slot.layers) or WideBlock(dec, slot.layers) for slot in self.io.slots)

    def _rotary(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq  # [B,S,D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)  # [B,1,S,D]

    def _logits(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        return (x @ self.embed_tokens.t() if self.lm_head is None else x @ self.lm_head).float()

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor
    ) -> tuple[Tensor, ...]:
        x = F.embedding(input_ids, self.embed_tokens)
        S, T = input_ids.shape[1], attention_mask.shape[1]
        P = T - S
        q_idx = torch.arange(S, device=x.device).unsqueeze(1) + P  # [S,1]
        k_idx = torch.arange(T, device=x.device).unsqueeze(0)  # [1,T]
        causal = k_idx <= q_idx
        pad = attention_mask.bool()[:, None, None, :]
        cos, sin = self._rotary(position_ids, x.dtype)
        presents: list[Tensor] = []
        for i, blk in enumerate(self.blocks):
            w = blk.window  # type: ignore[union-attr]
            keep = (causal if w is None else causal & (q_idx - k_idx < w))[None, None] & pad
            x, k, v = blk(x, cos, sin, past[2 * i], past[2 * i + 1], keep)
            presents.extend((k, v))
        return (self._logits(x), *presents)

    # ---- static cache (CUDA graphs) ------------------------------------------------------------
    def static_caches(self, batch: int, t_max: int) -> list[Tensor]:
        """Zeroed K, V per slot: [B, n·KVH, T_max, D], on the weights' device and dtype."""
        e = self.embed_tokens
        return [
            torch.zeros(batch, blk.kv_heads, t_max, self.arch.head_dim, dtype=e.dtype, device=e.device)  # type: ignore[union-attr]
            for blk in self.blocks
            for _ in (0, 1)
        ]

    def decode_static(self, input_ids: Tensor, cache_pos: Tensor, caches: Sequence[Tensor]) -> Tensor:
        """One token per sequence (no padding): input_ids [B,1], cache_pos [1] long -> logits [B,1,V].

        Every shape is fixed, so the call can be captured in a CUDA graph; the caller advances ``cache_pos``.
        """
        x = F.embedding(input_ids, self.embed_tokens)
        B = input_ids.shape[0]
        t_max = caches[0].shape[2]
        pos = cache_pos.view(1, 1).expand(B, 1)
        cos, sin = self._rotary(pos, x.dtype)
        k_idx = torch.arange(t_max, device=x.device)
        causal = (k_idx <= cache_pos)[None, None, None, :]  # [1,1,1,T_max]
        for i, blk in enumerate(self.blocks):
            w = blk.window  # type: ignore[union-attr]
            keep = causal if w is None else causal & ((cache_pos - k_idx) < w)[None, None, None, :]
            x = blk.step_static(x, cos, sin, caches[2 * i], caches[2 * i + 1], cache_pos, keep)  # type: ignore[operator]
        return self._logits(x)


def wide_pair(dec: Decoder, pairs: Sequence[tuple[int, int]]) -> tuple[WideDecoder, WideDecoder]:
    """(original fused, LP merged) sharing every single-layer block: the fair merged comparison."""
    base = WideDecoder(dec, ())
    return base, WideDecoder(dec, pairs, share_from=base)
