"""Model facts as data: one frozen dataclass read from a Hugging Face config, with derived fields.

Everything downstream (the reference decoder, the I/O spec, the graph passes, engine profiles, Triton
configs) reads shapes from here instead of from the config object, so a config quirk is handled once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from layerpair.errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _supported_list() -> str:
    return ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())


@dataclass(frozen=True)
class RopeSpec:
    """Rotary settings exactly as transformers 5 stores them in ``config.rope_parameters``."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> list[float]:
        """Inverse frequencies [D/2] in float64 (the decoder casts to fp32, as transformers does)."""
        base = [1.0 / (self.theta ** (i / head_dim)) for i in range(0, head_dim, 2)]
        if self.rope_type == "default":
            return base
        if self.rope_type == "linear":
            # Position interpolation: positions / factor == inv_freq / factor.
            return [f / self.factor for f in base]
        # llama3: leave high frequencies alone, divide low ones by `factor`, interpolate smoothly between.
        old = self.original_max_position_embeddings
        low_wavelen = old / self.low_freq_factor
        high_wavelen = old / self.high_freq_factor
        out = []
        for f in base:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                out.append(f)
            elif wavelen > low_wavelen:
                out.append(f / self.factor)
            else:
                smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
                out.append((1 - smooth) * f / self.factor + smooth * f)
        return out


@dataclass(frozen=True)
class ArchSpec:
    """Shapes and switches of a Llama-family decoder."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope: RopeSpec
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    # Per-layer sliding window (None = full causal attention), as transformers decides it per layer.
    sliding_windows: tuple[int | None, ...] = field(default=())

    # ---- derived -------------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def attn_scale(self) -> float:
        return self.head_dim**-0.5

    def window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    def num_parameters(self) -> int:
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        per_layer = 2 * h + h * (q + 2 * kv) + q * h + 3 * h * i
        per_layer += (q + 2 * kv) * self.qkv_bias + h * self.o_bias + (2 * i + h) * self.mlp_bias
        per_layer += 2 * self.head_dim * self.qk_norm
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return emb + h + self.num_layers * per_layer

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: Any) -> ArchSpec:
        """Read a transformers config object; raise UnsupportedModelError for anything we cannot reproduce."""
        model_type = getattr(cfg, "model_type", None)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture '{model_type}' is not supported",
                f"supported: {_supported_list()}",
            )
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act '{act}' is not supported", "only SiLU-gated MLPs (silu) are")
        n_layers = int(cfg.num_hidden_layers)
        n_heads = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
        if n_heads % n_kv:
            raise UnsupportedModelError(
                f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}",
                "check the checkpoint's config.json",
            )
        return cls(
            model_type=model_type,
            vocab_size=int(cfg.vocab_size),
            hidden_size=int(cfg.hidden_size),
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=head_dim,
            intermediate_size=int(cfg.intermediate_size),
            rms_norm_eps=float(cfg.rms_norm_eps),
            rope=_rope_from_config(cfg),
            # Qwen2 always has q/k/v bias; Llama and Qwen3 put `attention_bias` on q/k/v/o; Mistral has none.
            qkv_bias=model_type == "qwen2"
            or (model_type in ("llama", "qwen3") and bool(getattr(cfg, "attention_bias", False))),
            o_bias=model_type in ("llama", "qwen3") and bool(getattr(cfg, "attention_bias", False)),
            mlp_bias=model_type == "llama" and bool(getattr(cfg, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            sliding_windows=_windows_from_config(cfg, model_type, n_layers),
        )


def _rope_from_config(cfg: Any) -> RopeSpec:
    # transformers 5 keeps every rotary setting in `rope_parameters` (rope_theta included). Older configs had
    # `rope_theta` + `rope_scaling`; transformers 5 standardises those on load, but read them as a fallback so
    # a missing dict can never silently become the default base of 10000.
    params = getattr(cfg, "rope_parameters", None) or {}
    if not isinstance(params, dict) or (params and "rope_theta" not in params and "rope_type" not in params):
        raise UnsupportedModelError(
            "per-layer-type rope_parameters are not supported", "only one rotary setting for all layers is"
        )
    legacy = getattr(cfg, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise UnsupportedModelError("config has no rope_theta", "add rope_parameters.rope_theta to config.json")
    rope_type = params.get("rope_type", legacy.get("rope_type", legacy.get("type", "default")))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_type '{rope_type}' is not supported", f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if float(params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported", "use a full-rotary model")
    merged = {**legacy, **params}
    return RopeSpec(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            merged.get("original_max_position_embeddings", getattr(cfg, "max_position_embeddings", 8192))
        ),
    )


def _windows_from_config(cfg: Any, model_type: str, n_layers: int) -> tuple[int | None, ...]:
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if model_type in ("qwen2", "qwen3"):
        if layer_types is None or not window or not getattr(cfg, "use_sliding_window", False):
            return ()
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    if model_type == "mistral" and window:
        return (int(window),) * n_layers
    return ()
