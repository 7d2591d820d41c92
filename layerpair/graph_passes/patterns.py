"""Structural matchers for the sub-graphs the exporter emits (RMSNorm, rotary, rotate-half).

Each matcher takes a value and returns what it found or None; none of them looks at names.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from layerpair.graph_passes.base import attr_int, const, producer, scalar


@dataclass(frozen=True)
class UnitRMSNorm:
    """``out = x * 1/sqrt(mean(x^2, -1) + eps)``: an RMSNorm without its scale.

    16-bit graphs compute it in float32: ``x`` is cast up first (``compute_cast``) and the result cast back
    (``out_cast``); both are ONNX dtype codes, or None when absent. ``two`` and ``eps_value`` are the
    graph's own constants (reused when the norm is rebuilt, so their dtype is right by construction).
    """

    x: ir.Value
    eps: float
    out: ir.Value
    nodes: tuple[ir.Node, ...]
    compute_cast: int | None = None
    out_cast: int | None = None
    two: ir.Value | None = None
    eps_value: ir.Value | None = None


def match_unit_rmsnorm(out: ir.Value) -> UnitRMSNorm | None:
    """Match ``[Cast](Mul(xc, Reciprocal(Sqrt(Add(ReduceMean(Pow(xc, 2), [-1]), eps)))))`` ending in ``out``,
    with ``xc = x`` or ``xc = Cast(x)``."""
    out_cast_node = producer(out, "Cast")
    mul = producer(out_cast_node.inputs[0] if out_cast_node else out, "Mul")
    if mul is None:
        return None
    for xc, r in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
        rec = producer(r, "Reciprocal")
        sqrt = producer(rec.inputs[0] if rec else None, "Sqrt")
        add = producer(sqrt.inputs[0] if sqrt else None, "Add")
        if add is None:
            continue
        for m, e in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            mean = producer(m, "ReduceMean")
            eps = scalar(e)
            if mean is None or eps is None or attr_int(mean, "keepdims", 1) != 1:
                continue
            axes = const(mean.inputs[1]) if len(mean.inputs) > 1 else None
            pow_ = producer(mean.inputs[0], "Pow")
            if axes is None or axes.tolist() != [-1] or pow_ is None or pow_.inputs[0] is not xc:
                continue
            if scalar(pow_.inputs[1]) != 2.0:
                continue
            assert rec is not None and sqrt is not None and xc is not None
            nodes: tuple[ir.Node, ...] = (pow_, mean, add, sqrt, rec, mul)
            x, compute_cast = xc, None
            up = producer(xc, "Cast")
            if up is not None and up.inputs[0] is not None:
                x, compute_cast = up.inputs[0], attr_int(up, "to", 0)
                nodes = (up, *nodes)
            out_cast = None
            if out_cast_node is not None:
                out_cast = attr_int(out_cast_node, "to", 0)
                nodes = (*nodes, out_cast_node)
            return UnitRMSNorm(x, eps, out, nodes, compute_cast, out_cast, pow_.inputs[1], e)
    return None


@dataclass(frozen=True)
class ScaledRMSNorm:
    """``g * UnitRMSNorm(x)`` (``g`` may be absent)."""

    unit: UnitRMSNorm
    scale: ir.Value | None
    out: ir.Value


def match_rmsnorm(out: ir.Value) -> ScaledRMSNorm | None:
    unit = match_unit_rmsnorm(out)
    if unit is not None:
        return ScaledRMSNorm(unit, None, out)
    mul = producer(out, "Mul")
    if mul is None:
        return None
    for g, n in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
        unit = match_unit_rmsnorm(n) if n is not None else None
        if unit is not None and g is not None and g.const_value is not None:
            return ScaledRMSNorm(unit, g, out)
    return None


@dataclass(frozen=True)
class Rotary:
    """``out = t * cos + rotate_half(t) * sin`` on the last axis (``rotate_half = [-t2, t1]``)."""

    t: ir.Value
    cos: ir.Value
    sin: ir.Value


def _rotate_half_source(v: ir.Value | None) -> ir.Value | None:
    """``Concat(Neg(Slice(t, D/2:)), Slice(t, :D/2), axis=-1)`` -> t."""
    cat = producer(v, "Concat")
    if cat is None or len(cat.inputs) != 2 or attr_int(cat, "axis", 0) != -1:
        return None
    neg = producer(cat.inputs[0], "Neg")
    hi = producer(neg.inputs[0] if neg else None, "Slice")
    lo = producer(cat.inputs[1], "Slice")
    if hi is None or lo is None or hi.inputs[0] is not lo.inputs[0]:
        return None
    hs, ls_, le = const(hi.inputs[1]), const(lo.inputs[1]), const(lo.inputs[2])
    if hs is None or ls_ is None or le is None or ls_.tolist() != [0] or hs.tolist() != le.tolist():
        return None
    return hi.inputs[0]


def match_rotary(out: ir.Value) -> Rotary | None:
    add = producer(out, "Add")
    if add is None:
        return None
    m1, m2 = producer(add.inputs[0], "Mul"), producer(add.inputs[1], "Mul")
    if m1 is None or m2 is None:
        return None
    for mc, ms in ((m1, m2), (m2, m1)):
        for rh, sin in ((ms.inputs[0], ms.inputs[1]), (ms.inputs[1], ms.inputs[0])):
            t = _rotate_half_source(rh)
            if t is None or sin is None:
                continue
            if mc.inputs[0] is t and mc.inputs[1] is not None:
                return Rotary(t, mc.inputs[1], sin)
            if mc.inputs[1] is t and mc.inputs[0] is not None:
                return Rotary(t, mc.inputs[0], sin)
    return None
