"""MergeAttentionPass: a pair's two attention sub-graphs become one attention over 2H / 2·KVH heads."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from layerpair.arch import ArchSpec
from layerpair.graph_passes.base import (
    FIRED,
    INT64_MAX,
    GraphPassError,
    RewritePass,
    attr_int,
    attr_ints,
    const,
    consumers_of,
    node,
    producer,
    scalar,
    small_initializer,
)
from layerpair.graph_passes.patterns import Rotary, UnitRMSNorm, match_rmsnorm, match_rotary
from layerpair.iospec import IOSpec


@dataclass(frozen=True)
class _Norm:
    unit: UnitRMSNorm  # its eps, casts (16-bit graphs compute it in fp32) and constants
    scale: ir.Value | None  # [D] per-head scale (Qwen3 q_norm / k_norm)

    @property
    def key(self) -> tuple[float, int | None, int | None, bool]:
        return (self.unit.eps, self.unit.compute_cast, self.unit.out_cast, self.scale is None)


@dataclass(frozen=True)
class _Attention:
    """What one branch's attention reads and produces (matched structurally, see ``match_attention``)."""

    q_lin: ir.Value  # [B,S,H*D]
    k_lin: ir.Value  # [B,S,KVH*D]
    v_lin: ir.Value  # [B,S,KVH*D]
    q_norm: _Norm | None
    k_norm: _Norm | None
    cos: ir.Value  # [B,1,S,D]
    sin: ir.Value
    scale: ir.Value  # scalar
    keep: ir.Value  # bool mask, broadcastable to [B,KVH,G,S,T]
    fill: ir.Value  # scalar written where keep is false
    ctx: ir.Value  # [B,S,H*D], the input of o_proj
    scores_cast: int | None  # 16-bit graphs: scores cast to fp32 before masking ...
    probs_cast: int | None  # ... and probabilities cast back after the softmax
    past_k: ir.Value
    past_v: ir.Value
    present_k: ir.Value
    present_v: ir.Value


def _heads_from(t: ir.Value | None) -> tuple[ir.Value, _Norm | None] | None:
    """``Transpose(0,2,1,3)`` of ``Reshape(lin)`` or of ``RMSNorm(Reshape(lin))`` -> (lin, norm)."""
    tr = producer(t, "Transpose")
    if tr is None or attr_ints(tr, "perm") != (0, 2, 1, 3):
        return None
    src = tr.inputs[0]
    norm = None
    rms = match_rmsnorm(src) if src is not None else None
    if rms is not None:
        norm = _Norm(rms.unit, rms.scale)
        src = rms.unit.x
    rs = producer(src, "Reshape")
    if rs is None or rs.inputs[0] is None:
        return None
    return rs.inputs[0], norm


def match_attention(past_k: ir.Value, past_v: ir.Value, present_k: ir.Value, present_v: ir.Value) -> _Attention | None:
    """``check_attention``, None instead of the reason when it does not match."""
    found = check_attention(past_k, past_v, present_k, present_v)
    return found if isinstance(found, _Attention) else None


