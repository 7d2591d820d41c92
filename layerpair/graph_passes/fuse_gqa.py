"""FuseGroupQueryAttentionPass: each cache slot's decomposed attention becomes ONNX Runtime's fused contrib ops,
``RotaryEmbedding`` (q and k) + ``GroupQueryAttention`` (``--target ort`` only)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from layerpair.graph_passes.base import (
    FIRED,
    RewritePass,
    attr_int,
    const,
    node,
    producer,
    replace_value,
    scalar,
    small_initializer,
)
from layerpair.graph_passes.merge_attention import check_attention, scores_matmul
from layerpair.graph_passes.patterns import match_rotary
from layerpair.iospec import BATCH, SEQ, CacheSlot, IOSpec

MS_DOMAIN = "com.microsoft"
#: GroupQueryAttention's CPU kernel refuses other head sizes ("head_size shall be a multiple of 16").
HEAD_SIZE_MULTIPLE = 16
#: A mask fill at or below this is absorbing in fp32: ``score + fill == fill`` for any |score| < 1e30.
ABSORBING_FILL = -1e37


@dataclass(frozen=True)
class _Fusable:
    """One slot's attention as the fused ops need it (matched structurally, see ``check_slot``)."""

    q_BSE: ir.Value  # queries before rotary, [B,S,H*D] (or [B,S,H,D] when ``q_needs_flat``)
    k_BSE: ir.Value  # new keys before rotary, [B,S,KVH*D] (or 4-D when ``k_needs_flat``)
    v_BSE: ir.Value  # new values [B,S,KVH*D]
    q_needs_flat: bool
    k_needs_flat: bool
    num_heads: int
    kv_heads: int
    head_dim: int
    positions: ir.Value  # position ids [B,S] int64, the rotary's source
    inv_freq: ir.Value  # [D/2] fp32 constant
    keep_B1ST: ir.Value  # bool mask: causal, padding, sliding window
    fill: float
    scale: float
    past_k: ir.Value
    past_v: ir.Value
    present_k: ir.Value
    present_v: ir.Value
    ctx: ir.Value  # [B,S,H*D], what o_proj reads


@dataclass(frozen=True)
class _Candidate:
    slot: CacheSlot
    found: _Fusable | str


def match_rope(cos: ir.Value, sin: ir.Value) -> tuple[ir.Value, ir.Value] | str:
    """``cos = Unsqueeze(Cos(Concat(f, f)), [1])``, sin alike on the same ``f = Mul(Unsqueeze(Cast(pos)), inv_freq)``
    with ``pos`` a graph input and ``inv_freq`` a constant -> (pos, inv_freq), or the reason."""
    freqs = []
    for v, op in ((cos, "Cos"), (sin, "Sin")):
        unsq = producer(v, "Unsqueeze")
        trig = producer(unsq.inputs[0] if unsq else None, op)
        cat = producer(trig.inputs[0] if trig else None, "Concat")
        if unsq is None or cat is None or const(unsq.inputs[1]) is None or const(unsq.inputs[1]).tolist() != [1]:  # type: ignore[union-attr]
            return f"rotary {op.lower()} is not Unsqueeze({op}(Concat(freqs, freqs)), 1)"
        if len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]:
            return "rotary angles are not Concat(freqs, freqs) (a partial or interleaved rotary)"
        freqs.append(cat.inputs[0])
    mul = producer(freqs[0], "Mul")
    if freqs[0] is not freqs[1] or mul is None:
        return "cos and sin are not of the same angles position * inv_freq"
    unsq = producer(mul.inputs[0], "Unsqueeze")
    cast = producer(unsq.inputs[0] if unsq else None, "Cast")
    pos, inv_freq = (cast.inputs[0] if cast else None), mul.inputs[1]
    if pos is None or not pos.is_graph_input() or inv_freq is None or const(inv_freq) is None:
        return "rotary angles are not float(position_ids input) * constant inv_freq"
    if attr_int(cast, "to", 0) != ir.DataType.FLOAT or const(inv_freq).ndim != 1:  # type: ignore[union-attr, arg-type]
        return "rotary angles are not computed in fp32 from a [D/2] inv_freq"
    return pos, inv_freq


