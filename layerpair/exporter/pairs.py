"""``--pairs`` parsing: a spec string becomes a sorted tuple of disjoint adjacent layer pairs."""

from __future__ import annotations

import re

from layerpair.errors import PairSpecError

Pairs = tuple[tuple[int, int], ...]

_RANGE = re.compile(r"^(\d+):(\d+)$")
_PAIR = re.compile(r"^(\d+)-(\d+)$")
_FIX = "use S:E (even-length range, e.g. 20:24), a list like 10-11,14-15, or none"


def parse_pairs(spec: str, num_layers: int) -> Pairs:
    """``S:E`` -> (S,S+1),…,(E-2,E-1); ``a-b,c-d`` -> explicit pairs; ``none``/empty -> ().

    Raises PairSpecError unless every pair is (i, i+1), inside [0, num_layers), and no layer is used twice.
    """
    text = spec.strip().lower()
    if text in ("", "none"):
        return ()
    pairs: list[tuple[int, int]] = []
    m = _RANGE.match(text)
    if m:
        start, end = int(m.group(1)), int(m.group(2))
        if end <= start or (end - start) % 2:
            raise PairSpecError(f"pair range '{spec}' must have E > S and an even length E-S", _FIX)
        pairs = [(i, i + 1) for i in range(start, end, 2)]
    else:
        for item in text.split(","):
            pm = _PAIR.match(item.strip())
            if not pm:
                raise PairSpecError(f"cannot parse pair '{item.strip()}' in --pairs '{spec}'", _FIX)
            a, b = int(pm.group(1)), int(pm.group(2))
            if b != a + 1:
                raise PairSpecError(f"pair {a}-{b} is not two adjacent layers", "write each pair as i-(i+1)")
            pairs.append((a, b))
    for a, b in pairs:
        if b >= num_layers:
            raise PairSpecError(
                f"pair {a}-{b} is out of range: the model has {num_layers} layers (0..{num_layers - 1})",
                "pick layers inside that range",
            )
    used = [layer for p in pairs for layer in p]
    if len(used) != len(set(used)):
        dup = sorted({x for x in used if used.count(x) > 1})
        raise PairSpecError(f"pairs overlap on layer(s) {dup}", "each layer may belong to one pair only")
    return tuple(sorted(pairs))


def format_pairs(pairs: Pairs) -> str:
    return ",".join(f"{a}-{b}" for a, b in pairs) or "none"