def check_attention(past_k: ir.Value, past_v: ir.Value, present_k: ir.Value, present_v: ir.Value) -> _Attention | str:
    """Match the exporter's decomposed attention of one layer from its cache inputs and outputs; the reason
    (a string) when it does not match.

    ``present = Concat(past, new, axis=2)``; scores ``= (Reshape(rot(q)) @ Transpose(Unsqueeze(present_k)))
    * scale``, masked by ``Where(keep, scores, fill)``, ``Softmax``, ``@ Unsqueeze(present_v)``, then
    Reshape/Transpose/Reshape to the context that o_proj reads. The checks run cache -> scores -> queries, so
    the reason names the first part that differs.
    """
    kv = _check_new_kv(past_k, past_v, present_k, present_v)
    if isinstance(kv, str):
        return kv
    rot_k, (k_lin, k_norm), (v_lin, _) = kv
    sc = _check_scores(present_k, present_v)
    if isinstance(sc, str):
        return sc
    q5 = producer(sc.matmul.inputs[0], "Reshape")
    rot_q = match_rotary(q5.inputs[0]) if q5 is not None and q5.inputs[0] is not None else None
    q_src = _heads_from(rot_q.t) if rot_q else None
    if rot_q is None or q_src is None or rot_q.cos is not rot_k.cos or rot_q.sin is not rot_k.sin:
        return "queries are not rotary(heads(q)) with the keys' cos/sin"
    keep, fill = sc.where.inputs[0], sc.where.inputs[2]
    if keep is None or fill is None or sc.scale is None or scalar(fill) is None:
        return "the mask fill value is not a constant scalar"
    return _Attention(
        q_lin=q_src[0],
        k_lin=k_lin,
        v_lin=v_lin,
        q_norm=q_src[1],
        k_norm=k_norm,
        cos=rot_q.cos,
        sin=rot_q.sin,
        scale=sc.scale,
        keep=keep,
        fill=fill,
        ctx=sc.ctx,
        scores_cast=attr_int(sc.cast_in, "to", 0) if sc.cast_in else None,
        probs_cast=attr_int(sc.cast_out, "to", 0) if sc.cast_out else None,
        past_k=past_k,
        past_v=past_v,
        present_k=present_k,
        present_v=present_v,
    )


def _check_new_kv(
    past_k: ir.Value, past_v: ir.Value, present_k: ir.Value, present_v: ir.Value
) -> tuple[Rotary, tuple[ir.Value, _Norm | None], tuple[ir.Value, _Norm | None]] | str:
    """The cache half: ``present = Concat(past, new, axis=2)`` with new keys ``rotary(heads(k_lin))`` and new
    values ``heads(v_lin)`` (no norm on v) -> (the keys' rotary, (k_lin, k norm), (v_lin, None)), or the reason."""
    cat_k, cat_v = producer(present_k, "Concat"), producer(present_v, "Concat")
    if cat_k is None or cat_v is None or attr_int(cat_k, "axis", 0) != 2 or attr_int(cat_v, "axis", 0) != 2:
        return f"present '{present_k.name}' is not Concat(past, new, axis=2)"
    if list(cat_k.inputs)[:1] != [past_k] or list(cat_v.inputs)[:1] != [past_v] or len(cat_k.inputs) != 2:
        return f"present '{present_k.name}' does not extend its own past '{past_k.name}'"
    rot_k = match_rotary(cat_k.inputs[1]) if cat_k.inputs[1] is not None else None
    k_src = _heads_from(rot_k.t) if rot_k else None
    v_src = _heads_from(cat_v.inputs[1])
    if rot_k is None or k_src is None or v_src is None or v_src[1] is not None:
        return f"new keys/values of '{present_k.name}' are not rotary(heads(k)) / heads(v)"
    return rot_k, k_src, v_src


@dataclass(frozen=True)
class _Scores:
    """The scores-to-context chain of one attention, from its scores MatMul to the context o_proj reads."""

    matmul: ir.Node  # q5 [B,KVH,G,S,D] @ kT [B,KVH,1,D,T]
    scale: ir.Value | None  # scalar the scores are multiplied by
    cast_in: ir.Node | None  # 16-bit graphs: Cast of the scaled scores to fp32 ...
    where: ir.Node  # Where(keep, scores, fill)
    cast_out: ir.Node | None  # ... and of the probabilities back
    ctx: ir.Value  # [B,S,H*D]