def rope_table(g: ir.Graph, count: ir.Value, inv_freq: ir.Value, prefix: str) -> list[ir.Node]:
    """The nodes (not yet in ``g``) of cos/sin [count, D/2] = cos/sin(float(t) * inv_freq) for t in [0, count),
    ``count`` an int64 scalar: the last two nodes' outputs are cos and sin. The same fp32 products the exporter's
    rotary computes for position t, so the tables are bit-identical to its angles."""
    zero = small_initializer(g, f"{prefix}.zero", np.array(0, np.int64))
    one = small_initializer(g, f"{prefix}.one", np.array(1, np.int64))
    last = small_initializer(g, f"{prefix}.last", np.array([-1], np.int64))
    nodes = [node("Range", [zero, count, one], f"{prefix}/index")]
    nodes.append(node("Cast", [nodes[-1].outputs[0]], f"{prefix}/index_f", to=ir.DataType.FLOAT))
    nodes.append(node("Unsqueeze", [nodes[-1].outputs[0], last], f"{prefix}/index_col"))
    nodes.append(node("Mul", [nodes[-1].outputs[0], inv_freq], f"{prefix}/angles"))
    angles = nodes[-1].outputs[0]
    return [*nodes, node("Cos", [angles], f"{prefix}/cos"), node("Sin", [angles], f"{prefix}/sin")]


def _flat_source(t_BHSD: ir.Value, n: int, D: int) -> tuple[ir.Value, bool] | None:
    """``Transpose(0,2,1,3)`` of x [B,S,n,D] -> (src, False) when x = Reshape(src, [0,0,n,D]) with src known to be
    3-D, else (x, True): x itself, to be flattened to [B,S,n*D] (Qwen3's per-head norm sits between)."""
    tr = producer(t_BHSD, "Transpose")
    if tr is None or tr.inputs[0] is None:
        return None
    x = tr.inputs[0]
    rs = producer(x, "Reshape")
    shape = const(rs.inputs[1]) if rs is not None else None
    src = rs.inputs[0] if rs is not None else None
    if src is not None and src.shape is not None and len(src.shape) == 3 and shape is not None:
        if shape.tolist() == [0, 0, n, D]:
            return src, False
    return x, True


