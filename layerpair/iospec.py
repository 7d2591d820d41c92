"""The one I/O spec: tensor names, dtypes and (symbolic) dims of the exported decoder.

ONNX export (input/output names, dynamic axes), validation (feeds), TensorRT optimization profiles and the
Triton ``config.pbtxt`` are all generated from this object, so a name can never drift between them.

Cache naming. Unmerged, every layer owns one cache slot ``past_key_values.{i}.key|value`` with KVH heads —
the names Optimum and onnxruntime-genai use. After the pair-merge graph pass, pair (a, b) owns one slot
``past_key_values.{a}_{b}.key|value`` with 2·KVH heads: heads of layer a first, then heads of layer b (so the
grouped-query mapping q-head → kv-head stays ``h // G`` on the wide tensors). Outputs mirror inputs with the
``present`` prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from layerpair.arch import ArchSpec

# Symbolic dimension names (ONNX dim_param, TensorRT profile keys, Triton -1 dims).
BATCH, SEQ, PAST, TOTAL, VOCAB = "batch", "sequence", "past_sequence", "total_sequence", "vocab"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", "float16", "bfloat16"
    dims: tuple[int | str, ...]  # ints are static, strings are symbolic


@dataclass(frozen=True)
class CacheSlot:
    """One K/V cache pair: the original layers it holds and its head count."""

    layers: tuple[int, ...]
    num_kv_heads: int

    @property
    def tag(self) -> str:
        return "_".join(str(i) for i in self.layers)

    @property
    def past_key(self) -> str:
        return f"past_key_values.{self.tag}.key"

    @property
    def past_value(self) -> str:
        return f"past_key_values.{self.tag}.value"

    @property
    def present_key(self) -> str:
        return f"present.{self.tag}.key"

    @property
    def present_value(self) -> str:
        return f"present.{self.tag}.value"


@dataclass(frozen=True)
class IOSpec:
    arch: ArchSpec
    slots: tuple[CacheSlot, ...]
    dtype: str = "float32"
    #: Where rotary takes a token's position: "position_ids" (the input, as given: every graph but one) or
    #: "cache_index" (its index in the cache: ``--target ort --ort-rotary gqa``, graph_passes/gqa_packed_rotary.py).
    #: The logits agree whenever position_ids = cache index - a constant per row (left padding included); the
    #: cached keys of a row with leading masked slots then differ by that rotation (validation skips them).
    rotary_positions: str = "position_ids"

    @classmethod
    def for_model(
        cls, arch: ArchSpec, pairs: Sequence[tuple[int, int]] = (), merged: bool = False, dtype: str = "float32"
    ) -> IOSpec:
        """Unmerged: one slot per layer. Merged: one 2·KVH slot per pair, one KVH slot per other layer."""
        paired = {a: (a, b) for a, b in pairs}
        in_pair = {x for p in pairs for x in p}
        slots: list[CacheSlot] = []
        for i in range(arch.num_layers):
            if merged and i in paired:
                slots.append(CacheSlot(paired[i], 2 * arch.num_kv_heads))
            elif merged and i in in_pair:
                continue
            else:
                slots.append(CacheSlot((i,), arch.num_kv_heads))
        return cls(arch, tuple(slots), dtype)

    @property
    def inputs(self) -> list[TensorSpec]:
        d = self.arch.head_dim
        out = [
            TensorSpec("input_ids", "int64", (BATCH, SEQ)),
            TensorSpec("attention_mask", "int64", (BATCH, TOTAL)),
            TensorSpec("position_ids", "int64", (BATCH, SEQ)),
        ]
        for s in self.slots:
            out.append(TensorSpec(s.past_key, self.dtype, (BATCH, s.num_kv_heads, PAST, d)))
            out.append(TensorSpec(s.past_value, self.dtype, (BATCH, s.num_kv_heads, PAST, d)))
        return out

    @property
    def outputs(self) -> list[TensorSpec]:
        d = self.arch.head_dim
        # Logits are float32 whatever the graph dtype: the decoder casts them up (model.py, `logits.float()`)
        # so that sampling and validation never see fp16 rounding of a [B,S,V] softmax input.
        out = [TensorSpec("logits", "float32", (BATCH, SEQ, self.arch.vocab_size))]
        for s in self.slots:
            out.append(TensorSpec(s.present_key, self.dtype, (BATCH, s.num_kv_heads, TOTAL, d)))
            out.append(TensorSpec(s.present_value, self.dtype, (BATCH, s.num_kv_heads, TOTAL, d)))
        return out

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def state_pairs(self) -> list[tuple[str, str]]:
        """(past input, present output) pairs: what a runtime feeds back between steps."""
        pairs = []
        for s in self.slots:
            pairs += [(s.past_key, s.present_key), (s.past_value, s.present_value)]
        return pairs

    def shapes(self, dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes for symbolic values ``dims`` (TensorRT profiles, dummy feeds)."""
        dims = {**dims, TOTAL: dims[PAST] + dims[SEQ]}
        return {t.name: tuple(dims[x] if isinstance(x, str) else x for x in t.dims) for t in self.inputs}

    def to_json(self) -> dict[str, object]:
        return {
            "inputs": [{"name": t.name, "dtype": t.dtype, "dims": list(t.dims)} for t in self.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype, "dims": list(t.dims)} for t in self.outputs],
            "cache_slots": [{"layers": list(s.layers), "num_kv_heads": s.num_kv_heads} for s in self.slots],
        }