def _check_scores(present_k: ir.Value, present_v: ir.Value) -> _Scores | str:
    """``MatMul(q5, kT) -> Mul(scale) -> [Cast] -> Where(mask) -> Softmax(-1) -> [Cast] -> MatMul(V) ->
    Reshape -> Transpose(0,2,1,3) -> Reshape``, every edge single-use, reading ``present_k`` / ``present_v``;
    or the reason it is not."""
    scores_mm = scores_matmul(present_k)
    if scores_mm is None:
        return f"no scores MatMul q @ Transpose(Unsqueeze('{present_k.name}'))"
    chain = _single_chain(
        scores_mm.outputs[0], ["Mul", "Cast?", "Where", "Softmax", "Cast?", "MatMul", "Reshape", "Transpose", "Reshape"]
    )
    if chain is None:
        return "scores are not Mul(scale) -> Where(mask) -> Softmax -> MatMul(V) -> context, single-use"
    mul, cast_in, where, softmax, cast_out, pv_mm, _, tr2, rs2 = chain
    assert mul is not None and where is not None and softmax is not None and pv_mm is not None
    assert tr2 is not None and rs2 is not None
    scale = mul.inputs[1] if mul.inputs[0] is scores_mm.outputs[0] else mul.inputs[0]
    if scalar(scale) is None or where.inputs[1] is not (cast_in or mul).outputs[0]:
        return "the attention scale is not a constant scalar, or the mask does not read the scaled scores"
    if attr_int(softmax, "axis", -1) != -1 or pv_mm.inputs[0] is not (cast_out or softmax).outputs[0]:
        return "softmax is not over the last axis, or its probabilities are not what multiplies V"
    if attr_ints(tr2, "perm") != (0, 2, 1, 3):
        return "the context is not transposed back with perm (0, 2, 1, 3)"
    unsq_v = producer(pv_mm.inputs[1], "Unsqueeze")
    if unsq_v is None or unsq_v.inputs[0] is not present_v or (const(unsq_v.inputs[1]) is None):
        return f"the probabilities do not multiply Unsqueeze('{present_v.name}')"
    return _Scores(scores_mm, scale, cast_in, where, cast_out, rs2.outputs[0])


def scores_matmul(present_k: ir.Value) -> ir.Node | None:
    """``present_k -> Unsqueeze(2) -> Transpose(0,1,2,4,3) -> MatMul(q5, kT)``: the scores MatMul, or None."""
    scores_mm = None
    for u in consumers_of(present_k):
        if u.op_type == "Unsqueeze" and (const(u.inputs[1]) is not None) and const(u.inputs[1]).tolist() == [2]:  # type: ignore[union-attr]
            for tr in consumers_of(u.outputs[0]):
                if tr.op_type == "Transpose" and attr_ints(tr, "perm") == (0, 1, 2, 4, 3):
                    for mm in consumers_of(tr.outputs[0]):
                        if mm.op_type == "MatMul" and mm.inputs[1] is tr.outputs[0]:
                            scores_mm = mm
    return scores_mm


def _single_chain(v: ir.Value, ops: Sequence[str]) -> list[ir.Node | None] | None:
    """Follow single-consumer edges through ``ops`` in order; ``"Op?"`` is optional (None when absent)."""
    out: list[ir.Node | None] = []
    for op in ops:
        users = consumers_of(v)
        optional = op.endswith("?")
        if len(users) != 1 or v.is_graph_output():
            return None
        if users[0].op_type != op.rstrip("?"):
            if optional:
                out.append(None)
                continue
            return None
        out.append(users[0])
        v = users[0].outputs[0]
    return out


@dataclass(frozen=True)
class _Pair:
    """A pair's two attentions as matched (a's, then b's), or why a branch does not match."""

    pair: tuple[int, int]
    branches: tuple[_Attention, _Attention] | str