def check_slot(past_k: ir.Value, past_v: ir.Value, present_k: ir.Value, present_v: ir.Value) -> _Fusable | str:
    """The exporter's attention of one cache slot (a layer, or a merged pair's wide attention) in the form the
    fused ops need, or the reason it cannot be fused."""
    att = check_attention(past_k, past_v, present_k, present_v)
    if isinstance(att, str):
        return f"attention is not the exporter's: {att}"
    if att.scores_cast is not None or att.probs_cast is not None:
        return "16-bit graph (softmax in fp32 by casts): not fused, only fp32 graphs are"
    mm = scores_matmul(present_k)
    q5 = producer(mm.inputs[0] if mm else None, "Reshape")
    shape = const(q5.inputs[1]) if q5 is not None else None
    if q5 is None or q5.inputs[0] is None or shape is None or len(shape) != 5 or shape[3] != -1:
        return "queries are not viewed as [B, KVH, G, -1, D] by a constant Reshape"
    kvh, g, D = (int(x) for x in (shape[1], shape[2], shape[4]))
    if D % HEAD_SIZE_MULTIPLE:
        return f"head_dim {D} is not a multiple of {HEAD_SIZE_MULTIPLE} (GroupQueryAttention's CPU kernel)"
    cat_k = producer(present_k, "Concat")
    rot_q, rot_k = match_rotary(q5.inputs[0]), match_rotary(cat_k.inputs[1]) if cat_k and cat_k.inputs[1] else None
    if rot_q is None or rot_k is None:
        return "queries/keys are not rotary(t) (rotate-half form)"
    q_src, k_src = _flat_source(rot_q.t, kvh * g, D), _flat_source(rot_k.t, kvh, D)
    rope = match_rope(att.cos, att.sin)
    if q_src is None or k_src is None or isinstance(rope, str):
        return rope if isinstance(rope, str) else "queries/keys are not Transpose(0,2,1,3) of [B,S,n,D] heads"
    unsq = producer(att.keep, "Unsqueeze")
    keep = unsq.inputs[0] if unsq is not None and const(unsq.inputs[1]) is not None else None
    if keep is None or const(unsq.inputs[1]).tolist() != [1]:  # type: ignore[union-attr]
        return "the mask is not Unsqueeze(keep [B,1,S,T], 1)"
    fill, scale = scalar(att.fill), scalar(att.scale)
    if fill is None or scale is None or fill > ABSORBING_FILL:
        return f"the mask fill {fill} is not absorbing in fp32 (an additive bias would not reproduce it)"
    return _Fusable(
        q_src[0], k_src[0], att.v_lin, q_src[1], k_src[1], kvh * g, kvh, D, rope[0], rope[1], keep, fill, scale,
        past_k, past_v, present_k, present_v, att.ctx,
    )  # fmt: skip


