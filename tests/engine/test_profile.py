from __future__ import annotations

import pytest

from layerpair.arch import ArchSpec
from layerpair.engine.profile import EngineLimits, profile_for, profiles_from_limits
from layerpair.errors import InputError
from layerpair.iospec import BATCH, PAST, SEQ, IOSpec
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def spec() -> IOSpec:
    return IOSpec.for_model(ArchSpec.from_hf_config(tiny_model("llama").config), [(1, 2)], merged=True)


def test_decode_and_prefill_profiles_from_limits(spec: IOSpec) -> None:
    decode, prefill = profiles_from_limits(EngineLimits(max_batch=4, max_seq=32, max_context=128))
    assert decode.opt == {BATCH: 1, SEQ: 1, PAST: 64}
    assert decode.max == {BATCH: 4, SEQ: 1, PAST: 127}
    assert prefill.opt == {BATCH: 1, SEQ: 32, PAST: 0}
    assert prefill.max == {BATCH: 4, SEQ: 32, PAST: 96}
    for p in (decode, prefill):
        shapes = p.shapes(spec)
        assert set(shapes) == set(spec.input_names)
        for lo, opt, hi in shapes.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True))
        # Every corner is a runnable shape: mask length = past + new, never beyond the context.
        for corner in (p.min, p.opt, p.max):
            s = spec.shapes(corner)
            assert s["attention_mask"][1] == corner[PAST] + corner[SEQ] <= 128
            assert s["past_key_values.1_2.key"] == (corner[BATCH], 4, corner[PAST], 16)


def test_profile_for_picks_decode_for_one_token_steps() -> None:
    profiles = profiles_from_limits(EngineLimits(2, 16, 64))
    assert profile_for(profiles, 1, 1, 63) == 0
    assert profile_for(profiles, 2, 16, 0) == 1
    assert profile_for(profiles, 1, 5, 48) == 1
    with pytest.raises(InputError, match="outside the engine's profiles"):
        profile_for(profiles, 1, 5, 60)  # 65 tokens > max context 64
    with pytest.raises(InputError, match="--max-batch"):
        profile_for(profiles, 3, 1, 0)


@pytest.mark.parametrize(
    ("limits", "match"),
    [
        (EngineLimits(0, 16, 64), "--max-batch must be >= 1"),
        (EngineLimits(1, 0, 64), "--max-seq must be >= 1"),
        (EngineLimits(1, 128, 64), "larger than --max-context"),
    ],
)
def test_bad_limits_are_input_errors(limits: EngineLimits, match: str) -> None:
    with pytest.raises(InputError, match=match):
        profiles_from_limits(limits)