class MergeAttentionPass(RewritePass[_Pair]):
    """Merge a pair's attentions into one wide attention.

    Pattern, for pair (a, b) sharing positions (cos, sin), mask (keep, fill) and scale::

        ctx_a = Attn(q_a, k_a, v_a; past_a),  ctx_b = Attn(q_b, k_b, v_b; past_b)
            ==>
        [ctx_a | ctx_b] = Attn([q_a | q_b], [k_a | k_b], [v_a | v_b]; past_ab)   over 2H / 2·KVH heads

    Heads of a come first, then heads of b, for q and for k/v, so the grouped-query map q-head h ->
    kv-head h // G is the same on the wide tensors. Rotary runs once on the wide q and k; Qwen3's q/k norm
    runs per head with each branch's scale (a [2,1,D] scale on a [B,S,2,H,D] view — no weight copied).
    The cache slot becomes ``past_key_values.{a}_{b}.key|value`` / ``present.{a}_{b}.key|value`` with
    2·KVH heads, at the position of a's slot (see ``layerpair.iospec``). The wide q/k/v are Concats of the
    branch projections, which ``MergeSiblingMatMulsPass`` then turns into one QKV MatMul; the per-branch
    contexts are a Split that ``MergeReducingMatMulsPass`` folds into one o_proj.

    Must not fire when: either branch does not match the exporter's attention structure; the branches use
    different cos/sin, mask, fill or scale (e.g. different sliding windows); q/k norm on one branch only or
    with different eps; one branch reads the other's result (sequential layers). The pass then leaves the
    pair alone and records why in ``pair_outcomes`` (and ``rejections``); ``merge_pairs`` fails with that reason.

    Pattern (``pattern``): per requested pair, each branch's attention matched from its cache inputs/outputs
    (``check_attention``, widths the config's), or the first reason a branch does not match. Check (``check``):
    that reason, else why the two cannot share one attention. Rewrite (``rewrite``): the wide attention.

    Invariant: same function; parameter count unchanged. Fires once per merged pair.
    """

    name = "merge_attention"
    per_pair = True

    def __init__(self, arch: ArchSpec, pairs: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        self.arch = arch
        self.pairs = tuple(pairs)

    def pattern(self, model: ir.Model) -> Iterator[_Pair]:
        for a, b in self.pairs:
            yield _Pair((a, b), self._match_branches(model.graph, a, b))

    def check(self, model: ir.Model, candidate: _Pair) -> str | None:
        if isinstance(candidate.branches, str):
            return candidate.branches
        A, B = candidate.branches
        why = _incompatibility(A, B)
        if why is not None:
            return f"the branches differ: {why}"
        if not _independent(A, B):
            a, b = candidate.pair
            return f"layer {b} reads layer {a}'s attention result (sequential layers, not a pair)"
        return None

    def describe(self, candidate: _Pair) -> str:
        return f"pair {candidate.pair[0]}-{candidate.pair[1]}"

    def rejected(self, candidate: _Pair, reason: str) -> None:
        self.pair_outcomes[candidate.pair] = reason

    def rewrite(self, model: ir.Model, candidate: _Pair) -> None:
        assert not isinstance(candidate.branches, str)  # check
        merged = IOSpec.for_model(self.arch, self.pairs, merged=True)
        slot = next(s for s in merged.slots if s.layers == candidate.pair)
        dims = {t.name: t.dims for t in [*merged.inputs, *merged.outputs]}  # the one I/O spec's dims
        A, B = candidate.branches
        self._merge(model.graph, A, B, slot.past_key, slot.past_value, slot.present_key, slot.present_value, dims)
        self.pair_outcomes[candidate.pair] = FIRED

    def _match_branches(self, graph: ir.Graph, a: int, b: int) -> tuple[_Attention, _Attention] | str:
        """Both branches' attentions, matched, or the reason one does not match."""
        slots = {s.layers[0]: s for s in IOSpec.for_model(self.arch, (), merged=False).slots}
        inputs = {v.name: v for v in graph.inputs}
        outputs = {v.name: v for v in graph.outputs}
        att: list[_Attention] = []
        for i in (a, b):
            s = slots[i]
            missing = [n for n in (s.past_key, s.past_value) if n not in inputs]
            missing += [n for n in (s.present_key, s.present_value) if n not in outputs]
            if missing:
                return f"layer {i}: cache {', '.join(missing)} not in the graph's inputs/outputs"
            found = check_attention(
                inputs[s.past_key], inputs[s.past_value], outputs[s.present_key], outputs[s.present_value]
            )
            if isinstance(found, str):
                return f"layer {i}: attention does not match: {found}"
            if not _widths_ok(found, self.arch):
                return f"layer {i}: q/k/v projection widths are not the config's"
            att.append(found)
        return att[0], att[1]

    def _merge(
        self,
        graph: ir.Graph,
        A: _Attention,
        B: _Attention,
        past_k_name: str,
        past_v_name: str,
        present_k_name: str,
        present_v_name: str,
        dims: dict[str, tuple[int | str, ...]],
    ) -> None:
        """Build one attention over both branches' heads beside the two, then rewire o_proj, the graph outputs
        and inputs to it; the branch attentions, left dead, are removed. Node and constant names and their order
        are part of the exported file (byte-identical exports), so the builders run in a fixed order."""
        arch = self.arch
        e = _Emitter(graph, f"lp_attn_{past_k_name}")
        H, KVH, D = arch.num_heads, arch.num_kv_heads, arch.head_dim
        q_B2HSD = _wide_heads(e, A.q_lin, B.q_lin, H, D, A.q_norm, B.q_norm, "q")
        k_B2KSD = _wide_heads(e, A.k_lin, B.k_lin, KVH, D, A.k_norm, B.k_norm, "k")
        v_B2KSD = _wide_heads(e, A.v_lin, B.v_lin, KVH, D, None, None, "v")
        q_rot = _rotary(e, q_B2HSD, A.cos, A.sin, D, "q")
        k_rot = _rotary(e, k_B2KSD, A.cos, A.sin, D, "k")

        dtype = A.past_k.dtype or ir.DataType.FLOAT
        past_k, past_v = _cache_input(past_k_name, dtype, dims), _cache_input(past_v_name, dtype, dims)
        present_k = e.op("Concat", [past_k, k_rot], "present_k", axis=2)  # [B,2KVH,T,D]
        present_v = e.op("Concat", [past_v, v_B2KSD], "present_v", axis=2)
        for v, name in ((present_k, present_k_name), (present_v, present_v_name)):
            v.name, v.shape, v.type = name, ir.Shape(list(dims[name])), ir.TensorType(dtype)

        ctx_a, ctx_b = _grouped_attention(e, arch, q_rot, present_k, present_v, A)
        graph.extend(e.nodes)
        _rewire_outputs(graph, A, B, ctx_a, ctx_b, present_k, present_v)
        _rewire_inputs(graph, A, B, past_k, past_v)


class _Emitter:
    """Collects the wide attention's nodes (named ``{prefix}/{suffix}``, added to the graph together at the end)
    and creates its small constants (initializers ``{prefix}.{suffix}``), in call order."""

    def __init__(self, graph: ir.Graph, prefix: str) -> None:
        self.graph, self.prefix = graph, prefix
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], suffix: str, **attrs: Any) -> ir.Value:
        """One node; its first output."""
        return self.node(op_type, inputs, suffix, **attrs).outputs[0]

    def node(self, op_type: str, inputs: Sequence[ir.Value | None], suffix: str, **attrs: Any) -> ir.Node:
        self.nodes.append(node(op_type, inputs, f"{self.prefix}/{suffix}", **attrs))
        return self.nodes[-1]

    def ints(self, suffix: str, *values: int) -> ir.Value:
        """A 1-D int64 constant (shapes, axes, slice bounds)."""
        return small_initializer(self.graph, f"{self.prefix}.{suffix}", np.array(values, np.int64))