class FuseGroupQueryAttentionPass(RewritePass[_Candidate]):
    """Replace each cache slot's attention (a layer's, or a merged pair's wide one) with ONNX Runtime's fused ops.

    Pattern, per slot (H query / KVH key-value heads; 2H / 2·KVH for a merged pair; q/k/v [B,S,n·D])::

        ctx, present_k, present_v = Attn(rot(q), rot(k), v; past_k, past_v, keep, scale)   (exporter's form)
            ==>
        ctx, present_k, present_v = GroupQueryAttention(
            RotaryEmbedding(q, position_ids, cos_cache, sin_cache), RotaryEmbedding(k, ...), v, past_k, past_v,
            seqlens_k = T-1 (every row), total_sequence_length = T, attention_bias = Where(keep, 0, fill),
            causal=1, do_rotary=0, scale)

    where ``keep`` is only causal & padding (no sliding window: ``padding_only``), the bias is the padding alone,
    ``Where(pad [B,1,1,T], zeros [S,1], fill)``: causal=1 with seqlens_k = T-1 drops exactly the keys the causal
    term did (query i sees cache indices <= T-S+i), so the function is the same and the exporter's causal chain
    is dead (20 fewer nodes on SmolLM2; GQA takes no bias broadcast over S, hence the zeros).

    with ``cos_cache[p] = cos(p * inv_freq)`` for p in [0, max(position_ids)] — the same fp32 products the
    exporter's rotary computes per token (``gqa_packed_rotary.py`` may then move the rotary into GQA). Why this
    form (measured on onnxruntime 1.32's CPU kernels): the whole mask (causal, padding, window) as an additive
    bias reproduces the exporter's ``Where(keep, scores, fill)`` on every row that keeps a key; ``causal=1`` on
    top changes nothing there (the bias already drops those keys) and is the kernel's fast path (decode at
    int4: 1.12x the whole model's speed over ``causal=0``, paired rounds). Rows that keep no key at all (left
    padding's query rows) differ: the exporter averages all T values, GQA the first s+1; nothing reads them (their
    logits and their cache entries sit at positions every later step masks; validation compares neither).
    ``seqlens_k = T-1`` for every row makes the present ``Concat(past, new)`` (BNSH), as the exporter's. GQA's
    own rotary is not used here: it rotates at cache index, not position_ids (see ``gqa_packed_rotary.py``).
    Qwen3's per-head q/k norm stays outside (a merged pair has two scales).

    Must not fire when: the slot's attention is not the exporter's form (``merge_attention.check_attention``);
    the graph is 16-bit (softmax casts); head_dim is not a multiple of 16; rotary is not rotate-half of
    angles ``float(position_ids) * inv_freq``; the mask fill is not absorbing (> -1e37). The reason is kept
    per slot in ``slot_outcomes`` (and ``rejections``).

    Invariant: same function under ONNX Runtime (max abs 1e-6-level fp32 differences, summation order); graph
    inputs/outputs unchanged (names, order, dims). Fires once per cache slot. ONNX Runtime only (contrib ops);
    known kernel limit: a multi-token step on top of a cache needs batch 1.
    """

    name = "fuse_group_query_attention"

    def __init__(self, spec: IOSpec) -> None:
        super().__init__()
        self.spec = spec
        self.slot_outcomes: dict[str, str] = {}
        self._shared: dict[tuple[int, ...], ir.Value] = {}
        self._nodes: list[ir.Node] = []
        #: names of the activations the fused attentions' own q/k/v MatMuls read (a merged pair's are one wide
        #: MatMul already): what ``to_ort`` packs into one QKV MatMul, and nothing else.
        self.attention_inputs: set[str] = set()

    def start(self, model: ir.Model) -> None:
        self.slot_outcomes, self._shared, self.attention_inputs = {}, {}, set()

    def pattern(self, model: ir.Model) -> Iterator[_Candidate]:
        inputs = {v.name: v for v in model.graph.inputs}
        outputs = {v.name: v for v in model.graph.outputs}
        for s in self.spec.slots:
            names = (s.past_key, s.past_value, s.present_key, s.present_value)
            values = [inputs.get(n) if n.startswith("past") else outputs.get(n) for n in names]
            if any(v is None for v in values):
                yield _Candidate(s, f"cache slot {s.tag} is not in the graph's inputs/outputs")
                continue
            pk, pv, ok, ov = values
            assert pk is not None and pv is not None and ok is not None and ov is not None
            yield _Candidate(s, check_slot(pk, pv, ok, ov))

    def check(self, model: ir.Model, candidate: _Candidate) -> str | None:
        return candidate.found if isinstance(candidate.found, str) else None

    def describe(self, candidate: _Candidate) -> str:
        return f"slot {candidate.slot.tag}"

    def rejected(self, candidate: _Candidate, reason: str) -> None:
        self.slot_outcomes[candidate.slot.tag] = reason

    def rewrite(self, model: ir.Model, candidate: _Candidate) -> None:
        f = candidate.found
        assert not isinstance(f, str)  # check
        g, p = model.graph, f"ort_attn_{candidate.slot.tag}"
        self._nodes = []
        cos_cache, sin_cache = self._rope_cache(g, f)
        seqlens_k, total, bias = self._mask_inputs(g, f)
        q = self._flat(g, f.q_BSE, f.q_needs_flat, f"{p}/q_flat")
        k = self._flat(g, f.k_BSE, f.k_needs_flat, f"{p}/k_flat")
        rope = [f.positions, cos_cache, sin_cache]
        q_rot = self._ms(f"{p}/q_rotary", "RotaryEmbedding", [q, *rope], 1, num_heads=f.num_heads, interleaved=0)
        k_rot = self._ms(f"{p}/k_rotary", "RotaryEmbedding", [k, *rope], 1, num_heads=f.kv_heads, interleaved=0)
        gqa_inputs = [q_rot[0], k_rot[0], f.v_BSE, f.past_k, f.past_v, seqlens_k, total, None, None, None, bias]
        attrs = dict(num_heads=f.num_heads, kv_num_heads=f.kv_heads, scale=f.scale, causal=1, do_rotary=0)
        ctx, present_k, present_v = self._ms(f"{p}/gqa", "GroupQueryAttention", gqa_inputs, 3, **attrs)
        D = f.head_dim
        for v, n in ((q_rot[0], f.num_heads), (k_rot[0], f.kv_heads), (ctx, f.num_heads)):
            # ONNX shape inference does not know contrib ops: [batch, sequence] are input_ids' (token-wise graph)
            v.type, v.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([BATCH, SEQ, n * D])
        g.extend(self._nodes)
        f.ctx.replace_all_uses_with(ctx)
        replace_value(g, f.present_k, present_k)
        replace_value(g, f.present_v, present_v)
        self.slot_outcomes[candidate.slot.tag] = FIRED
        x = _projection_input(f.v_BSE)
        if x is not None and x.name:
            self.attention_inputs.add(x.name)

    def finish(self, model: ir.Model) -> None:
        """The replaced attentions (and the shared cos/sin and masks they alone read) are dead: remove them."""
        if self.fired:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            model.graph.opset_imports.setdefault(MS_DOMAIN, 1)
            common.RemoveUnusedNodesPass()(model)
            model.graph.sort()

    def _ms(self, name: str, op: str, inputs: list[ir.Value | None], n_out: int, **attrs: object) -> list[ir.Value]:
        """A com.microsoft node, added with the slot's other new nodes."""
        attributes = [ir.convenience.convert_attribute(k, v) for k, v in attrs.items()]  # type: ignore[arg-type]
        n = ir.Node(MS_DOMAIN, op, inputs, attributes=attributes, num_outputs=n_out, name=name)
        for i, out in enumerate(n.outputs):
            out.name = name if n_out == 1 else f"{name}_{i}"
        self._nodes.append(n)
        return list(n.outputs)

    def _op(self, name: str, op: str, inputs: list[ir.Value | None], **attrs: Any) -> ir.Value:
        self._nodes.append(node(op, inputs, name, **attrs))
        return self._nodes[-1].outputs[0]

    def _flat(self, g: ir.Graph, x: ir.Value, needs_flat: bool, name: str) -> ir.Value:
        """[B,S,n,D] -> [B,S,n*D] where needed."""
        return self._op(name, "Reshape", [x, self._ints(g, "flat", 0, 0, -1)]) if needs_flat else x

    def _ints(self, g: ir.Graph, name: str, *values: int) -> ir.Value:
        key = (0, *values)
        if key not in self._shared:
            self._shared[key] = small_initializer(g, f"ort_attn.{name}", np.array(values, np.int64))
        return self._shared[key]

    def _rope_cache(self, g: ir.Graph, f: _Fusable) -> tuple[ir.Value, ir.Value]:
        """cos/sin [max(position_ids)+1, D/2] = cos/sin(float(p) * inv_freq), built once per graph (and inv_freq)."""
        key = (1, id(f.positions), id(f.inv_freq))
        if key not in self._shared:
            p = f"ort_rope_{len(self._shared)}"
            one = small_initializer(g, "ort_attn.one", np.array(1, np.int64))
            top = self._op(f"{p}/max", "ReduceMax", [f.positions], keepdims=0)
            table = rope_table(g, self._op(f"{p}/n", "Add", [top, one]), f.inv_freq, p)
            self._nodes += table
            self._shared[key] = table[-2].outputs[0]
            self._shared[(2, *key[1:])] = table[-1].outputs[0]
        return self._shared[key], self._shared[(2, *key[1:])]

    def _mask_inputs(self, g: ir.Graph, f: _Fusable) -> tuple[ir.Value, ir.Value, ir.Value]:
        """seqlens_k [B] = T-1 (int32), total_sequence_length = T (int32 scalar), bias [B,1,S,T]: once per distinct
        mask (and fill). T and B are read off ``attention_mask`` itself: a Shape of ``keep`` would keep its whole
        computation alive. The bias is ``Where(keep, 0, fill)``, or, where ``keep`` is only causal & padding (no
        sliding window), ``Where(padding [B,1,1,T], zeros [S,1], fill)``: causal=1 drops the rest (docstring of
        the pass), and the exporter's causal chain (about 15 nodes, ~0.2 ms of a 2-core decode step) is dead."""
        key = (3, id(f.keep_B1ST), int(np.float32(f.fill).view(np.int32)))
        if key not in self._shared:
            p, names = f"ort_mask_{len(self._shared)}", self.spec.input_names
            inputs = {v.name: v for v in g.inputs}
            ids, mask = inputs[names[0]], inputs[names[1]]
            zero = small_initializer(g, "ort_attn.bias_zero", np.array(0.0, np.float32))
            fill = small_initializer(g, "ort_attn.bias_fill", np.array(f.fill, np.float32))
            pad = padding_only(f.keep_B1ST, mask)
            if pad is None:
                bias = self._op(f"{p}/bias", "Where", [f.keep_B1ST, zero, fill])
            else:
                S = self._op(f"{p}/S", "Shape", [ids], start=1, end=2)
                S1 = self._op(f"{p}/S1", "Concat", [S, self._ints(g, "one", 1)], axis=0)
                zeros = self._op(f"{p}/zeros", "ConstantOfShape", [S1], value=ir.tensor(np.zeros(1, np.float32)))
                bias = self._op(f"{p}/bias", "Where", [pad, zeros, fill])  # [B,1,1,T] x [S,1] -> [B,1,S,T]
            T = self._op(f"{p}/T", "Shape", [mask], start=1, end=2)
            B = self._op(f"{p}/B", "Shape", [mask], start=0, end=1)
            T32 = self._op(f"{p}/T32", "Cast", [T], to=ir.DataType.INT32)
            total = self._op(f"{p}/total", "Squeeze", [T32])
            last = self._op(f"{p}/last", "Sub", [T32, small_initializer(g, "ort_attn.one32", np.array([1], np.int32))])
            seqlens = self._op(f"{p}/seqlens_k", "Expand", [last, B])
            self._shared[key] = bias
            self._shared[(4, *key[1:])] = seqlens
            self._shared[(5, *key[1:])] = total
        return self._shared[(4, *key[1:])], self._shared[(5, *key[1:])], self._shared[key]


