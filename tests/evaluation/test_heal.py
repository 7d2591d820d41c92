"""Healing on a tiny model: it fits, it generalises to held-out samples, it touches only the projections it
should, and the healed Decoder exports to ONNX exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from layerpair.errors import InputError
from layerpair.evaluation.data import MCItem
from layerpair.evaluation.heal import heal_pairs
from layerpair.evaluation.metrics import OnnxBackend, TorchBackend, mc_metrics, text_metrics
from layerpair.exporter.model import Decoder
from layerpair.exporter.onnx_export import export_onnx
from layerpair.exporter.validate import OrtRunner, TorchRunner, compare_runners, within_tolerance
from tests.evaluation.conftest import sample_text

PAIRS = ((1, 2), (3, 4))


@pytest.fixture(scope="module")
def texts(tiny_llama: Decoder) -> tuple[torch.Tensor, torch.Tensor]:
    w = sample_text(tiny_llama, 20, 32, seed=11)
    return w[:16], w[16:]  # calibration (more tokens than a pair has features), held out


@pytest.fixture(scope="module")
def healed(tiny_llama: Decoder, texts: tuple[torch.Tensor, torch.Tensor]) -> Decoder:
    dec, rep = heal_pairs(tiny_llama, PAIRS, texts[0], damping=1e-2)
    for errs in (rep.attn_rel_err, rep.mlp_rel_err):
        assert set(errs) == {"1-2", "3-4"}
        assert all(after < before for before, after in errs.values())
    return dec


def _ratio(dec: Decoder, ref: Decoder, w: torch.Tensor) -> float:
    r = text_metrics(TorchBackend(dec), w, ref=TorchBackend(ref, ())).ppl_ratio
    assert r is not None
    return r


def test_heal_lowers_perplexity_ratio(tiny_llama: Decoder, healed: Decoder, texts: tuple[torch.Tensor, ...]) -> None:
    cal, held = texts
    naive = Decoder(tiny_llama.arch, PAIRS)
    naive.load_state_dict(tiny_llama.state_dict())
    for w in (cal, held):
        assert _ratio(healed, tiny_llama, w) < _ratio(naive, tiny_llama, w)
    assert abs(_ratio(healed, tiny_llama, cal) - 1) < 0.05  # near-perfect on the calibration text itself


def test_heal_changes_only_pair_output_projections(tiny_llama: Decoder, healed: Decoder) -> None:
    before, after = tiny_llama.state_dict(), healed.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    want = {f"layers.{i}.{p}" for i in (1, 2, 3, 4) for p in ("self_attn.o_proj", "mlp.down_proj")}
    assert changed == want
    assert healed.pairs == PAIRS and tiny_llama.pairs == ()
    assert all(after[k].dtype == before[k].dtype for k in before)


def test_heal_without_pairs_is_a_copy(tiny_llama: Decoder, texts: tuple[torch.Tensor, ...]) -> None:
    dec, _ = heal_pairs(tiny_llama, (), texts[0])
    assert all(torch.equal(a, b) for a, b in zip(dec.parameters(), tiny_llama.parameters(), strict=True))


def test_heal_bad_arguments(tiny_llama: Decoder, texts: tuple[torch.Tensor, ...]) -> None:
    with pytest.raises(InputError, match="target"):
        heal_pairs(tiny_llama, PAIRS, texts[0], target="nope")
    with pytest.raises(InputError, match="damping"):
        heal_pairs(tiny_llama, PAIRS, texts[0], damping=0.0)


@pytest.fixture(scope="module")
def healed_onnx(healed: Decoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("healed") / "model.onnx"
    export_onnx(healed, path)
    return path


def test_healed_export_validates_exactly(healed: Decoder, healed_onnx: Path) -> None:
    res = compare_runners(OrtRunner(healed_onnx, healed.io), healed.io, TorchRunner(healed), healed.io)
    assert within_tolerance(res, 1e-4) == [], {k: a.to_json() for k, a in res.items()}


def test_onnx_and_pytorch_give_the_same_figures(
    tiny_llama: Decoder, healed: Decoder, healed_onnx: Path, texts: tuple[torch.Tensor, ...]
) -> None:
    held = texts[1]
    ref = TorchBackend(tiny_llama, ())
    pt = text_metrics(TorchBackend(healed), held, ref=ref, batch=3)
    ox = text_metrics(OnnxBackend(healed_onnx), held, ref=ref, batch=3)
    for k in ("ppl", "ref_ppl", "ppl_ratio", "kl", "top1"):
        assert getattr(ox, k) == pytest.approx(getattr(pt, k), rel=1e-3), k
    items = [MCItem("ab", ["cd", "e", "fgh"], 0), MCItem("x y", ["zz", "w"], 1)]
    enc = lambda s: [ord(c) % tiny_llama.arch.vocab_size for c in s]  # noqa: E731
    a, b = mc_metrics(TorchBackend(healed), items, enc), mc_metrics(OnnxBackend(healed_onnx), items, enc)
    flat = lambda m: [x for ll in m.loglikelihoods for x in ll]  # noqa: E731
    np.testing.assert_allclose(flat(a), flat(b), rtol=1e-3)
    assert (a.acc, a.acc_norm) == (b.acc, b.acc_norm)


def test_heal_chooses_damping_on_held_out_windows(tiny_llama: Decoder, texts: tuple[torch.Tensor, ...]) -> None:
    from layerpair.evaluation.heal import DAMPING_GRID, DEFAULT_DAMPING, HOLDOUT_EVERY, _chunks

    chunks, held = _chunks(texts[0], 4, hold_out=True)  # 16 windows: 2 held out (every 8th), batched apart
    assert [c.shape[0] for c in chunks] == [4, 4, 4, 2, 2] and held == [False] * 4 + [True]
    assert torch.equal(chunks[-1], texts[0][HOLDOUT_EVERY - 1 :: HOLDOUT_EVERY])
    assert _chunks(texts[0][:3], 4, hold_out=True)[1] == [False, True]  # fewer than 8: the last one
    assert _chunks(texts[0][:1], 4, hold_out=True)[1] == [False]  # one window: nothing to hold out
    dec, rep = heal_pairs(tiny_llama, PAIRS, texts[0])  # the default: damping chosen per fit
    assert rep.damping is None and rep.to_json()["damping"] == "auto"
    assert set(rep.chosen_damping) == {"1-2", "3-4"}
    assert all(d in DAMPING_GRID for ds in rep.chosen_damping.values() for d in ds)
    _, one = heal_pairs(tiny_llama, PAIRS, texts[0][:1])
    assert all(ds == (DEFAULT_DAMPING, DEFAULT_DAMPING) for ds in one.chosen_damping.values())
    naive = Decoder(tiny_llama.arch, PAIRS)
    naive.load_state_dict(tiny_llama.state_dict())
    assert _ratio(dec, tiny_llama, texts[1]) < _ratio(naive, tiny_llama, texts[1])


@pytest.mark.parametrize("which", ["b", "ab"])
def test_heal_refit_inputs(tiny_llama: Decoder, texts: tuple[torch.Tensor, ...], which: str) -> None:
    """Lever 4: the input projections the pair feeds a different residual are refitted too (b's q/k/v and
    gate/up; with "ab" also a's gate/up), each with its own chosen damping, and nothing else changes."""
    dec, rep = heal_pairs(tiny_llama, PAIRS, texts[0], refit_inputs=which)
    before, after = tiny_llama.state_dict(), dec.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    outputs = {f"layers.{i}.{p}" for i in (1, 2, 3, 4) for p in ("self_attn.o_proj", "mlp.down_proj")}
    qkv = {f"layers.{i}.self_attn.{p}_proj" for i in (2, 4) for p in "qkv"}
    gu = {f"layers.{i}.mlp.{p}_proj" for i in ((1, 2, 3, 4) if which == "ab" else (2, 4)) for p in ("gate", "up")}
    assert changed == outputs | qkv | gu
    n_fits = 5 + 2 * (which == "ab")
    assert all(len(d) == n_fits for d in rep.input_damping.values()) and set(rep.input_damping) == {"1-2", "3-4"}
    assert rep.to_json()["refit_inputs"] == which
    naive = Decoder(tiny_llama.arch, PAIRS)
    naive.load_state_dict(tiny_llama.state_dict())
    assert _ratio(dec, tiny_llama, texts[1]) < _ratio(naive, tiny_llama, texts[1])
    with pytest.raises(InputError, match="refit_inputs"):
        heal_pairs(tiny_llama, PAIRS, texts[0], refit_inputs="b", target="global")


def test_heal_refit_inputs_export_validates_exactly(
    tiny_llama: Decoder, texts: tuple[torch.Tensor, ...], tmp_path: Path
) -> None:
    dec, _ = heal_pairs(tiny_llama, PAIRS, texts[0], refit_inputs="ab")
    export_onnx(dec, tmp_path / "model.onnx")
    res = compare_runners(OrtRunner(tmp_path / "model.onnx", dec.io), dec.io, TorchRunner(dec), dec.io)
    assert within_tolerance(res, 1e-4) == [], {k: a.to_json() for k, a in res.items()}