def _wide_heads(
    e: _Emitter, lin_a: ir.Value, lin_b: ir.Value, n: int, D: int, na: _Norm | None, nb: _Norm | None, s: str
) -> ir.Value:
    """Both branches' projections [B,S,n*D] as one head tensor [B,2n,S,D], a's heads first (so the grouped-query
    map q-head h -> kv-head h // G holds on the wide tensors); with q/k norm, each branch's own scale."""
    wide = e.op("Concat", [lin_a, lin_b], f"{s}_wide", axis=-1)  # [B,S,2*n*D]
    if na is not None and nb is not None:
        wide = _per_head_rmsnorm(e, wide, n, D, na, nb, s)  # [B,S,2,n,D]
    x_BS2nD = e.op("Reshape", [wide, e.ints(f"{s}_shape", 0, 0, 2 * n, D)], f"{s}_heads")
    return e.op("Transpose", [x_BS2nD], f"{s}_t", perm=[0, 2, 1, 3])  # [B,2n,S,D]


def _per_head_rmsnorm(e: _Emitter, wide: ir.Value, n: int, D: int, na: _Norm, nb: _Norm, s: str) -> ir.Value:
    """Qwen3's per-head RMSNorm on both branches at once: a view [B,S,2,n,D] normalized over D and multiplied
    by a [2,1,D] scale stacked from the two branches' [D] scales. The ops, casts (16-bit graphs normalize in
    fp32) and constants are a's own norm's, which the pass checked equal to b's."""
    u = na.unit
    x_BS2nD = e.op("Reshape", [wide, e.ints(f"{s}_shape5", 0, 0, 2, n, D)], f"{s}_heads5")
    if u.compute_cast is not None:
        x_BS2nD = e.op("Cast", [x_BS2nD], f"{s}_up", to=u.compute_cast)
    sq = e.op("Pow", [x_BS2nD, u.two], f"{s}_sq")
    ms = e.op("ReduceMean", [sq, e.ints(f"{s}_axes", -1)], f"{s}_ms", keepdims=1)
    rms = e.op("Sqrt", [e.op("Add", [ms, u.eps_value], f"{s}_mse")], f"{s}_rms")
    xn = e.op("Mul", [x_BS2nD, e.op("Reciprocal", [rms], f"{s}_inv")], f"{s}_unit")
    if u.out_cast is not None:
        xn = e.op("Cast", [xn], f"{s}_down", to=u.out_cast)
    if na.scale is not None and nb.scale is not None:
        ga, gb = na.scale.const_value, nb.scale.const_value
        assert ga is not None and gb is not None
        g_21D = np.stack([ga.numpy().reshape(-1), gb.numpy().reshape(-1)])[:, None, :]
        xn = e.op("Mul", [xn, small_initializer(e.graph, f"{e.prefix}.{s}_norm_scale", g_21D)], f"{s}_scaled")
    return xn


