"""The export-facing reference decoder: Llama / Mistral / Qwen2 / Qwen3 with an explicit KV cache and
layer parallelism, in one file.

Signature (flat, so ONNX names map 1:1 to the I/O spec)::

    forward(input_ids [B,S], attention_mask [B,T], position_ids [B,S], *past)  # past: K,V per slot [B,KVH,P,D]
        -> (logits [B,S,V], *present)                                          # present: [B,KVH,T,D], T = P+S

A pair (a, b) evaluates both layers on the same input (arXiv 2502.02790)::

    h = x + Attn_a(N_a(x)) + Attn_b(N_b(x))
    y = h + MLP_a(M_a(h)) + MLP_b(M_b(h))

Each branch keeps its own norms and its own cache slot (original layer index). Weights are stored
pre-transposed ``[in, out]`` so that every projection exports as ``MatMul(x, W)`` with W an initializer —
the form the graph passes look for.

Numerics follow transformers exactly: RMSNorm in fp32 then cast back before the scale, rotary cos/sin in fp32,
softmax in fp32. Masked scores are replaced (``where``), not offset, and fully-masked rows (left padding)
softmax to a uniform, finite row: a NaN at a pad position would otherwise reach the cache and poison every
later step through ``0 * NaN``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layerpair.arch import ArchSpec
from layerpair.errors import NonFiniteWeightError
from layerpair.exporter.weights import StateDictWeights, WeightReader, require
from layerpair.iospec import IOSpec

# The one dtype table: graph dtype name -> torch dtype (every other module reads it from here).
TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# The float ops ATen hands to MKL's vector math library (VML) on x86 (ATen/cpu/vml.h, IMPLEMENT_VML_MKL).
VML_OPS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin", "sqrt",
            "tan", "tanh", "trunc")  # fmt: skip


@functools.cache
def resolve_vml_dispatch() -> None:
    """Call each VML op once on one element, in this thread alone, before any real (multi-threaded) call.

    oneMKL 2024.2 (bundled in the torch 2.13 wheel) resolves each VML function's kernel on its first call. When
    that first call runs on several intra-op threads at once, one thread can run the low-accuracy kernel for its
    whole chunk of that call (pytorch/pytorch#188792; ~1000 ulp). A fresh export's first forward is such a call:
    cos/sin of [1,43,64] rotary angles split over 2 threads (grain 2048), so positions 22..42 got cos/sin off by
    ~6e-5 relative, keys off by 1.7e-3, and the reference itself failed validation (seen once in CI, under load).
    A one-element call is never split, and afterwards every call dispatches to the accurate kernel. Once per
    process; costs microseconds.
    """
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype, device="cpu")  # real even under a meta device context
        for name in VML_OPS:
            getattr(torch, name)(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape), requires_grad=False)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, arch: ArchSpec) -> None:
        super().__init__()
        self.arch = arch
        h, q, kv = arch.hidden_size, arch.q_dim, arch.kv_dim
        self.q_proj = _param(h, q)  # [in, out]
        self.k_proj = _param(h, kv)
        self.v_proj = _param(h, kv)
        self.o_proj = _param(q, h)
        self.q_bias = _param(q) if arch.qkv_bias else None
        self.k_bias = _param(kv) if arch.qkv_bias else None
        self.v_bias = _param(kv) if arch.qkv_bias else None
        self.o_bias = _param(h) if arch.o_bias else None
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None

    def forward(
        self, xn: Tensor, cos: Tensor, sin: Tensor, k_past: Tensor, v_past: Tensor, keep_B1ST: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        q_BHSD, k_BKSD, v_BKSD = self.project(xn, cos, sin)
        k_BKTD = torch.cat([k_past, k_BKSD], dim=2)  # present = past ++ new  [B,KVH,T,D]
        v_BKTD = torch.cat([v_past, v_BKSD], dim=2)
        a = self.arch
        B, H, S, D = q_BHSD.shape
        KVH, G = a.num_kv_heads, a.num_groups
        # Grouped-query attention without repeating K/V: view q as [B,KVH,G,S,D] and broadcast K/V over G.
        q_BKGSD = q_BHSD.reshape(B, KVH, G, S, D)
        scores = (q_BKGSD @ k_BKTD.unsqueeze(2).transpose(-1, -2)) * a.attn_scale  # [B,KVH,G,S,T]
        scores32 = torch.where(keep_B1ST.unsqueeze(1), scores.float(), torch.finfo(torch.float32).min)
        probs = torch.softmax(scores32, dim=-1).to(q_BHSD.dtype)
        ctx_BKGSD = probs @ v_BKTD.unsqueeze(2)
        ctx = ctx_BKGSD.reshape(B, H, S, D).transpose(1, 2).reshape(B, S, H * D)
        return self.output(ctx), k_BKTD, v_BKTD

    def project(self, xn: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B,H,S,D], k and v [B,KVH,S,D] of the new tokens, rotary applied (cos/sin: [B,1,S,D])."""
        a = self.arch
        B, S, _ = xn.shape
        H, KVH, D = a.num_heads, a.num_kv_heads, a.head_dim
        q = xn @ self.q_proj
        k = xn @ self.k_proj
        v = xn @ self.v_proj
        if self.q_bias is not None and self.k_bias is not None and self.v_bias is not None:
            q, k, v = q + self.q_bias, k + self.k_bias, v + self.v_bias
        q_BSHD = q.view(B, S, H, D)
        k_BSKD = k.view(B, S, KVH, D)
        if self.q_norm is not None and self.k_norm is not None:  # Qwen3: per-head RMSNorm before rotary
            q_BSHD, k_BSKD = self.q_norm(q_BSHD), self.k_norm(k_BSKD)
        q_BHSD = q_BSHD.transpose(1, 2)
        k_BKSD = k_BSKD.transpose(1, 2)
        v_BKSD = v.view(B, S, KVH, D).transpose(1, 2)
        q_BHSD = q_BHSD * cos + rotate_half(q_BHSD) * sin
        k_BKSD = k_BKSD * cos + rotate_half(k_BKSD) * sin
        return q_BHSD, k_BKSD, v_BKSD

    def output(self, ctx_BSE: Tensor) -> Tensor:
        """o_proj (+ bias) of the attention context [B,S,H*D]."""
        out = ctx_BSE @ self.o_proj
        return out + self.o_bias if self.o_bias is not None else out


class MLP(nn.Module):
    def __init__(self, arch: ArchSpec) -> None:
        super().__init__()
        h, i = arch.hidden_size, arch.intermediate_size
        self.gate_proj = _param(h, i)
        self.up_proj = _param(h, i)
        self.down_proj = _param(i, h)
        self.gate_bias = _param(i) if arch.mlp_bias else None
        self.up_bias = _param(i) if arch.mlp_bias else None
        self.down_bias = _param(h) if arch.mlp_bias else None

    def forward(self, x: Tensor) -> Tensor:
        g, u = x @ self.gate_proj, x @ self.up_proj
        if self.gate_bias is not None and self.up_bias is not None:
            g, u = g + self.gate_bias, u + self.up_bias
        out = (F.silu(g) * u) @ self.down_proj
        return out + self.down_bias if self.down_bias is not None else out


class Layer(nn.Module):
    def __init__(self, arch: ArchSpec, index: int) -> None:
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)


