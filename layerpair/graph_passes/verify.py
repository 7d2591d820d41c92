"""``wide_pair_problems``: is a merged pair really one wide layer? Read from the graph's structure, per pair.

Starting at the pair's wide cache slot (``present.{a}_{b}.key|value``), it checks:

* attention heads: the query reshape is ``[0, 2·KVH, G, -1, D]`` (2·H query heads over 2·KVH cache heads);
* ``qkv``: the new q, k and v all come from ONE MatMul (walking back through non-MatMul nodes);
* ``o_proj``: the context is read by ONE MatMul;
* ``gate/up``: the norm of the attention residual ``h`` feeds ONE MatMul;
* ``down``: the gate/up result reaches ONE MatMul.

Forward walks do not cross a residual ``Add`` (two non-constant inputs), so they stay inside one block. The
problems name the pass that should have fired. Together with the attention pass these are the 6 MatMuls of a
wide pair (``MATMULS_SAVED_PER_PAIR`` = 18 - 6).
"""

from __future__ import annotations

import onnx_ir as ir

from layerpair.arch import ArchSpec
from layerpair.graph_passes.base import const, consumers_of, producer
from layerpair.graph_passes.merge_attention import scores_matmul
from layerpair.graph_passes.patterns import match_rotary
from layerpair.iospec import IOSpec

SIBLING = "merge_sibling_matmuls (after share_rmsnorm / fold_norm_scales)"
REDUCING = "merge_reducing_matmuls"


def _is_const(v: ir.Value | None) -> bool:
    return v is None or v.const_value is not None or producer(v, "Constant") is not None


def _matmuls_back(start: ir.Value | None) -> list[ir.Node]:
    """The first MatMuls met walking back from ``start`` through every non-constant input."""
    found: dict[int, ir.Node] = {}
    seen: set[int] = set()
    stack = [start]
    while stack:
        v = stack.pop()
        n = v.producer() if v is not None and not _is_const(v) else None
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if n.op_type == "MatMul":
            found[id(n)] = n
        else:
            stack.extend(n.inputs)
    return list(found.values())


def _matmuls_forward(start: ir.Value) -> list[ir.Node]:
    """The first MatMuls met walking forward from ``start``, not crossing a residual Add."""
    found: dict[int, ir.Node] = {}
    seen: set[int] = set()
    stack = consumers_of(start)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.op_type == "MatMul":
            found[id(n)] = n
        elif not (n.op_type == "Add" and not any(_is_const(x) for x in n.inputs)):
            stack.extend(u for o in n.outputs for u in consumers_of(o))
    return list(found.values())


def _residual_after(mm: ir.Node) -> ir.Value | None:
    """``h``: the output of the first residual Add (two non-constant inputs) after ``mm``."""
    v = mm.outputs[0]
    for _ in range(3):  # optional bias Add, then the residual Add
        users = consumers_of(v)
        if len(users) != 1 or users[0].op_type != "Add":
            return None
        if not any(_is_const(x) for x in users[0].inputs):
            return users[0].outputs[0]
        v = users[0].outputs[0]
    return None


def _one(what: str, mms: list[ir.Node], fix: str, problems: list[str]) -> ir.Node | None:
    if len(mms) == 1:
        return mms[0]
    problems.append(f"{what} is {len(mms)} MatMuls, not 1 ({fix} did not fire for this pair)")
    return None


def _context(scores_mm: ir.Node) -> ir.Value | None:
    """scores -> ... -> MatMul(V) -> Reshape -> Transpose -> Reshape: the wide context o_proj reads."""
    pv = next((m for m in _matmuls_forward(scores_mm.outputs[0])), None)
    v = pv.outputs[0] if pv is not None else None
    for op in ("Reshape", "Transpose", "Reshape"):
        users = consumers_of(v) if v is not None else []
        if len(users) != 1 or users[0].op_type != op:
            return None
        v = users[0].outputs[0]
    return v


def wide_pair_problems(graph: ir.Graph, arch: ArchSpec, pair: tuple[int, int]) -> list[str]:
    """Why ``pair`` is not one wide layer in ``graph`` (empty when it is)."""
    slot = next(s for s in IOSpec.for_model(arch, [pair], merged=True).slots if s.layers == pair)
    outputs = {v.name: v for v in graph.outputs}
    if slot.present_key not in outputs or slot.present_value not in outputs:
        return [f"no wide cache slot '{slot.present_key}' (merge_attention did not fire for this pair)"]
    pk, pv = outputs[slot.present_key], outputs[slot.present_value]
    scores = scores_matmul(pk)
    q5 = producer(scores.inputs[0], "Reshape") if scores is not None else None
    shape = const(q5.inputs[1]) if q5 is not None else None
    kv2, h2 = 2 * arch.num_kv_heads, 2 * arch.num_heads
    if shape is None or shape.size != 5 or shape[1] != kv2 or shape[1] * shape[2] != h2:
        got = "unknown" if shape is None else shape.tolist()
        return [f"wide attention's query reshape is {got}, not [0, {kv2}, {h2 // kv2}, -1, {arch.head_dim}]"]
    assert scores is not None and q5 is not None
    problems: list[str] = []
    cat_k, cat_v = producer(pk, "Concat"), producer(pv, "Concat")
    rot_q = match_rotary(q5.inputs[0]) if q5.inputs[0] is not None else None
    rot_k = match_rotary(cat_k.inputs[1]) if cat_k is not None and cat_k.inputs[1] is not None else None
    if rot_q is None or rot_k is None or cat_v is None:
        return ["wide attention's q/k/v could not be traced back"]
    qkv = _matmuls_back(rot_q.t) + _matmuls_back(rot_k.t) + _matmuls_back(cat_v.inputs[1])
    _one("qkv projection", list({id(n): n for n in qkv}.values()), SIBLING, problems)
    ctx = _context(scores)
    o = _one("o_proj", _matmuls_forward(ctx), REDUCING, problems) if ctx is not None else None
    h = _residual_after(o) if o is not None else None
    if ctx is None or (o is not None and h is None):
        problems.append("the wide attention's context or residual could not be traced")
    gate_up = _one("gate/up projection", _matmuls_forward(h), SIBLING, problems) if h is not None else None
    if gate_up is not None:
        _one("down projection", _matmuls_forward(gate_up.outputs[0]), REDUCING, problems)
    return problems


__all__ = ["wide_pair_problems"]