def _rotary(e: _Emitter, t_BHSD: ir.Value, cos: ir.Value, sin: ir.Value, D: int, s: str) -> ir.Value:
    """``t * cos + rotate_half(t) * sin`` with ``rotate_half(t) = [-t[..., D/2:], t[..., :D/2]]``, once on the
    wide tensor with the branches' shared cos/sin [B,1,S,D]."""
    half = D // 2
    hi = e.op("Slice", [t_BHSD, e.ints(f"{s}_h", half), e.ints(f"{s}_end", INT64_MAX), e.ints(f"{s}_ax", 3)], f"{s}_hi")
    lo = e.op("Slice", [t_BHSD, e.ints(f"{s}_0", 0), e.ints(f"{s}_h2", half), e.ints(f"{s}_ax2", 3)], f"{s}_lo")
    rh = e.op("Concat", [e.op("Neg", [hi], f"{s}_neg"), lo], f"{s}_rot_half", axis=-1)
    return e.op("Add", [e.op("Mul", [t_BHSD, cos], f"{s}_cos"), e.op("Mul", [rh, sin], f"{s}_sin")], f"{s}_rot")


def _cache_input(name: str, dtype: ir.DataType, dims: dict[str, tuple[int | str, ...]]) -> ir.Value:
    """The wide slot's cache input [B,2KVH,P,D], dims from the one I/O spec."""
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(dims[name])))


