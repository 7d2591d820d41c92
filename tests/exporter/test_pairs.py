from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerpair.errors import PairSpecError
from layerpair.exporter.pairs import format_pairs, parse_pairs


def test_range_list_none() -> None:
    assert parse_pairs("20:24", 30) == ((20, 21), (22, 23))
    assert parse_pairs("14-15,10-11", 30) == ((10, 11), (14, 15))
    assert parse_pairs("none", 30) == ()
    assert parse_pairs(" ", 30) == ()
    assert format_pairs(((10, 11), (14, 15))) == "10-11,14-15"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("20:23", "even length"),
        ("24:20", "E > S"),
        ("10-12", "not two adjacent layers"),
        ("11-10", "not two adjacent layers"),
        ("28:32", "out of range"),
        ("29-30", "out of range"),
        ("10-11,11-12", "overlap"),
        ("10-11,10-11", "overlap"),
        ("ten-eleven", "cannot parse"),
        ("10-11,", "cannot parse"),
        ("-1-0", "cannot parse"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(PairSpecError, match=message):
        parse_pairs(spec, 30)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="0123456789:-, none", max_size=14), st.integers(min_value=1, max_value=64))
def test_random_specs_parse_or_fail_cleanly(spec: str, n_layers: int) -> None:
    """Anything either parses into disjoint adjacent in-range pairs or raises PairSpecError — nothing else."""
    try:
        pairs = parse_pairs(spec, n_layers)
    except PairSpecError as e:
        assert "\n" not in str(e) and str(e)
        return
    used = [x for p in pairs for x in p]
    assert len(used) == len(set(used))
    assert all(b == a + 1 and 0 <= a and b < n_layers for a, b in pairs)
    assert list(pairs) == sorted(pairs)
    # Round trip: the canonical form parses to the same pairs.
    assert parse_pairs(format_pairs(pairs), n_layers) == pairs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=40), max_size=6), st.integers(min_value=2, max_value=48))
def test_random_pair_lists(starts: list[int], n_layers: int) -> None:
    spec = ",".join(f"{a}-{a + 1}" for a in starts)
    layers = [x for a in starts for x in (a, a + 1)]
    valid = len(layers) == len(set(layers)) and all(a + 1 < n_layers for a in starts)
    if valid:
        assert parse_pairs(spec or "none", n_layers) == tuple(sorted((a, a + 1) for a in starts))
    else:
        with pytest.raises(PairSpecError):
            parse_pairs(spec, n_layers)
