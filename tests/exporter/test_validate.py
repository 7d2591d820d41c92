"""``compare_runners`` / ``within_tolerance`` cannot be fooled: a NaN or inf in either runtime's logits or KV
cache fails (named by output, case, step and position), so does a wrong finite answer, and the ``chunked`` case
catches a runtime that mishandles a multi-token step on a non-empty cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from layerpair.arch import ArchSpec
from layerpair.exporter.model import Decoder
from layerpair.exporter.onnx_export import export_onnx
from layerpair.exporter.validate import (
    Agreement,
    OrtRunner,
    Runner,
    TorchRunner,
    compare_runners,
    within_tolerance,
)
from tests.conftest import tiny_model

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Decoder, Path]:
    hf = tiny_model("llama")
    dec = Decoder.from_hf(hf, ArchSpec.from_hf_config(hf.config), [(1, 2)])
    path = tmp_path_factory.mktemp("validate") / "model.onnx"
    export_onnx(dec, path)
    return dec, path


class Poisoned(Runner):
    """``inner`` with one value overwritten in call ``at`` (1-based): in the logits (``which`` None) or in
    present ``which``."""

    def __init__(self, inner: Runner, at: int, value: float, which: int | None = None) -> None:
        self.inner, self.at, self.value, self.which = inner, at, value, which
        self.calls = 0

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, presents = self.inner.step(ids, mask, pos, past)
        self.calls += 1
        if self.calls == self.at:
            if self.which is None:
                logits = logits.copy()
                logits[0, -1, 5] = self.value if math.isnan(self.value) else logits[0, -1, 5] + self.value
            else:
                presents = list(presents)
                t = presents[self.which].copy()
                t[0, 0, -1, 3] = self.value
                presents[self.which] = t
        return logits, presents


class IgnoresPastOnChunks(Runner):
    """A runtime bug the prefill/decode/padded cases cannot see: a multi-token step on a non-empty cache
    attends to the new tokens only."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        if ids.shape[1] > 1 and past[0].shape[2] > 0:
            logits, new = self.inner.step(ids, mask[:, -ids.shape[1] :], pos, [p[:, :, :0] for p in past])
            return logits, [np.concatenate([p, n], axis=2) for p, n in zip(past, new, strict=True)]
        return self.inner.step(ids, mask, pos, past)


def test_onnx_agrees_on_all_four_cases(tiny_onnx: tuple[Decoder, Path]) -> None:
    dec, path = tiny_onnx
    res = compare_runners(OrtRunner(path, dec.io, threads=1), dec.io, TorchRunner(dec), dec.io)
    assert list(res) == ["prefill", "decode", "chunked", "padded"]
    assert res["chunked"].positions == 10  # 5 tokens after the decode cache, 5 after one masked slot
    assert within_tolerance(res, ATOL) == [], {k: a.to_json() for k, a in res.items()}


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_onnx_logits_fail(tiny_onnx: tuple[Decoder, Path], value: float) -> None:
    dec, path = tiny_onnx
    ours = Poisoned(OrtRunner(path, dec.io, threads=1), at=3, value=value)  # call 3 = decode step 2
    res = compare_runners(ours, dec.io, TorchRunner(dec), dec.io)
    assert not math.isfinite(res["decode"].max_abs)
    bad = within_tolerance(res, ATOL)
    assert len(bad) == 1 and bad[0].startswith("decode: logits non-finite"), bad
    assert "decode step 2" in bad[0] and "position 17" in bad[0] and "vocab 5" in bad[0], bad


def test_nan_in_one_onnx_present_fails_and_is_named(tiny_onnx: tuple[Decoder, Path]) -> None:
    dec, path = tiny_onnx
    # present 2 of the unmerged-pair layout = layer 1's key; poisoned in the prefill, so it also flows on
    ours = Poisoned(OrtRunner(path, dec.io, threads=1), at=1, value=math.nan, which=2)
    res = compare_runners(ours, dec.io, TorchRunner(dec), dec.io)
    bad = within_tolerance(res, ATOL)
    prefill = [b for b in bad if b.startswith("prefill:")]
    assert prefill == [b for b in bad if b.startswith("prefill: KV cache non-finite")], bad
    assert "KV cache of layer 1 (key)" in prefill[0] and "head 0 position 15" in prefill[0], bad
    assert math.isnan(res["prefill"].present_max_abs) and res["prefill"].max_abs <= ATOL