def _grouped_attention(
    e: _Emitter, arch: ArchSpec, q_rot: ir.Value, present_k: ir.Value, present_v: ir.Value, A: _Attention
) -> tuple[ir.Value, ir.Value]:
    """Grouped-query attention on the wide tensors: q [B,2KVH,G,S,D] against K/V [B,2KVH,1,T,D], with the
    branches' shared scale, mask and fill and a's softmax casts; the context [B,S,2H*D] split back into the two
    branches' [B,S,H*D], which o_proj reads."""
    H2, KV2, D, G = 2 * arch.num_heads, 2 * arch.num_kv_heads, arch.head_dim, arch.num_groups
    two = e.ints("axis2", 2)
    q_BKGSD = e.op("Reshape", [q_rot, e.ints("q5_shape", 0, KV2, G, -1, D)], "q5")
    kT_BK1DT = e.op("Transpose", [e.op("Unsqueeze", [present_k, two], "k5")], "kT", perm=[0, 1, 2, 4, 3])
    scores = e.op("Mul", [e.op("MatMul", [q_BKGSD, kT_BK1DT], "qk"), A.scale], "scores")
    if A.scores_cast is not None:  # 16-bit graphs: mask and softmax in fp32, as the branches did
        scores = e.op("Cast", [scores], "scores_up", to=A.scores_cast)
    probs = e.op("Softmax", [e.op("Where", [A.keep, scores, A.fill], "masked")], "probs", axis=-1)
    if A.probs_cast is not None:
        probs = e.op("Cast", [probs], "probs_down", to=A.probs_cast)
    ctx_BKGSD = e.op("MatMul", [probs, e.op("Unsqueeze", [present_v, two], "v5")], "pv")
    ctx_B2HSD = e.op("Reshape", [ctx_BKGSD, e.ints("ctx4_shape", 0, H2, -1, D)], "ctx4")
    ctx_BS2HD = e.op("Transpose", [ctx_B2HSD], "ctx_t", perm=[0, 2, 1, 3])
    ctx = e.op("Reshape", [ctx_BS2HD, e.ints("ctx_shape", 0, 0, H2 * D)], "ctx")  # [B,S,2H*D]
    hd = arch.num_heads * D
    split = e.node("Split", [ctx, e.ints("ctx_split", hd, hd)], "ctx_split", num_outputs=2, axis=-1)
    ctx_a, ctx_b = split.outputs
    return ctx_a, ctx_b


def _rewire_outputs(
    graph: ir.Graph,
    A: _Attention,
    B: _Attention,
    ctx_a: ir.Value,
    ctx_b: ir.Value,
    present_k: ir.Value,
    present_v: ir.Value,
) -> None:
    """o_proj reads the wide context; the wide present takes a's output position and b's outputs go; the branch
    attentions, now unused, are removed."""
    A.ctx.replace_all_uses_with(ctx_a)
    B.ctx.replace_all_uses_with(ctx_b)
    outs = graph.outputs
    ia = list(outs).index(A.present_k)
    outs[ia], outs[ia + 1] = present_k, present_v
    for v in (B.present_k, B.present_v):
        outs.pop(list(outs).index(v))
    old = [
        n for v in (A.present_k, A.present_v, B.present_k, B.present_v, A.ctx, B.ctx) if (n := v.producer()) is not None
    ]
    _remove_dead_cone(graph, old)


