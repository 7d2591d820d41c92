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


# ---- export flags: argv -> ExportOptions, or one clear error -----------------------------------------------
class _Captured(Exception):
    """Raised by the stand-in run_export: the options the CLI built, without exporting anything."""

    def __init__(self, opts: object, pairs_for: object) -> None:
        self.opts, self.pairs_for = opts, pairs_for


_PAIR_SPECS = st.one_of(
    st.sampled_from(["none", "", "auto?", "1:3", "2:6", "0:2", "3:2", "1:4", "1-2,5-6", "1-3", "x"]),
    st.lists(st.integers(0, 12), min_size=1, max_size=3).map(lambda s: ",".join(f"{a}-{a + 1}" for a in s)),
    st.tuples(st.integers(0, 12), st.integers(0, 14)).map(lambda t: f"{t[0]}:{t[1]}"),
)
_ATOLS = st.sampled_from(["1e-4", "0.001", "0", "-1e-4", "nan", "abc", "5e-5"])
_DTYPES = st.sampled_from(["fp32", "fp16", "bf16", "fp8", "float16"])


@settings(max_examples=150, deadline=None)
@given(
    pairs=_PAIR_SPECS,
    atol=_ATOLS,
    dtype=_DTYPES,
    no_merge=st.booleans(),
    force=st.booleans(),
    data=st.sampled_from([[], ["--external-data"], ["--single-file"], ["--external-data", "--single-file"]]),
    n_layers=st.integers(1, 16),
)
def test_export_flags_build_options_or_fail_cleanly(
    pairs: str, atol: str, dtype: str, no_merge: bool, force: bool, data: list[str], n_layers: int
) -> None:
    """Every flag combination either becomes the ExportOptions it says (pairs resolved per depth by the same
    parser), or stops before any work: argparse's usage error (exit 2) for malformed flags, one-line
    LayerpairError for bad values."""
    import math

    from layerpair import cli, pipeline
    from layerpair.engine.options import DTYPE_FLAGS
    from layerpair.errors import LayerpairError

    argv = ["ckpt", f"--pairs={pairs}", f"--atol={atol}", f"--dtype={dtype}", *data]  # "=": values may start with -
    argv += ["--no-merge"] * no_merge + ["--force"] * force

    def fake_run_export(opts: object, pairs_for: object, progress: object = None) -> None:
        raise _Captured(opts, pairs_for)

    malformed = dtype not in DTYPE_FLAGS or len(data) == 2 or atol == "abc"
    try:
        parse_pairs(pairs, 1 << 30)
        bad_pairs = False
    except PairSpecError:
        bad_pairs = True
    bad_value = not malformed and (not float(atol) > 0 or bad_pairs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "run_export", fake_run_export)
        try:
            cli.run_export_cli(argv)
        except SystemExit as e:
            assert malformed and e.code == 2
            return
        except LayerpairError as e:
            assert bad_value and "\n" not in str(e) and str(e)
            return
        except _Captured as captured:
            got, pairs_for = captured.opts, captured.pairs_for
            assert not malformed and not bad_value
    assert isinstance(got, pipeline.ExportOptions) and callable(pairs_for)
    assert got.dtype == DTYPE_FLAGS[dtype] and got.merge is (not no_merge) and got.force is force
    assert math.isclose(got.atol, float(atol)) and got.pairs_spec == pairs
    assert got.external_data is {"--external-data": True, "--single-file": False}.get(data[0] if data else "")
    try:
        expected = parse_pairs(pairs, n_layers)
    except PairSpecError:
        with pytest.raises(PairSpecError):
            pairs_for(n_layers)
        return
    assert pairs_for(n_layers) == expected