def padding_only(keep_B1ST: ir.Value, attention_mask: ir.Value) -> ir.Value | None:
    """``pad`` [B,1,1,T] when ``keep = And(Unsqueeze(LessOrEqual(k_idx, q_idx), [0,1]), pad)`` with ``pad =
    Unsqueeze(Cast(attention_mask, bool), [1,2])`` — the exporter's mask of a model without sliding windows
    (``onnx_graph.masks``) — else None (a window's ``Less`` term, or any other form, keeps the whole mask)."""
    both = producer(keep_B1ST, "And")
    if both is None:
        return None
    for c, pad in ((both.inputs[0], both.inputs[1]), (both.inputs[1], both.inputs[0])):
        causal, unsq = producer(c, "Unsqueeze"), producer(pad, "Unsqueeze")
        cast = producer(unsq.inputs[0], "Cast") if unsq is not None else None
        if causal is None or producer(causal.inputs[0], "LessOrEqual") is None or cast is None:
            continue
        if cast.inputs[0] is attention_mask and attr_int(cast, "to", 0) == ir.DataType.BOOL:
            return pad
    return None


def _projection_input(v: ir.Value) -> ir.Value | None:
    """``x`` of ``v = x @ W`` or ``v = x @ W + b``; None when ``v`` is not a projection's own output."""
    mm = producer(v, "MatMul")
    add = producer(v, "Add")
    if mm is None and add is not None:  # a biased projection (Qwen2): x @ W + b, either operand order
        mm = next((m for m in (producer(i, "MatMul") for i in add.inputs) if m is not None), None)
    return mm.inputs[0] if mm is not None else None