def _rewire_inputs(graph: ir.Graph, A: _Attention, B: _Attention, past_k: ir.Value, past_v: ir.Value) -> None:
    """The wide past takes a's input position and b's inputs go. The exporter reads the batch size off a cache
    input (``Shape(past, 0, 1)``); batch, past length and head_dim are the same on the wide slot, only axis 1
    (heads) differs, so such Shape reads move to the wide input; any other use left is a bug."""
    for v, wide in ((A.past_k, past_k), (A.past_v, past_v), (B.past_k, past_k), (B.past_v, past_v)):
        for u in consumers_of(v):
            if u.op_type == "Shape" and 1 not in range(4)[slice(attr_int(u, "start", 0), _end(u))]:
                u.replace_input_with(0, wide)
        if v.uses():
            raise GraphPassError(
                f"cache input '{v.name}' is still used after merging its pair",
                "report this model and --pairs as a bug, or export with --no-merge",
            )
    ins = graph.inputs
    ja = list(ins).index(A.past_k)
    ins[ja], ins[ja + 1] = past_k, past_v
    for v in (B.past_k, B.past_v):
        ins.pop(list(ins).index(v))


def _widths_ok(att: _Attention, arch: ArchSpec) -> bool:
    """Projection widths, where the graph states them, are the ArchSpec's (H*D for q, KVH*D for k and v)."""
    for v, width in ((att.q_lin, arch.q_dim), (att.k_lin, arch.kv_dim), (att.v_lin, arch.kv_dim)):
        last = v.shape[-1] if v.shape is not None and len(v.shape) else None
        if isinstance(last, int) and last != width:
            return False
    return True


def _independent(A: _Attention, B: _Attention) -> bool:
    """Neither branch reads the other's result: merging sequential layers would create a cycle."""
    for first, second in ((A, B), (B, A)):
        seen: set[int] = set()
        stack = [v for v in (second.q_lin, second.k_lin, second.v_lin)]
        while stack:
            v = stack.pop()
            if v is first.ctx or v is first.present_k or v is first.present_v:
                return False
            n = v.producer()
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            stack.extend(x for x in n.inputs if x is not None)
    return True


def _end(shape_node: ir.Node) -> int | None:
    a = shape_node.attributes.get("end")
    return int(a.as_int()) if a is not None else None


def _incompatibility(A: _Attention, B: _Attention) -> str | None:
    """Why two branches cannot share one wide attention (None when they can)."""
    if A.cos is not B.cos or A.sin is not B.sin:
        return "different rotary cos/sin"
    if A.keep is not B.keep:
        return "different attention masks (e.g. different sliding windows)"
    if scalar(A.scale) != scalar(B.scale) or scalar(A.fill) != scalar(B.fill):
        return f"different attention scale or mask fill ({scalar(A.scale)} vs {scalar(B.scale)})"
    if (A.scores_cast, A.probs_cast) != (B.scores_cast, B.probs_cast):
        return "different softmax precision casts"
    for what, na, nb in (("q", A.q_norm, B.q_norm), ("k", A.k_norm, B.k_norm)):
        if (na is None) != (nb is None):
            return f"{what} norm on one branch only"
        if na is not None and nb is not None and na.key != nb.key:
            return f"different {what} norms (eps {na.unit.eps:g} vs {nb.unit.eps:g}, or casts)"
    return None


def _remove_dead_cone(graph: ir.Graph, roots: list[ir.Node]) -> None:
    """Remove ``roots`` and, transitively, the producers that only fed them (one reverse sweep: the graph
    is in topological order, the new nodes appended after it read only live values)."""
    cone: set[int] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if id(n) in cone or n.graph is not graph:
            continue
        cone.add(id(n))
        stack.extend(p for v in n.inputs if v is not None and (p := v.producer()) is not None)
    for n in reversed(list(graph)):
        if id(n) in cone and not any(o.uses() or o.is_graph_output() for o in n.outputs):
            inputs = list(n.inputs)
            graph.remove(n, safe=True)
            for v in inputs:
                if v is not None and v.name is not None and v.name in graph.initializers and not v.uses():
                    if not v.is_graph_output():
                        del graph.initializers[v.name]