def read_weight(reader: WeightReader, hf_name: str, transposed: bool) -> Tensor:
    """One checkpoint tensor as contiguous fp32 in our layout. A non-finite weight is an input error naming the
    tensor: it would otherwise export, and the first NaN would poison every later step."""
    src = reader.read(hf_name)
    t = fp32_transposed(src) if transposed else src.to(torch.float32).contiguous()
    # A sum is non-finite when any element is (NaN and inf propagate): one vectorised pass, ~30x cheaper than an
    # elementwise isfinite. Finite elements can still overflow the fp32 sum, so a non-finite sum is only a
    # suspicion, settled by counting.
    if not bool(torch.isfinite(t.sum())):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise NonFiniteWeightError(
                f"checkpoint tensor '{hf_name}' holds {bad} non-finite value(s)",
                "repair or re-download the checkpoint: a NaN/inf weight makes every output NaN",
            )
    return t


def fp32_transposed(w_OI: Tensor, rows: int = 64) -> Tensor:
    """``[out, in]`` of any float dtype -> contiguous fp32 ``[in, out]``, cast and transposed in one pass.

    ``rows`` source rows at a time: each block's strided writes stay in cache, ~1.6x faster than
    ``.t().contiguous()`` followed by a cast (which also allocates the model twice over, one tensor at a time).
    """
    O, I = w_OI.shape
    out_IO = torch.empty(I, O, dtype=torch.float32)
    for r in range(0, O, rows):
        out_IO[:, r : r + rows].copy_(w_OI[r : r + rows].t())
    return out_IO