def test_nan_in_the_reference_fails_too(tiny_onnx: tuple[Decoder, Path]) -> None:
    dec, path = tiny_onnx
    ref = Poisoned(TorchRunner(dec), at=1, value=math.nan)
    bad = within_tolerance(compare_runners(OrtRunner(path, dec.io, threads=1), dec.io, ref, dec.io), ATOL)
    assert bad and bad[0].startswith("prefill: logits non-finite") and "reference nan" in bad[0], bad


def test_wrong_finite_answer_fails(tiny_onnx: tuple[Decoder, Path]) -> None:
    dec, path = tiny_onnx
    ours = Poisoned(OrtRunner(path, dec.io, threads=1), at=7, value=1e-3)  # call 7 = the chunk after the cache
    bad = within_tolerance(compare_runners(ours, dec.io, TorchRunner(dec), dec.io), ATOL)
    assert len(bad) == 1 and bad[0].startswith("chunked: logits max_abs 0.001 > 0.0001"), bad


def test_chunked_case_catches_a_cache_bug_the_others_miss() -> None:
    hf = tiny_model("llama")
    dec = Decoder.from_hf(hf, ArchSpec.from_hf_config(hf.config), [(1, 2)])
    bad = within_tolerance(
        compare_runners(IgnoresPastOnChunks(TorchRunner(dec)), dec.io, TorchRunner(dec), dec.io), ATOL
    )
    assert bad and all(b.startswith("chunked:") for b in bad), bad


def test_agreement_never_drops_a_nan() -> None:
    a = Agreement()
    ref = np.zeros((1, 2, 4), np.float32)
    big = ref.copy()
    big[0, 1, 2] = 5.0
    a.update(big, ref, np.ones((1, 2), bool), "step A")
    nan = ref.copy()
    nan[0, 0, 1] = np.nan
    a.update(nan, ref, np.ones((1, 2), bool), "step B")
    a.update(big, ref, np.ones((1, 2), bool), "step C")  # a larger finite error later does not hide it
    assert math.isnan(a.max_abs) and math.isnan(a.max_rel) and "step B" in a.max_abs_at
    a.update_present([np.full((1, 1, 2, 2), np.inf, np.float32)], [np.zeros((1, 1, 2, 2), np.float32)], "step D")
    assert a.present_max_abs == math.inf and "step D" in a.present_max_abs_at
    assert within_tolerance({"x": a}, ATOL) == [
        f"x: logits non-finite (nan) at {a.max_abs_at}",
        f"x: KV cache non-finite (inf) at {a.present_max_abs_at}",
    ]


def test_mistral_longer_than_its_sliding_window(tmp_path: Path) -> None:
    """Tiny Mistral, window 6: the 16-token prefill, the decode steps and the 5-token chunk after 20 cached
    tokens all reach past the window. The merged pair's ONNX agrees with PyTorch on all four cases, and the
    same check fails against a reference without the window (so the window is what is being checked)."""
    from layerpair.graph_passes import merge_pairs, save_model
    from layerpair.iospec import IOSpec

    hf = tiny_model("mistral")
    arch = ArchSpec.from_hf_config(hf.config)
    assert set(arch.sliding_windows) == {6}
    dec = Decoder.from_hf(hf, arch, [(1, 2)])
    export_onnx(dec, tmp_path / "model.onnx")
    model, _ = merge_pairs(tmp_path / "model.onnx", arch, [(1, 2)])
    save_model(model, tmp_path / "merged.onnx")
    spec = IOSpec.for_model(arch, [(1, 2)], merged=True)
    res = compare_runners(OrtRunner(tmp_path / "merged.onnx", spec, threads=1), spec, TorchRunner(dec), dec.io)
    assert within_tolerance(res, ATOL) == [], {k: a.to_json() for k, a in res.items()}
    assert res["prefill"].positions == 16 > 6 and res["chunked"].positions == 10

    hf.config.sliding_window = None
    full = Decoder.from_hf(hf, ArchSpec.from_hf_config(hf.config), [(1, 2)])
    assert ArchSpec.from_hf_config(hf.config).sliding_windows == ()
    bad = within_tolerance(
        compare_runners(OrtRunner(tmp_path / "merged.onnx", spec, threads=1), spec, TorchRunner(full), full.io), ATOL
    )
    assert {b.split(":")[0] for b in bad} >= {"prefill", "decode", "chunked"}, bad
