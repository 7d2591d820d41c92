"""PackedRotaryGqaPass: ``GroupQueryAttention`` reads the packed QKV projection and rotates q and k itself, at
cache-index positions (``--target ort``, ``--ort-rotary gqa``: the default)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common

from layerpair.graph_passes.base import (
    RewritePass,
    attr_int,
    const,
    consumers_of,
    node,
    producer,
)
from layerpair.graph_passes.fuse_gqa import rope_table

MS_DOMAIN = "com.microsoft"
#: GroupQueryAttention's inputs by position (onnxruntime contrib op schema).
GQA_QUERY, GQA_KEY, GQA_VALUE, GQA_TOTAL, GQA_COS, GQA_SIN, GQA_POSITION_IDS = 0, 1, 2, 6, 7, 8, 9


@dataclass(frozen=True)
class _Packed:
    qkv_BSE: ir.Value  # [B,S,(H+2*KVH)*D]: the one MatMul's output the Split cut into q, k, v
    inv_freq: ir.Value  # [D/2] fp32 constant the replaced RotaryEmbeddings' cos/sin were computed from


@dataclass(frozen=True)
class _Site:
    gqa: ir.Node
    found: _Packed | str


def _ms(n: ir.Node | None, op: str) -> bool:
    return n is not None and n.domain == MS_DOMAIN and n.op_type == op


def _inv_freq(cos: ir.Value | None, D: int) -> ir.Value | str:
    """``cos = Cos(Unsqueeze(Cast(Range(...)), -1) * inv_freq)`` with a constant [D/2] ``inv_freq`` (the cache
    ``fuse_gqa`` builds) -> inv_freq, or the reason."""
    trig = producer(cos, "Cos")
    mul = producer(trig.inputs[0] if trig is not None else None, "Mul")
    inv = mul.inputs[1] if mul is not None else None
    value = const(inv)
    if inv is None or value is None or value.shape != (D // 2,):
        return f"the rotary cos cache is not cos(position * inv_freq) with a constant [{D // 2}] inv_freq"
    return inv


def check_site(gqa: ir.Node) -> _Packed | str:
    """The slot's q, k, v are the three pieces of one Split of one tensor, q and k rotated by two RotaryEmbeddings
    on the same positions and caches, over the whole head (no partial rotary), read by nothing else."""
    if attr_int(gqa, "do_rotary", 0):
        return "GroupQueryAttention already rotates"
    rq, rk = producer(gqa.inputs[GQA_QUERY]), producer(gqa.inputs[GQA_KEY])
    if not (_ms(rq, "RotaryEmbedding") and _ms(rk, "RotaryEmbedding")):
        return "query/key are not RotaryEmbedding outputs"
    assert rq is not None and rk is not None
    if attr_int(rq, "interleaved", 0) or attr_int(rk, "interleaved", 0):
        return "interleaved rotary (GroupQueryAttention would need rotary_interleaved; not emitted by the exporter)"
    if any(a is not b for a, b in zip(rq.inputs[1:], rk.inputs[1:], strict=True)):
        return "q and k are rotated on different positions or caches"
    split = producer(rq.inputs[0], "Split")
    pieces = [rq.inputs[0], rk.inputs[0], gqa.inputs[GQA_VALUE]]
    if split is None or list(split.outputs) != pieces or split.inputs[0] is None:
        return "q, k, v are not the three outputs of one Split, in that order"
    sizes, H, KVH = const(split.inputs[1]), attr_int(gqa, "num_heads", 0), attr_int(gqa, "kv_num_heads", 0)
    if sizes is None or attr_int(split, "axis", 0) not in (-1, 2) or KVH <= 0 or sizes.shape != (3,):
        return "the Split is not a constant 3-way cut of the last axis"
    D = int(sizes[1]) // KVH
    if sizes.tolist() != [H * D, KVH * D, KVH * D]:
        return f"Split sizes {sizes.tolist()} are not [H*D, KVH*D, KVH*D] for H={H}, KVH={KVH}"
    if any(v is None or len(consumers_of(v)) != 1 for v in (*pieces, rq.outputs[0], rk.outputs[0])):
        return "a q/k/v piece or a rotated tensor is read elsewhere (it would be computed twice)"
    inv = _inv_freq(rq.inputs[2], D)
    return inv if isinstance(inv, str) else _Packed(split.inputs[0], inv)


class PackedRotaryGqaPass(RewritePass[_Site]):
    """Feed each ``GroupQueryAttention`` its packed QKV and let it rotate q and k (``do_rotary=1``).

    Pattern, per attention (a layer's, or a merged pair's with 2H / 2·KVH heads; ``E = (H + 2·KVH)·D``)::

        q, k, v = Split(qkv [B,S,E], [H·D, KVH·D, KVH·D])
        GQA(RotaryEmbedding(q, pos, cos, sin), RotaryEmbedding(k, pos, cos, sin), v, ..., do_rotary=0)
            ==>
        GQA(qkv, -, -, ..., cos_idx, sin_idx, do_rotary=1),   cos_idx[t] = cos(t * inv_freq), t in [0, T)

    The rotary position of a token becomes its *cache index* t (GroupQueryAttention's own rule: on a first
    prompt it takes 0..S-1 whatever ``position_ids`` says; a step on a cache continues from the cache length),
    not ``position_ids``. Attention depends only on q_pos - k_pos (rotary is a rotation by position), so the
    logits are the same whenever, per row, ``position_ids`` = cache index - a constant: no padding, or padding
    only before a row's first real token (left padding, a masked first cache slot) with position_ids counting
    real tokens — what every runner in this project feeds. The cached *keys* of a left-padded row are then
    rotated by that constant more than the portable graph's (validation compares their values and the logits
    they produce, not them: ``IOSpec.rotary_positions``). Three nodes fewer per attention (Split, 2 x
    RotaryEmbedding), as the onnxruntime-genai builder emits it.

    Must not fire when: q/k are not ``RotaryEmbedding`` (rotate-half, not interleaved) of the first two pieces
    of one 3-way last-axis ``Split`` whose third piece is v, on the same positions and caches; the cut is not
    [H·D, KVH·D, KVH·D]; a piece or a rotated tensor has another reader; the cos cache is not
    cos(position · constant [D/2] inv_freq). ``--ort-rotary separate`` does not run it (``position_ids`` honoured
    as given: packed sequences, gaps in a row).

    Invariant: graph I/O unchanged (``position_ids`` stays an input, unread); batch 1 without padding gives
    bit-identical logits and caches (measured on SmolLM2: 0.0).
    """

    name = "gqa_packed_rotary"

    def __init__(self) -> None:
        super().__init__()
        self._caches: dict[tuple[int, int], tuple[ir.Value, ir.Value]] = {}

    def start(self, model: ir.Model) -> None:
        self._caches = {}

    def pattern(self, model: ir.Model) -> Iterator[_Site]:
        for n in list(model.graph):
            if _ms(n, "GroupQueryAttention"):
                yield _Site(n, check_site(n))

    def check(self, model: ir.Model, candidate: _Site) -> str | None:
        return candidate.found if isinstance(candidate.found, str) else None

    def describe(self, candidate: _Site) -> str:
        return str(candidate.gqa.name)

    def rewrite(self, model: ir.Model, candidate: _Site) -> None:
        f, gqa = candidate.found, candidate.gqa
        assert not isinstance(f, str)  # check
        total = gqa.inputs[GQA_TOTAL]
        assert total is not None  # fuse_gqa always feeds it
        cos, sin = self._index_cache(model.graph, total, f.inv_freq)
        gqa.replace_input_with(GQA_QUERY, f.qkv_BSE)
        for i in (GQA_KEY, GQA_VALUE, GQA_POSITION_IDS):
            if i < len(gqa.inputs):
                gqa.replace_input_with(i, None)
        gqa.replace_input_with(GQA_COS, cos)
        gqa.replace_input_with(GQA_SIN, sin)
        gqa.attributes["do_rotary"] = ir.AttrInt64("do_rotary", 1)

    def finish(self, model: ir.Model) -> None:
        if self.fired:
            common.RemoveUnusedNodesPass()(model)
            model.graph.sort()

    def _index_cache(self, g: ir.Graph, total: ir.Value, inv_freq: ir.Value) -> tuple[ir.Value, ir.Value]:
        """cos/sin [T, D/2] of t * inv_freq for t in [0, T), T = total_sequence_length: once per graph (and
        inv_freq). fp32 products of the same operands as the exporter's rotary, so an unpadded row's angles are
        bit-identical to the portable graph's."""
        key = (id(total), id(inv_freq))
        if key not in self._caches:
            p = f"gqa_rope_{len(self._caches)}"
            count = node("Cast", [total], f"{p}/T", to=ir.DataType.INT64)
            nodes = [count, *rope_table(g, count.outputs[0], inv_freq, p)]
            g.extend(nodes)
            self._caches[key] = (nodes[-2].outputs[0], nodes[-1].outputs[0])
        return self._caches[key]
