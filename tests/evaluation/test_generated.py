"""Generated calibration (text sampled from the model itself): deterministic, cached, prompts forced, bad input
refused, and the --pairs auto / --heal selection reads its rows."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from layerpair.errors import InputError
from layerpair.evaluation.generated import NEUTRAL_PROMPTS, GenSpec, generated_windows
from layerpair.evaluation.selection import (
    Calibrations,
    calib_sources,
    calibration,
    check_selection_args,
    generated_rows,
    select_pairs,
)
from layerpair.exporter.model import Decoder

SPEC = GenSpec(sequences=6, length=10, seed=3)


def _encode(dec: Decoder):  # type: ignore[no-untyped-def]
    v = dec.arch.vocab_size
    return lambda s: [1 + ord(c) % (v - 1) for c in s]


def test_deterministic_and_cached(tiny_llama: Decoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERPAIR_CACHE_DIR", str(tmp_path))
    enc = _encode(tiny_llama)
    w, info = generated_windows(tiny_llama, 0, enc, SPEC)
    assert w.shape == (6, 10) and w.dtype == torch.long and info.tokens == 60 and not info.cached
    assert (w[:, 0] == 0).all()  # every row starts with the document-start token
    for r, p in enumerate(NEUTRAL_PROMPTS[:3]):  # half the rows are steered by a neutral prompt, forced after it
        assert w[r, 1 : 1 + len(p)].tolist() == enc(p)
    files = list((tmp_path / "calib").glob("sampled-*.npy"))
    assert len(files) == 1 and info.path == str(files[0])
    again, info2 = generated_windows(tiny_llama, 0, enc, SPEC)
    assert info2.cached and info2.seconds == 0.0 and torch.equal(again, w)
    fresh, info3 = generated_windows(tiny_llama, 0, enc, SPEC, use_cache=False)  # same seed -> same tokens
    assert not info3.cached and info3.path is None and torch.equal(fresh, w)
    other, _ = generated_windows(tiny_llama, 0, enc, GenSpec(6, 10, seed=4), use_cache=False)
    assert not torch.equal(other, w)
    assert len(list((tmp_path / "calib").glob("*.npy"))) == 1  # use_cache=False writes nothing


def test_cache_key_follows_the_weights(tiny_llama: Decoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERPAIR_CACHE_DIR", str(tmp_path))
    enc = _encode(tiny_llama)
    generated_windows(tiny_llama, 0, enc, SPEC)
    changed = Decoder(tiny_llama.arch, ())
    for (_, p), (_, q) in zip(changed.named_parameters(), tiny_llama.named_parameters(), strict=True):
        p.data = q.data.clone()
    changed.norm.weight.data *= 1.5
    _, info = generated_windows(changed.eval(), 0, enc, SPEC)
    assert not info.cached and len(list((tmp_path / "calib").glob("*.npy"))) == 2


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        (GenSpec(0, 10), "is empty"),
        (GenSpec(4, 1), "is empty"),
        (GenSpec(seed="1"), "must be an integer"),  # type: ignore[arg-type]
        (GenSpec(temperature=0.0), "must be positive"),
    ],
)
def test_bad_spec(spec: GenSpec, msg: str) -> None:
    with pytest.raises(InputError, match=msg):
        spec.check()


def _args(**kw: object) -> argparse.Namespace:
    base = dict(pairs="1-2", heal=True, max_ppl_increase=None, target_depth=None, plot=None, heal_damping=None,
                heal_inputs="ab", calib_tokens=20, heal_tokens=None, calib_text=None, calib=None, heal_calib=None,
                calib_samples=6, calib_length=10, calib_seed=3, beam=1, window=10)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_selection_reads_generated_rows(tiny_llama: Decoder) -> None:
    assert check_selection_args(_args())
    with pytest.raises(InputError, match="is empty"):
        check_selection_args(_args(calib_samples=0))
    with pytest.raises(InputError, match="no calibration reads it"):
        check_selection_args(_args(calib="generated", calib_text=__file__))
    with pytest.raises(InputError, match="no calibration reads it"):
        check_selection_args(_args(heal_calib="generated", calib_text=__file__))  # explicit pairs: heal only
    with pytest.raises(InputError, match="only applies to --heal"):
        check_selection_args(_args(heal=False, heal_calib="generated"))
    assert check_selection_args(_args(pairs="auto", target_depth=4, heal_calib="generated", calib_text=__file__))
    w, _ = generated_windows(tiny_llama, 0, _encode(tiny_llama), SPEC, use_cache=False)
    assert generated_rows(w, 25, "t", print).shape == (3, 10)  # rounded up to whole rows
    said: list[str] = []
    assert generated_rows(w, 1000, "t", said.append).shape == (6, 10) and "using them all" in said[0]
    sel = select_pairs(_args(), tiny_llama, Calibrations(search=None, heal=w))
    assert sel.pairs == ((1, 2),) and sel.report["heal"]["calib_tokens"] == 60


@pytest.mark.parametrize(
    ("kw", "sources"),
    [
        ({}, ("text", "generated")),  # the default: search on text, heal on the model's own samples
        ({"calib_text": "t.txt"}, ("text", "text")),  # in-domain text serves both uses
        ({"calib": "generated"}, ("generated", "generated")),  # --calib sets both
        ({"calib": "text"}, ("text", "text")),
        ({"calib_text": "t.txt", "heal_calib": "generated"}, ("text", "generated")),  # --heal-calib overrides
        ({"calib": "generated", "heal_calib": "text"}, ("generated", "text")),
    ],
)
def test_calib_sources(kw: dict[str, str], sources: tuple[str, str]) -> None:
    assert calib_sources(_args(**kw)) == sources


def test_calibration_per_use(tiny_llama: Decoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERPAIR_CACHE_DIR", str(tmp_path))
    enc, tok, text = _encode(tiny_llama), argparse.Namespace(eos_token_id=0), list(range(1, 41))
    c = calibration(_args(pairs="auto", target_depth=4), tiny_llama, tok, enc, text, print)
    assert c.search == text and isinstance(c.heal, torch.Tensor) and c.heal.shape == (6, 10) and c.same_text
    rep = c.report["calibration"]
    assert rep["search"]["source"] == "text" and rep["search"]["tokens"] == 40
    assert rep["heal"]["source"] == "generated" and rep["heal"]["tokens"] == 60
    plain = calibration(_args(heal=False), tiny_llama, tok, enc, text, print)  # nothing in play: nothing made
    assert plain.search is None and plain.heal is None and plain.report == {"calibration": {}}
    assert len(list(tmp_path.glob("calib/*.npy"))) == 1  # the first call's generation, nothing more
    gen = calibration(_args(pairs="auto", target_depth=4, calib="generated"), tiny_llama, tok, enc, text, print)
    assert gen.search is gen.heal and gen.report["calibration"]["search"]["source"] == "generated"
    sel = select_pairs(_args(pairs="auto", target_depth=4), tiny_llama, c)
    assert len(sel.pairs) == 2 and sel.report["auto"]["calib_tokens"] == 20 and sel.report["heal"]["calib_tokens"] == 60