@dataclass
class StepContext:
    keep: dict[int | None, Tensor]  # [B,1,S,T] per sliding window (None: full causal)
    cos: Tensor  # [B,1,S,D]
    sin: Tensor
    past: Sequence[Tensor]  # 2 per layer, unmerged slots
    presents: dict[int, tuple[Tensor, Tensor]]  # layer -> (K, V) [B,KVH,T,D]

    def presents_in_order(self) -> list[Tensor]:
        return [t for i in sorted(self.presents) for t in self.presents[i]]


class Decoder(nn.Module):
    def __init__(self, arch: ArchSpec, pairs: Sequence[tuple[int, int]] = ()) -> None:
        super().__init__()
        resolve_vml_dispatch()  # before this process's first multi-threaded cos/sin (see there)
        self.arch = arch
        self.pairs = tuple(pairs)
        self.io = IOSpec.for_model(arch, self.pairs, merged=False)
        self.embed_tokens = _param(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(Layer(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        # Tied: logits = x @ E^T, reading the embedding table itself (no second copy of the weights).
        self.lm_head = None if arch.tie_word_embeddings else _param(arch.hidden_size, arch.vocab_size)
        inv = torch.tensor(arch.rope.inv_freq(arch.head_dim), dtype=torch.float64).float()
        self.register_buffer("inv_freq", inv, persistent=False)  # [D/2]
        # Execution plan: singles and pairs in layer order.
        first = {a: b for a, b in self.pairs}
        second = set(first.values())
        self.blocks: list[tuple[int, ...]] = [
            (i, first[i]) if i in first else (i,) for i in range(arch.num_layers) if i not in second
        ]

    # ---- masks and rotary ----------------------------------------------------------------------
    def _keep_masks(self, attention_mask: Tensor, S: int) -> dict[int | None, Tensor]:
        """Boolean keep masks [B,1,S,T] per distinct window: causal by cache index, padding, sliding window."""
        T = attention_mask.shape[1]
        P = T - S
        q_idx = torch.arange(S, device=attention_mask.device).unsqueeze(1) + P  # [S,1] cache index of query
        k_idx = torch.arange(T, device=attention_mask.device).unsqueeze(0)  # [1,T]
        causal = k_idx <= q_idx  # [S,T]
        pad = attention_mask.bool()[:, None, None, :]  # [B,1,1,T]
        masks: dict[int | None, Tensor] = {}
        for w in {self.arch.window(i) for i in range(self.arch.num_layers)}:
            allowed = causal if w is None else causal & (q_idx - k_idx < w)
            masks[w] = allowed[None, None] & pad
        return masks

    def _rotary(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        inv_freq: Tensor = self.inv_freq  # type: ignore[assignment]  # a registered buffer
        freqs = position_ids.float().unsqueeze(-1) * inv_freq  # [B,S,D/2], fp32 like transformers
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)  # [B,1,S,D]

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor
    ) -> tuple[Tensor, ...]:
        x = F.embedding(input_ids, self.embed_tokens)  # [B,S,h]
        ctx = self.step_context(attention_mask, position_ids, x.dtype, past)
        for block in self.blocks:
            x = self.run_block(block, x, ctx)
        return (self.logits(x), *ctx.presents_in_order())

    def step_context(
        self, attention_mask: Tensor, position_ids: Tensor, dtype: torch.dtype, past: Sequence[Tensor]
    ) -> StepContext:
        """What every block of one step reads: keep masks, cos/sin, the past cache (``past[2i]``, ``past[2i+1]``:
        layer i's K and V) — and where each layer leaves its present K/V."""
        cos, sin = self._rotary(position_ids, dtype)
        return StepContext(self._keep_masks(attention_mask, position_ids.shape[1]), cos, sin, past, {})

    def run_block(self, block: Sequence[int], x: Tensor, ctx: StepContext) -> Tensor:
        """One single layer, or a pair whose two branches read the same input (module docstring)."""
        layers: Any = self.layers
        ls: list[Layer] = [layers[i] for i in block]
        h = x
        for layer in ls:  # pair: both attentions read x, both outputs join the residual
            i = layer.index
            xn = layer.input_layernorm(x)
            keep = ctx.keep[self.arch.window(i)]
            out, k, v = layer.self_attn(xn, ctx.cos, ctx.sin, ctx.past[2 * i], ctx.past[2 * i + 1], keep)
            ctx.presents[i] = (k, v)
            h = h + out
        x = h
        for layer in ls:  # pair: both MLPs read h
            x = x + layer.mlp(layer.post_attention_layernorm(h))
        return x

    def logits(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        logits = x @ self.embed_tokens.t() if self.lm_head is None else x @ self.lm_head
        return logits.float()

    # ---- construction from checkpoint weights ---------------------------------------------------
    def hf_names(self) -> dict[str, tuple[str, bool]]:
        """Our parameter name -> (Hugging Face name, stored transposed): nn.Linear is [out,in], ours [in,out]."""
        out: dict[str, tuple[str, bool]] = {"embed_tokens": ("model.embed_tokens.weight", False)}
        out["norm.weight"] = ("model.norm.weight", False)
        if self.lm_head is not None:
            out["lm_head"] = ("lm_head.weight", True)
        for name, _ in self.layers.named_parameters():
            i, rest = name.split(".", 1)
            hf = f"model.layers.{i}." + rest
            if rest.endswith("_bias"):
                out[f"layers.{name}"] = (hf.replace("_bias", "_proj.bias"), False)
            elif rest.endswith("_proj"):
                out[f"layers.{name}"] = (hf + ".weight", True)
            else:
                out[f"layers.{name}"] = (hf, False)
        return out

    @classmethod
    def skeleton(cls, arch: ArchSpec, pairs: Sequence[tuple[int, int]] = ()) -> Decoder:
        """Shapes and dtypes only (meta tensors): what the graph writer and the I/O spec need, no weight memory."""
        with torch.device("meta"):
            dec = cls(arch, pairs)
        dec.inv_freq = torch.tensor(arch.rope.inv_freq(arch.head_dim), dtype=torch.float64).float()
        return dec.eval()

    def weight_source(self, reader: WeightReader) -> Callable[[str], Tensor]:
        """``source(our name) -> tensor`` in our layout and this decoder's dtype, read from ``reader`` on demand."""
        names = self.hf_names()
        require(reader, [hf for hf, _ in names.values()])
        dtypes = {n: p.dtype for n, p in self.named_parameters()}

        def source(name: str) -> Tensor:
            hf, transposed = names[name]
            return read_weight(reader, hf, transposed).to(dtypes[name])

        return source

    def set_parameter(self, name: str, t: Tensor) -> None:
        """Replace parameter ``name`` (dotted, as ``named_parameters`` spells it) by ``t``, frozen."""
        mod, _, attr = name.rpartition(".")
        setattr(self.get_submodule(mod) if mod else self, attr, nn.Parameter(t, requires_grad=False))

    @classmethod
    def from_weights(
        cls, reader: WeightReader, arch: ArchSpec, pairs: Sequence[tuple[int, int]] = (), progress: Any = None
    ) -> Decoder:
        """Read every weight from ``reader`` (fp32), one tensor at a time; no other copy of the model is made.

        Built on the meta device first, so no placeholder is ever allocated.
        """
        dec = cls.skeleton(arch, pairs)
        source = dec.weight_source(reader)
        names = list(dec.hf_names())
        for k, ours in enumerate(names):
            dec.set_parameter(ours, source(ours))
            if progress is not None:
                progress(k + 1, len(names))
        return dec

    @classmethod
    def from_hf(cls, hf_model: nn.Module, arch: ArchSpec, pairs: Sequence[tuple[int, int]] = ()) -> Decoder:
        """Copy weights out of a transformers *ForCausalLM (shares no storage with it), as fp32."""
        sd = hf_model.state_dict()
        dec = cls.from_weights(StateDictWeights(sd), arch, pairs)
        dtype = sd["model.embed_tokens.weight"].dtype
        if dtype != torch.float32:  # a 16-bit model stays 16-bit; rotary stays fp32
            dec = dec.to(dtype)
            dec.inv_freq = dec.inv_freq.float()
        return dec

    def empty_past(self, batch: int, dtype: torch.dtype | None = None) -> list[Tensor]:
        a = self.arch
        dt = dtype or self.embed_tokens.dtype
        return [torch.zeros(batch, a.num_kv_heads, 0, a.head_dim, dtype=dt) for _ in range(2 * a.num_layers)]
